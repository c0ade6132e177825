//! How a view is mapped.

/// What the caller may do through a view.
///
/// ```
/// use iovmap::{Access, MapOptions};
/// assert_eq!(Access::default(), Access::ReadWrite);
/// let scanout = MapOptions { access: Access::ReadOnly, ..MapOptions::default() };
/// # let _ = scanout;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Readable and writable; every run's backing must accept writes.
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

/// Options for [`Remapper::map_with`](crate::Remapper::map_with).
///
/// ```
/// use iovmap::{Access, MapOptions};
/// let opts = MapOptions { access: Access::ReadOnly, populate: true };
/// assert_eq!(MapOptions::default().access, Access::ReadWrite);
/// # let _ = opts;
/// ```
#[derive(Clone, Debug, Default)]
pub struct MapOptions {
    /// Read-write (default) or read-only.
    pub access: Access,
    /// Prefault the RAM runs of the view (MADV_POPULATE_READ/WRITE) so that first
    /// accesses do not fault. Device runs (VM_PFNMAP/VM_IO, such as vfio BARs) cannot be
    /// prefaulted and are skipped.
    pub populate: bool,
}
