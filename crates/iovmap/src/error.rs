//! The error type: one variant per way a map or a registration can fail, each naming the
//! offending segment and saying what to do about it.

use std::io;

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
        "segment {index} meets its neighbour off a page boundary: interior segments must start and end \
         on the page size of their mapping (4 KiB, or the huge page size), unless one continues the \
         other in the same mapping; only the first segment may start, and the last end, mid-page"
    )]
    Unaligned {
        /// Index of the offending segment in the caller's list.
        index: usize,
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

    /// A registration or unregistration was refused.
    #[error("invalid region: {reason}")]
    InvalidRegion {
        /// What is wrong with it, and what to do.
        reason: String,
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

    /// A system call failed for a reason none of the other variants covers.
    #[error("{op} failed{}: {source}", index.map(|i| format!(" for segment {i}")).unwrap_or_default())]
    Os {
        /// The operation that failed.
        op: &'static str,
        /// The segment it was working on, if any.
        index: Option<usize>,
        /// The kernel's answer.
        source: io::Error,
    },
}

impl Error {
    /// The index of the segment the error names, if it names one.
    ///
    /// ```
    /// let e = iovmap::Error::Unaligned { index: 3 };
    /// assert_eq!(e.index(), Some(3));
    /// assert_eq!(iovmap::Error::Empty.index(), None);
    /// ```
    pub fn index(&self) -> Option<usize> {
        match self {
            Error::Unaligned { index }
            | Error::NotMapped { index }
            | Error::NotShareable { index }
            | Error::NoFallback { index, .. }
            | Error::NotWritable { index }
            | Error::DeviceHole { index }
            | Error::SourceChanged { index }
            | Error::NotInGuestMemory { index } => Some(*index),
            Error::Os { index, .. } => *index,
            _ => None,
        }
    }

    /// The same error, with the segment index it names passed through `f`: adapters
    /// that build the host list from another list (guest scatter lists) name the entry of
    /// the caller's list.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    pub(crate) fn map_index(self, f: impl FnOnce(usize) -> usize) -> Error {
        match self {
            Error::Unaligned { index } => Error::Unaligned { index: f(index) },
            Error::NotMapped { index } => Error::NotMapped { index: f(index) },
            Error::NotShareable { index } => Error::NotShareable { index: f(index) },
            Error::NoFallback { index, source } => Error::NoFallback { index: f(index), source },
            Error::NotWritable { index } => Error::NotWritable { index: f(index) },
            Error::DeviceHole { index } => Error::DeviceHole { index: f(index) },
            Error::SourceChanged { index } => Error::SourceChanged { index: f(index) },
            Error::NotInGuestMemory { index } => Error::NotInGuestMemory { index: f(index) },
            Error::Os { op, index: Some(index), source } => Error::Os { op, index: Some(f(index)), source },
            other => other,
        }
    }
}
