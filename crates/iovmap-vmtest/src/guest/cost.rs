//! What a map call costs in syscalls on this kernel.

use iovmap_vmtest::layout::{self, Piece, Src};

/// What a map call costs in syscalls beyond one mmap/mremap per run, as iovmap states it
/// for the two kinds of kernel (its own tests count the same way).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cost {
    /// This kernel unmaps the destination of a refused clone (Linux before 6.17).
    pub(super) holes: bool,
}

impl Cost {
    /// Where the kernel keeps the destination, the first view of a registered BAR learns
    /// the refusal by a refused clone; where it punches holes, registration learned it.
    pub(super) fn first_refusal(self) -> usize {
        usize::from(!self.holes)
    }

    /// Where the kernel punches holes, iovmap learns once per call whether each
    /// unregistered mapping clones, by a clone to an address the kernel chooses: here the
    /// memfd RAM (one VMA), when the list has RAM pieces.
    pub(super) fn probes(self, list: &[Piece]) -> usize {
        usize::from(self.holes && list.iter().any(|p| p.src == Src::Ram))
    }

    /// The syscalls a view of `list` costs, `first` for the first view of a Remapper.
    pub(super) fn syscalls(self, list: &[Piece], first: bool) -> usize {
        layout::expect(list).runs + if first { self.first_refusal() } else { 0 } + self.probes(list)
    }

    pub(super) fn explain(self, list: &[Piece], first: bool) -> String {
        format!(
            "runs {} + first refusal {} + RAM clone probe {} ({})",
            layout::expect(list).runs,
            if first { self.first_refusal() } else { 0 },
            self.probes(list),
            if self.holes {
                "this kernel punches holes: the BAR's refusal is learned at registration, unregistered RAM is probed \
                 once per call"
            } else {
                "this kernel keeps the destination: the first view learns the BAR's refusal by a refused clone"
            }
        )
    }
}
