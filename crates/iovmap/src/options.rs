//! How a view is mapped: [`MapOptions`], a builder that can grow without breaking its
//! callers.

/// What the caller may do through a view.
///
/// ```
/// use iovmap::Access;
/// assert_eq!(Access::default(), Access::ReadWrite);
/// assert_eq!(iovmap::MapOptions::new().read_only().access(), Access::ReadOnly);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Access {
    /// Readable and writable; every run's source must be writable (unless the options
    /// raise it) and its backing accept writes.
    #[default]
    ReadWrite,
    /// Readable only: a write through the view faults (SIGSEGV).
    ReadOnly,
}

impl Access {
    pub(crate) fn prot(self) -> i32 {
        match self {
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
            Access::ReadOnly => libc::PROT_READ,
        }
    }
}

/// Which paths may place a view's runs.
///
/// ```
/// use iovmap::{MapOptions, Placement};
/// assert_eq!(MapOptions::new().placement(), Placement::Automatic);
/// assert_eq!(MapOptions::new().remap_only().placement(), Placement::RemapOnly);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Placement {
    /// The path measured fastest for the list: stretches of scattered runs of registered,
    /// sealed memfds go to udmabuf where `/dev/udmabuf` exists, everything else is cloned
    /// or fd-mapped (the remap path). Falls back to the remap path, without error, when
    /// udmabuf is missing or refuses; `MapStats::kernel_built_declined` says why.
    #[default]
    Automatic,
    /// Clone or fd-map every run, as iovmap 0.1 did: no dma-buf, no pinned pages.
    RemapOnly,
    /// Every run through udmabuf: one dma-buf per buffer, all of the view. An error
    /// ([`Error::KernelBuilt`](crate::Error::KernelBuilt)) names the segment udmabuf
    /// cannot take and why.
    KernelBuilt,
}

/// Options for [`Remapper::map_with`](crate::Remapper::map_with): start from
/// [`MapOptions::new`] (read-write, nothing prefaulted, never more than the source
/// allows) and chain what differs. New options arrive as new methods; code written
/// against this version keeps compiling.
///
/// ```
/// use iovmap::{Access, MapOptions};
/// let scanout = MapOptions::new().read_only().populate();
/// assert_eq!(scanout.access(), Access::ReadOnly);
/// assert!(scanout.populates());
/// assert_eq!(MapOptions::new(), MapOptions::default());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapOptions {
    access: Access,
    populate: bool,
    raise_source_protection: bool,
    placement: Placement,
}

impl MapOptions {
    /// The defaults: a read-write view, nothing prefaulted, and no run granting more than
    /// its source mapping.
    ///
    /// ```
    /// let opts = iovmap::MapOptions::new();
    /// assert_eq!(opts.access(), iovmap::Access::ReadWrite);
    /// assert!(!opts.populates() && !opts.raises_source_protection());
    /// ```
    pub const fn new() -> Self {
        MapOptions {
            access: Access::ReadWrite,
            populate: false,
            raise_source_protection: false,
            placement: Placement::Automatic,
        }
    }

    /// A read-only view: a write through it faults (SIGSEGV). What a scanout or an
    /// encoder that only reads guest memory should ask for.
    ///
    /// ```
    /// assert_eq!(iovmap::MapOptions::new().read_only().access(), iovmap::Access::ReadOnly);
    /// ```
    #[must_use]
    pub const fn read_only(mut self) -> Self {
        self.access = Access::ReadOnly;
        self
    }

    /// A read-write view (the default).
    ///
    /// ```
    /// let opts = iovmap::MapOptions::new().read_only().read_write();
    /// assert_eq!(opts.access(), iovmap::Access::ReadWrite);
    /// ```
    #[must_use]
    pub const fn read_write(mut self) -> Self {
        self.access = Access::ReadWrite;
        self
    }

    /// The given access: what callers that choose it at run time (from flags) use.
    ///
    /// ```
    /// use iovmap::{Access, MapOptions};
    /// assert_eq!(MapOptions::new().with_access(Access::ReadOnly), MapOptions::new().read_only());
    /// ```
    #[must_use]
    pub const fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Prefault the RAM runs of the view (MADV_POPULATE_READ/WRITE, Linux 5.14+) so that
    /// first accesses do not fault. Device runs (VM_PFNMAP/VM_IO, such as vfio BARs)
    /// cannot be prefaulted and are skipped, and so are kernel-built runs. Kernels before
    /// 5.14 lack the advice: there each page is faulted in by reading one byte of it
    /// (`process_vm_readv` on this process, so a page past the end of its file is an
    /// error, not SIGBUS). A page that cannot be faulted in fails the map, naming its
    /// run's first segment, and nothing is left mapped.
    ///
    /// ```
    /// assert!(iovmap::MapOptions::new().populate().populates());
    /// ```
    #[must_use]
    pub const fn populate(mut self) -> Self {
        self.populate = true;
        self
    }

    /// Let the view allow more than its sources: by default a read-write view of memory
    /// the process mapped read-only (a ROM, a sealed firmware image) is refused with
    /// [`Error::ExceedsSource`](crate::Error::ExceedsSource), because writes through the
    /// view would change memory the VMM chose to protect. With this option the view gets
    /// the access asked for wherever the backing file allows it (an fd opened read-only,
    /// or a write-sealed memfd, still refuses writes: `Error::NotWritable`).
    ///
    /// ```
    /// assert!(iovmap::MapOptions::new().raise_source_protection().raises_source_protection());
    /// ```
    #[must_use]
    pub const fn raise_source_protection(mut self) -> Self {
        self.raise_source_protection = true;
        self
    }

    /// Place every run by clone or fd mapping, never through udmabuf (no dma-buf, no
    /// pinned pages): [`Placement::RemapOnly`].
    ///
    /// ```
    /// assert_eq!(iovmap::MapOptions::new().remap_only().placement(), iovmap::Placement::RemapOnly);
    /// ```
    #[must_use]
    pub const fn remap_only(mut self) -> Self {
        self.placement = Placement::RemapOnly;
        self
    }

    /// Build the whole view through udmabuf, or fail saying why:
    /// [`Placement::KernelBuilt`]. The view's dma-bufs are then all of it
    /// ([`View::dmabufs`](crate::View::dmabufs)).
    ///
    /// ```
    /// assert_eq!(iovmap::MapOptions::new().kernel_built().placement(), iovmap::Placement::KernelBuilt);
    /// ```
    #[must_use]
    pub const fn kernel_built(mut self) -> Self {
        self.placement = Placement::KernelBuilt;
        self
    }

    /// The given placement policy.
    ///
    /// ```
    /// use iovmap::{MapOptions, Placement};
    /// assert_eq!(MapOptions::new().with_placement(Placement::RemapOnly), MapOptions::new().remap_only());
    /// ```
    #[must_use]
    pub const fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Which paths may place the view's runs.
    ///
    /// ```
    /// assert_eq!(iovmap::MapOptions::new().placement(), iovmap::Placement::Automatic);
    /// ```
    pub const fn placement(&self) -> Placement {
        self.placement
    }

    /// The access the view gives.
    ///
    /// ```
    /// assert_eq!(iovmap::MapOptions::new().access(), iovmap::Access::ReadWrite);
    /// ```
    pub const fn access(&self) -> Access {
        self.access
    }

    /// Whether the view's RAM runs are prefaulted.
    ///
    /// ```
    /// assert!(!iovmap::MapOptions::new().populates());
    /// ```
    pub const fn populates(&self) -> bool {
        self.populate
    }

    /// Whether the view may allow more than its source mappings.
    ///
    /// ```
    /// assert!(!iovmap::MapOptions::new().raises_source_protection());
    /// ```
    pub const fn raises_source_protection(&self) -> bool {
        self.raise_source_protection
    }
}
