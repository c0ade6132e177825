//! The workloads of iovmap's benchmarks, shared by the criterion benches
//! (`benches/remap.rs`), the report tool (`src/bin/report.rs`) and the tests that
//! check each workload is what docs/benchmarks.md says it is.
//!
//! All lists are over 4 KiB pages of one memfd guest RAM (populated), generated from
//! fixed seeds with `iovmap_testkit::workloads`:
//!
//! - W1 contiguous: 262,144 adjacent 4 KiB iovecs (1 GiB): one run.
//! - W2 fragmented: 262,144 iovecs (1 GiB) in runs of 1 to 64 adjacent pages (uniform),
//!   the runs shuffled over 2 GiB of guest RAM (seed 2).
//! - W3 scattered: 60,000 single pages, no two adjacent (every other page, shuffled,
//!   seed 3): nothing coalesces; the most VMAs that still fit under vm.max_map_count.
//! - W4 BAR-like: 4,096 scattered pages of a registered BPF_F_MMAPABLE array (VM_DONTEXPAND:
//!   the kernel refuses the clone, the fd maps at any page offset).
//! - W5 small: 1, 16 and 256 scattered pages.

use iovmap_testkit::workloads::{self, Chunk};
use iovmap_testkit::{BpfArray, GuestRam, Unavailable};

/// The page size all workloads use.
pub const PAGE: usize = 4096;

/// Guest RAM for W1-W3 and W5: 2 GiB of memfd, populated and filled.
pub fn guest_ram() -> GuestRam {
    let ram = GuestRam::new(2 << 30).expect("2 GiB of memfd guest RAM");
    ram.fill(1);
    ram
}

/// A scatter list over guest RAM, with what the peers need to place it.
pub struct Workload {
    /// One iovec per entry.
    pub iovs: Vec<libc::iovec>,
    /// The same entries as (file offset, length) of the RAM's memfd, for the fd arena.
    pub pieces: Vec<(u64, usize)>,
    /// Total bytes.
    pub bytes: usize,
}

fn from_chunks(base: *const u8, chunks: &[Chunk]) -> Workload {
    let iovs = workloads::page_iovecs(base, chunks, PAGE);
    let pieces = chunks.iter().flat_map(|c| (c.page..c.page + c.pages).map(|p| ((p * PAGE) as u64, PAGE))).collect();
    Workload { bytes: iovs.len() * PAGE, iovs, pieces }
}

/// W1: `n` adjacent pages from the start of guest RAM (262,144 in the benchmark).
pub fn contiguous(ram: &GuestRam, n: usize) -> Workload {
    from_chunks(ram.ptr(), &[Chunk { page: 0, pages: n }])
}

/// W2: `n` pages in runs of 1..=64 adjacent pages scattered over all of guest RAM.
pub fn fragmented(ram: &GuestRam, n: usize) -> Workload {
    from_chunks(ram.ptr(), &workloads::fragmented(ram.len() / PAGE, n, 64, 2))
}

/// W3 and W5: `n` single pages, no two adjacent.
pub fn scattered(ram: &GuestRam, n: usize) -> Workload {
    from_chunks(ram.ptr(), &workloads::scattered(n, 3))
}

/// W4: a registered BPF array of 8,192 pages and 4,096 scattered pages of it.
pub struct BarLike {
    /// The array (its fd and mapping).
    pub array: BpfArray,
    /// A remapper with the array registered.
    pub remapper: iovmap::Remapper,
    /// The list.
    pub list: Workload,
}

/// W4, or why this machine cannot have it (BPF needs CAP_BPF).
pub fn bar_like() -> Result<BarLike, Unavailable> {
    let array = BpfArray::new(8192)?;
    // SAFETY: the array's mapping is writable and not shared yet.
    unsafe { iovmap_testkit::fill(array.map.ptr(), array.map.len(), 4, 0) };
    let mut remapper = iovmap::Remapper::new();
    remapper
        .register(array.map.ptr(), array.map.len(), array.fd(), 0)
        .map_err(|e| Unavailable(format!("registering the BPF array: {e}")))?;
    let list = from_chunks(array.map.ptr(), &workloads::scattered(4096, 4));
    Ok(BarLike { array, remapper, list })
}

/// Medians of `a` and `b` (milliseconds) over `rounds` rounds that run one after the
/// other, a then b. Criterion measures one peer after another, so drift on a shared
/// machine (seen here: the same benchmark 5% apart in two runs a minute apart) lands in
/// ratios between peers; interleaving cancels it for ratios close to 1.
pub fn interleaved<A, B>(rounds: usize, mut a: impl FnMut() -> A, mut b: impl FnMut() -> B) -> (f64, f64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        let out = a();
        ta.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
        let t = std::time::Instant::now();
        let out = b();
        tb.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    (median(ta), median(tb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workloads have the shape docs/benchmarks.md gives them, checked on the real
    /// kernel (runs are what the planner makes of them).
    #[test]
    fn workloads_are_what_the_docs_say() {
        let ram = GuestRam::new(2 << 30).unwrap(); // unfilled: shapes only
        let r = iovmap::Remapper::new();
        let runs = |w: &Workload| r.plan(&w.iovs).unwrap().runs.len();
        let w1 = contiguous(&ram, 262_144);
        assert_eq!((w1.iovs.len(), w1.bytes, runs(&w1)), (262_144, 1 << 30, 1));
        let w2 = fragmented(&ram, 262_144);
        let w2_runs = runs(&w2);
        assert_eq!(w2.iovs.len(), 262_144);
        assert!((7_000..9_500).contains(&w2_runs), "W2 has {w2_runs} runs");
        let w3 = scattered(&ram, 60_000);
        assert_eq!((w3.iovs.len(), runs(&w3)), (60_000, 60_000));
        assert_eq!(w3.pieces.len(), 60_000);
        for n in [1, 16, 256] {
            assert_eq!(runs(&scattered(&ram, n)), n);
        }
    }

    #[test]
    fn the_naive_loop_fails_where_iovmap_falls_back() {
        let Ok(w4) = bar_like() else {
            eprintln!("SKIP: no BPF array (needs CAP_BPF)");
            return;
        };
        let e = iovmap_peers::naive_map(&w4.list.iovs).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        let view = w4.remapper.map(&w4.list.iovs).unwrap();
        assert_eq!(view.stats().fd_mapped, 4096);
        let again = w4.remapper.map(&w4.list.iovs).unwrap();
        assert_eq!(again.stats().syscalls, 4096, "one syscall per run once the refusal is known");
    }
}
