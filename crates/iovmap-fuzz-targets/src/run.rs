//! The one place that reads [`iovmap::plan::Run`]: the rest of the crate sees a plain
//! struct, so a change of `Run`'s representation touches this file only.

use iovmap::plan::{FdSource, Run};

/// Everything the targets compare about a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// Offset of the run in the reservation.
    pub dst: usize,
    /// Bytes mapped.
    pub len: usize,
    /// Page-aligned source address of the first mapped byte.
    pub src: usize,
    /// Whether one clone of `[src, src + len)` places it.
    pub clone: bool,
    /// Identifies the run's source VMA within one plan: equal for runs from the same VMA.
    pub vma: usize,
    /// The registered region and file offset that can place it.
    pub fd: Option<FdSource>,
    /// Its page size.
    pub page_size: usize,
    /// Protection of its source VMA.
    pub prot: i32,
    /// Index of its first segment.
    pub first: usize,
}

/// Reads a run.
pub fn info(r: &Run) -> RunInfo {
    RunInfo {
        dst: r.dst(),
        len: r.len(),
        src: r.src(),
        clone: r.clonable(),
        vma: r.vma(),
        fd: r.fd(),
        page_size: r.page_size(),
        prot: r.prot(),
        first: r.first(),
    }
}
