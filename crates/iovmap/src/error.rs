//! The error types: one variant per way a map or a registration can fail, each naming the
//! offending segment or region and saying what to do about it.

use std::fmt;
use std::io;

use crate::regions::{FileId, RegionId};
use crate::udmabuf::KernelBuiltError;
use crate::vfio::RegionInfoError;

/// The operations iovmap asks the kernel for, as [`Error::Os`] and
/// [`RegionError::Os`] name them (and as fault injection, in tests, targets them).
///
/// ```
/// let op = iovmap::Operation::Clone;
/// assert_eq!(op.to_string(), "mremap");
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// The PROT_NONE reservation of the view's address range (`mmap`).
    Reserve,
    /// Unmapping the over-reserved head or tail of the reservation (`munmap`).
    Trim,
    /// Cloning a run into the reservation (`mremap` with `old_size` 0).
    Clone,
    /// Learning whether a mapping can be cloned, by a clone to an address the kernel
    /// chooses (on kernels that punch holes; see `docs/design.md`).
    CloneProbe,
    /// Mapping a registered fd into the reservation (`mmap` with `MAP_FIXED`).
    FdMap,
    /// Mapping a registered fd into a range of the reservation that a refused clone may
    /// have unmapped (`mmap` with `MAP_FIXED_NOREPLACE`, kernels that punch holes).
    RefillHole,
    /// The final protection change of the view (`mprotect`).
    Protect,
    /// Prefaulting the view's RAM runs (`madvise(MADV_POPULATE_*)`, or `process_vm_readv`
    /// of a byte of each page on kernels before 5.14).
    Populate,
    /// Asking which VMA covers an address (`ioctl(PROCMAP_QUERY)`; in errors, any VMA
    /// lookup, `/proc/self/maps` on older kernels included).
    VmaQuery,
    /// Reading `/proc/self/maps` to look up VMAs, on kernels without PROCMAP_QUERY.
    MapsRead,
    /// Counting the process's VMAs (reading `/proc/self/maps`) to stay under
    /// vm.max_map_count.
    VmaCount,
    /// `fstat`/`fstatfs` of a registered fd.
    FileStat,
    /// Duplicating a registered fd (`fcntl(F_DUPFD_CLOEXEC)`).
    DupFd,
    /// Opening `/dev/udmabuf`, once per process, for kernel-built views.
    UdmabufOpen,
    /// Building one dma-buf from a list of memfd ranges (`ioctl(UDMABUF_CREATE_LIST)`).
    UdmabufCreate,
    /// Mapping a dma-buf into the view (`mmap`).
    DmabufMap,
    /// Exporting ranges of a vfio-pci BAR as one dma-buf
    /// (`ioctl(VFIO_DEVICE_FEATURE_DMA_BUF)`, Linux 6.19+), for [`Remapper::dmabufs`](crate::Remapper::dmabufs).
    VfioDmabuf,
    /// Faulting in the pages of a source range armed with a userfaultfd (MISSING or
    /// MINOR), through the source mapping, so that its monitor places or approves them
    /// before any view exists (`madvise(MADV_POPULATE_READ)`; see
    /// [`userfaultfd`](crate::userfaultfd)).
    FaultInArmed,
}

impl Operation {
    /// Every operation fault injection can name, in a fixed order.
    ///
    /// ```
    /// assert!(iovmap::Operation::ALL.contains(&iovmap::Operation::FdMap));
    /// ```
    #[cfg(feature = "fault-injection")]
    pub const ALL: [Operation; 18] = [
        Operation::Reserve,
        Operation::Trim,
        Operation::Clone,
        Operation::CloneProbe,
        Operation::FdMap,
        Operation::RefillHole,
        Operation::Protect,
        Operation::Populate,
        Operation::VmaQuery,
        Operation::MapsRead,
        Operation::VmaCount,
        Operation::FileStat,
        Operation::DupFd,
        Operation::UdmabufOpen,
        Operation::UdmabufCreate,
        Operation::DmabufMap,
        Operation::VfioDmabuf,
        Operation::FaultInArmed,
    ];
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Reserve => "mmap (reservation)",
            Operation::Trim => "munmap (reservation trim)",
            Operation::Clone => "mremap",
            Operation::CloneProbe => "mremap (clone probe)",
            Operation::FdMap => "mmap",
            Operation::RefillHole => {
                "mmap (MAP_FIXED_NOREPLACE) into the range of a refused clone, which another thread mapped meanwhile"
            }
            Operation::Protect => "mprotect",
            Operation::Populate => "prefaulting (madvise(MADV_POPULATE_READ/WRITE), or reads before Linux 5.14)",
            Operation::VmaQuery => "VMA lookup",
            Operation::MapsRead => "VMA lookup (reading /proc/self/maps)",
            Operation::VmaCount => "reading /proc/self/maps",
            Operation::FileStat => "fstat of the fd",
            Operation::DupFd => "duplicating the fd",
            Operation::UdmabufOpen => "opening /dev/udmabuf",
            Operation::UdmabufCreate => "ioctl(UDMABUF_CREATE_LIST)",
            Operation::DmabufMap => "mmap of a dma-buf",
            Operation::VfioDmabuf => "ioctl(VFIO_DEVICE_FEATURE_DMA_BUF)",
            Operation::FaultInArmed => {
                "faulting in userfaultfd-armed source pages for their monitor (madvise(MADV_POPULATE_READ) on the source)"
            }
        })
    }
}

/// Why a view could not be built, or a region not registered.
///
/// Every error leaves nothing behind: no mapping, no fd, no partial view, and the
/// registered table as it was.
///
/// ```
/// let private = vec![0u8; 8192];
/// let iov = [libc::iovec { iov_base: private.as_ptr() as *mut _, iov_len: 4096 }];
/// let err = iovmap::map(&iov).unwrap_err();
/// assert!(matches!(err, iovmap::Error::NotShareable { index: 0 }));
/// assert!(err.to_string().contains("memfd"));
/// ```
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The list holds no bytes.
    #[error("the iovec list is empty (every segment has length 0): pass at least one non-empty segment")]
    Empty,

    /// The view would not fit in the address space.
    #[error("the view is larger than the address space allows (isize::MAX bytes): map the list in smaller views")]
    TooLarge,

    /// A boundary between two runs is not on a page boundary of both mappings.
    #[error(
        "segment {index} meets its neighbour off a page boundary of its mapping ({}): interior segments \
         must start and end on that page size, unless one continues the other in the same mapping; only \
         the first segment may start, and the last end, mid-page{}",
        PageSize(*.page_size),
        huge_page_hint(*.page_size)
    )]
    Unaligned {
        /// Index of the offending segment in the caller's list.
        index: usize,
        /// The page size of the mapping whose boundary is missed: the base page, or the
        /// huge page size of hugetlbfs memory.
        page_size: usize,
    },

    /// Part of a segment is not mapped in this process.
    #[error(
        "segment {index} covers an address that is not mapped in this process: pass host addresses of live mappings"
    )]
    NotMapped {
        /// Index of the offending segment in the caller's list.
        index: usize,
    },

    /// Part of a segment is private memory, which cannot be aliased.
    #[error(
        "segment {index} lies in private memory (MAP_PRIVATE or private anonymous), which cannot be \
         aliased without losing copied-on-write pages: back guest RAM with a memfd or a shared mapping \
         (QEMU: share=on)"
    )]
    NotShareable {
        /// Index of the offending segment in the caller's list.
        index: usize,
    },

    /// The kernel refused to clone a run and no registered fd could place it.
    #[error(
        "segment {index}: the kernel will not clone its mapping and no registered fd could be mapped in \
         its place ({source}): register the fd that backs it with Remapper::register (a vfio device fd \
         at its region offset, a hugetlbfs or memfd file); an fd that refuses MAP_FIXED cannot be used"
    )]
    NoFallback {
        /// Index of the first segment of the run.
        index: usize,
        /// The kernel's refusal (of the clone, or of the fd mapping).
        source: io::Error,
    },

    /// The kernel refused to clone a run because its mapping is sealed with mseal(2), and
    /// no registered fd could place it.
    #[error(
        "segment {index} lies in a mapping sealed with mseal(2), which the kernel will not clone (EPERM): \
         register the fd that backs it with Remapper::register, and the view maps the file instead \
         (mapping a file does not touch the sealed mapping)"
    )]
    Sealed {
        /// Index of the first segment of the run.
        index: usize,
    },

    /// Part of a segment lies in a hole of a registered device region: a vfio sparse-mmap
    /// gap such as an MSI-X table, which must never be mapped into a view.
    #[error(
        "segment {index} falls in a hole of a device region (a vfio sparse-mmap gap such as an MSI-X \
         table), which cannot be mapped: only the mmappable areas of a BAR can be part of a view"
    )]
    DeviceHole {
        /// Index of the offending segment in the caller's list.
        index: usize,
    },

    /// An entry of a guest scatter list is not (entirely) in guest memory.
    #[error(
        "entry {index} of the guest scatter list is not in guest memory (no guest RAM region covers all \
         of its guest-physical range): the guest passed a bad address; fail the request"
    )]
    NotInGuestMemory {
        /// Index of the offending entry in the guest scatter list.
        index: usize,
    },

    /// The mapping a run was cloned from changed while the view was being built: another
    /// thread unmapped, replaced or resized it. A clone that met a shorter mapping than
    /// planned would show pages that were never mapped at the segment's address, so the
    /// view is not built.
    #[error(
        "segment {index}: its mapping changed while the view was being built (another thread unmapped, \
         replaced or resized it), so the view could show memory that was never there: nothing was mapped; \
         retry once the mapping is stable"
    )]
    SourceChanged {
        /// Index of the first segment of a run cloned from the mapping that changed.
        index: usize,
    },

    /// A segment lies in a registered region whose memory is no longer what was
    /// registered: the range was unmapped and something else mapped there (another file,
    /// the same file at another offset, anonymous memory) without unregistering it. The
    /// registered fd would show the old memory, not what the address shows.
    #[error(
        "segment {index}: the mapping at {at:#x} is not the file registered there ({region}): its memory \
         was unmapped or replaced without unregistering the region; unregister a region when you unmap \
         its memory (memory hot-unplug, a remapped RAMBlock) and register the new mapping"
    )]
    StaleRegion {
        /// Index of the offending segment in the caller's list.
        index: usize,
        /// The address whose mapping does not match.
        at: usize,
        /// The registration it lies in.
        region: RegionId,
    },

    /// The view needs more mappings than vm.max_map_count leaves room for.
    #[error(
        "the view needs {needed} mappings but this process has room for {available} under \
         vm.max_map_count: raise vm.max_map_count (sysctl) or coalesce the list (adjacent pages of one \
         mapping cost a single mapping)"
    )]
    TooManyMappings {
        /// Mappings the view needs (one per run).
        needed: usize,
        /// Mappings the process can still create, minus the kernel's margin.
        available: usize,
    },

    /// A registration was refused.
    #[error("cannot register [{addr:#x}, +{len:#x}) at fd offset {offset:#x}{context}: {kind}")]
    InvalidRegion {
        /// Host address of the range (or of the area of it) at fault.
        addr: usize,
        /// Its length.
        len: usize,
        /// Its offset in the fd.
        offset: u64,
        /// Which registration it was part of.
        context: RegionContext,
        /// What is wrong with it, and what to do.
        kind: RegionError,
    },

    /// An unregistration named a region that is not registered (any more).
    #[error("{id} is not registered (unregistered already, or from another Remapper): pass an id register returned")]
    NotRegistered {
        /// The id passed.
        id: RegionId,
    },

    /// A view would allow more than the source mapping allows: a read-write view of a
    /// read-only mapping (a ROM, a sealed firmware image), or any view of an inaccessible
    /// one.
    #[error(
        "segment {index}: its source mapping is {} but the view asks for {}, which would grant access the \
         process's own mapping does not: map it with Access::ReadOnly, or ask for \
         MapOptions::raise_source_protection() if that is meant",
        prot_text(*.prot), prot_text(*.wanted)
    )]
    ExceedsSource {
        /// Index of the first segment of the run.
        index: usize,
        /// The source mapping's protection (`PROT_*`).
        prot: i32,
        /// The protection the view asks for.
        wanted: i32,
    },

    /// A run must be, or was asked to be, placed through udmabuf, and udmabuf cannot take
    /// it: a view asked for with `MapOptions::kernel_built()`, or pieces of huge-page RAM
    /// smaller than a huge page (which only udmabuf can map).
    #[error("segment {index} cannot be placed through udmabuf: {reason}")]
    KernelBuilt {
        /// Index of the first segment of the run.
        index: usize,
        /// Why.
        reason: KernelBuiltError,
    },

    /// A run's backing cannot be written, but a read-write view was asked for.
    #[error(
        "segment {index} is backed by memory that cannot be written (a read-only fd or a write-sealed \
         memfd): map it with Access::ReadOnly"
    )]
    NotWritable {
        /// Index of the first segment of the run.
        index: usize,
    },

    /// A view that can write was asked of memory a userfaultfd monitor write-protects (a
    /// live snapshot is being taken): writes through the view would bypass the monitor and
    /// be missing from the snapshot. Read-write views and dma-bufs (an importer may write
    /// them) are refused; read-only views are built.
    #[error(
        "segment {index} lies in guest memory a userfaultfd monitor write-protects (a live snapshot is \
         being taken), and writes through a view would not reach the monitor: map it with \
         Access::ReadOnly, or make the read-write view after the snapshot ends (userfaultfd::unregister \
         or declare_disarmed)"
    )]
    WriteProtected {
        /// Index of the first segment in a write-protected range.
        index: usize,
    },

    /// A system call failed for a reason none of the other variants covers.
    #[error("{op} failed{}: {source}", index.map(|i| format!(" for segment {i}")).unwrap_or_default())]
    Os {
        /// The operation that failed.
        op: Operation,
        /// The segment it was working on, if any.
        index: Option<usize>,
        /// The kernel's answer.
        source: io::Error,
    },
}

/// `PROT_*` bits in words.
fn prot_text(prot: i32) -> &'static str {
    match (prot & libc::PROT_READ != 0, prot & libc::PROT_WRITE != 0) {
        (_, true) => "read-write",
        (true, false) => "read-only",
        (false, false) => "inaccessible (PROT_NONE)",
    }
}

/// Which registration a refused range was part of.
///
/// ```
/// assert_eq!(iovmap::RegionContext::Vfio { index: 2 }.to_string(), " (vfio region 2)");
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionContext {
    /// [`Remapper::register`](crate::Remapper::register).
    Register,
    /// [`Remapper::register_vfio_region_info`](crate::Remapper::register_vfio_region_info):
    /// the vfio region with this index.
    Vfio {
        /// The vfio region index.
        index: u32,
    },
    /// `Remapper::from_guest_memory`: the guest RAM region at this guest-physical address.
    GuestMemory {
        /// Guest-physical address of the region's start.
        gpa: u64,
    },
}

impl fmt::Display for RegionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionContext::Register => Ok(()),
            RegionContext::Vfio { index } => write!(f, " (vfio region {index})"),
            RegionContext::GuestMemory { gpa } => write!(f, " (guest memory region at {gpa:#x})"),
        }
    }
}

/// What is wrong with a range given to register, in [`Error::InvalidRegion`].
///
/// ```
/// use iovmap::{Error, RegionError};
/// let mut remapper = iovmap::Remapper::new();
/// let null = std::fs::File::open("/dev/null").unwrap();
/// let e = remapper.register(std::ptr::null(), 0, &null, 0).unwrap_err();
/// assert!(matches!(e, Error::InvalidRegion { kind: RegionError::Empty, .. }));
/// assert!(e.to_string().contains("register at least one page"), "{e}");
/// ```
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The length is 0.
    #[error("its length is 0: register at least one page")]
    Empty,
    /// `addr + len` wraps the address space.
    #[error("it wraps the address space: pass the address and length of a real mapping")]
    Wraps,
    /// `offset + len` overflows a file offset.
    #[error("offset + len overflows a file offset (2^63 bytes): pass the offset the range is mapped at")]
    OffsetOverflow,
    /// Address, length or offset is not a multiple of the mapping's page size.
    #[error(
        "it is not aligned to the mapping's page size ({}): address, length and offset must all be \
         multiples of it",
        PageSize(*.page_size)
    )]
    Unaligned {
        /// The page size of the mapping (the huge page size on hugetlbfs).
        page_size: usize,
    },
    /// The file is shorter than `offset + len`.
    #[error(
        "the file is only {size:#x} bytes, shorter than offset + len = {needed:#x} (accesses past its end \
         would SIGBUS): grow the file or register a shorter range"
    )]
    FileTooShort {
        /// The file's size.
        size: u64,
        /// `offset + len`.
        needed: u64,
    },
    /// The range overlaps a registered region.
    #[error("it overlaps the region [{start:#x}, {end:#x}) registered earlier: unregister that first")]
    Overlap {
        /// Start of the registered region it overlaps.
        start: usize,
        /// End of that region.
        end: usize,
    },
    /// Part of the range is not mapped.
    #[error("{at:#x} is not mapped: map the range before registering it")]
    NotMapped {
        /// The first address found unmapped.
        at: usize,
    },
    /// Part of the range is a private mapping.
    #[error("{at:#x} is a private mapping: a fd cannot stand in for its copied-on-write pages; map it MAP_SHARED")]
    Private {
        /// The first private address.
        at: usize,
    },
    /// The mapping at an address of the range is not a mapping of the fd's file.
    #[error(
        "the mapping at {at:#x} is not the fd's file (the kernel reports {mapped} there, the fd is {fd}): pass \
         the fd the range was mapped from"
    )]
    NotTheFile {
        /// The address whose mapping is of another file.
        at: usize,
        /// The file mapped there, as the kernel reports it.
        mapped: FileId,
        /// The fd's file.
        fd: FileId,
    },
    /// The mapping at an address maps the fd's file at another offset.
    #[error(
        "the mapping at {at:#x} maps the file at offset {mapped:#x}, not at the registered {registered:#x}: \
         pass the offset the range was mapped at"
    )]
    WrongOffset {
        /// The address whose offset differs.
        at: usize,
        /// The file offset the kernel reports for `at`.
        mapped: u64,
        /// The file offset the registration gives `at`.
        registered: u64,
    },
    /// The region of a vfio device cannot be registered as described.
    #[error(transparent)]
    Vfio(#[from] RegionInfoError),
    /// A guest memory region has no host mapping.
    #[error("the guest memory region has no host address: only mapped regions can be registered")]
    NoHostAddress,
    /// A system call the registration needs failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation.
        op: Operation,
        /// The kernel's answer.
        source: io::Error,
    },
}

/// The segment index an error names, as `Option<&usize>` (`as_ref`) or
/// `Option<&mut usize>` (`as_mut`): the one list of the variants that name a segment,
/// for [`Error::index`] and `Error::map_index`, exhaustive so that a new variant must say.
macro_rules! segment_index {
    ($error:expr, $as:ident) => {
        match $error {
            Error::Unaligned { index, .. }
            | Error::NotMapped { index }
            | Error::NotShareable { index }
            | Error::NoFallback { index, .. }
            | Error::Sealed { index }
            | Error::NotWritable { index }
            | Error::ExceedsSource { index, .. }
            | Error::KernelBuilt { index, .. }
            | Error::DeviceHole { index }
            | Error::SourceChanged { index }
            | Error::StaleRegion { index, .. }
            | Error::NotInGuestMemory { index }
            | Error::WriteProtected { index } => Some(index),
            Error::Os { index, .. } => index.$as(),
            Error::Empty
            | Error::TooLarge
            | Error::TooManyMappings { .. }
            | Error::InvalidRegion { .. }
            | Error::NotRegistered { .. } => None,
        }
    };
}

impl Error {
    /// The index of the segment the error names, if it names one.
    ///
    /// ```
    /// let e = iovmap::Error::Unaligned { index: 3, page_size: 4096 };
    /// assert_eq!(e.index(), Some(3));
    /// assert_eq!(iovmap::Error::Empty.index(), None);
    /// ```
    pub fn index(&self) -> Option<usize> {
        segment_index!(self, as_ref).copied()
    }

    /// The same error, with the segment index it names passed through `f`: adapters
    /// that build the host list from another list (guest scatter lists) name the entry of
    /// the caller's list.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    pub(crate) fn map_index(mut self, f: impl FnOnce(usize) -> usize) -> Error {
        if let Some(index) = segment_index!(&mut self, as_mut) {
            *index = f(*index);
        }
        self
    }

    /// The errno at the bottom of the error, if the kernel gave one.
    ///
    /// ```
    /// let e = iovmap::Error::Os { op: iovmap::Operation::Clone, index: None, source: std::io::Error::from_raw_os_error(libc::ENOMEM) };
    /// assert_eq!(e.errno(), Some(libc::ENOMEM));
    /// ```
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } | Error::NoFallback { source, .. } => source.raw_os_error(),
            Error::InvalidRegion { kind: RegionError::Os { source, .. }, .. } => source.raw_os_error(),
            Error::Sealed { .. } => Some(libc::EPERM),
            Error::KernelBuilt {
                reason: KernelBuiltError::DeviceDenied { errno } | KernelBuiltError::Refused { errno },
                ..
            } => Some(*errno),
            _ => None,
        }
    }
}

/// A page size as people write it: `4 KiB`, `2 MiB`, `1 GiB` (bytes in hex otherwise).
struct PageSize(usize);

impl std::fmt::Display for PageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match UNITS.iter().find(|(unit, _)| self.0 >= *unit && self.0 % unit == 0) {
            Some((unit, name)) => write!(f, "{} {name}", self.0 / unit),
            None => write!(f, "{:#x} bytes", self.0),
        }
    }
}

/// What to do about pieces of huge-page memory that miss its boundaries: only udmabuf can
/// view them without a copy.
fn huge_page_hint(page_size: usize) -> &'static str {
    if page_size > crate::sys::page_size() {
        "; pieces of huge-page memory smaller than its huge pages can be viewed only through udmabuf: \
         register the memory as a sealed hugetlb memfd and map with MapOptions::kernel_built(), or copy"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_read_as_people_write_them() {
        let text = |n| PageSize(n).to_string();
        assert_eq!(text(4096), "4 KiB");
        assert_eq!(text(16384), "16 KiB");
        assert_eq!(text(2 << 20), "2 MiB");
        assert_eq!(text(1 << 30), "1 GiB");
        assert_eq!(text(0x1800), "6 KiB");
        assert_eq!(text(100), "0x64 bytes");
    }

    #[test]
    fn only_huge_pages_get_the_udmabuf_hint() {
        let base = Error::Unaligned { index: 2, page_size: crate::sys::page_size() }.to_string();
        assert!(base.starts_with("segment 2 meets") && !base.contains("udmabuf"), "{base}");
        let huge = Error::Unaligned { index: 2, page_size: 1 << 30 }.to_string();
        assert!(huge.contains("(1 GiB)") && huge.contains("MapOptions::kernel_built()"), "{huge}");
    }
}
