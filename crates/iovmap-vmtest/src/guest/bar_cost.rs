//! What a view of scattered BAR pages costs against a view of scattered RAM pages, and
//! against the loop the VFIO-blob series for QEMU uses for a blob in a BAR (a PROT_NONE
//! placeholder, then one `MAP_FIXED` mmap of the device fd per iovec): map + first read
//! of every page + drop, interleaved, medians. Measured under TCG in the guest: ratios
//! only (docs/qemu.md). The check itself is that every peer shows the same bytes.

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::time::Instant;

use iovmap::Remapper;
use iovmap_vmtest::layout::{Piece, Src};
use iovmap_vmtest::mem::page;
use iovmap_vmtest::report::Checks;

use super::Guest;

/// Pages per list: a blob of QEMU's size class (the fbdev blob had 20-55 iovecs).
const PAGES: usize = 32;
const ROUNDS: usize = 31;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reads one byte of every page of `[p, p + len)`, a live mapping; returns their sum.
fn touch(p: *const u8, len: usize) -> u64 {
    // SAFETY: the callers pass the range of a live view or mapping.
    unsafe { iovmap_testkit::touch_pages(p, len) }
}

impl Guest {
    pub(super) fn bar_map_cost(&self, remapper: &Remapper, c: &mut Checks) {
        let p = page();
        // Every other page of a 64-page stretch, backwards: no two pieces adjacent (the
        // worst case for iovmap: nothing to coalesce). Then 32 adjacent pages, as a blob a
        // driver allocates in device memory in one piece is listed page by page.
        let scattered = |src: Src, base: usize| -> Vec<Piece> {
            (0..PAGES).rev().map(|i| Piece { src, off: base + 2 * i * p, len: p }).collect()
        };
        let adjacent = |src: Src, base: usize| -> Vec<Piece> {
            (0..PAGES).map(|i| Piece { src, off: base + i * p, len: p }).collect()
        };
        for (name, shape, make) in [
            ("bar-map-cost", "scattered", &scattered as &dyn Fn(Src, usize) -> Vec<Piece>),
            ("bar-map-cost-adjacent", "adjacent", &adjacent),
        ] {
            let result = self.measure(remapper, &make(Src::Bar, 0x40_0000), &make(Src::Ram, 0x40_0000));
            c.check(
                name,
                result.map(|[b, a, r]| {
                    format!(
                        "{PAGES} {shape} pages, map + first read + drop, medians of {ROUNDS} (TCG: ratios only): \
                         iovmap BAR {b:.1} us, one mmap per iovec {a:.1} us, iovmap RAM {r:.1} us; BAR/RAM {:.2}x, \
                         BAR iovmap/mmap-per-iovec {:.2}x",
                        b / r,
                        b / a
                    )
                }),
            );
        }
    }

    /// Medians (µs) of the BAR view, the mmap-per-iovec arena of the same pages, and the
    /// RAM view; an error if the BAR view and the arena read differently.
    fn measure(&self, remapper: &Remapper, bar_pieces: &[Piece], ram_pieces: &[Piece]) -> Result<[f64; 3], String> {
        let (bar, ram) = (self.iov(bar_pieces), self.iov(ram_pieces));
        let r2 = self.dev.region(2);
        // SAFETY: the device owns the fd and outlives every use below.
        let device = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.dev.device.as_raw_fd()) };
        let arena_pieces: Vec<(u64, usize)> = bar_pieces.iter().map(|q| (r2.offset + q.off as u64, q.len)).collect();
        let mut t: [Vec<f64>; 3] = Default::default();
        let mut sums = [0u64; 2];
        for _ in 0..ROUNDS {
            let s = Instant::now();
            let v = remapper.map(black_box(&bar)).map_err(|e| format!("BAR view: {e}"))?;
            sums[0] = black_box(touch(v.as_ptr(), v.len()));
            drop(v);
            t[0].push(s.elapsed().as_secs_f64() * 1e6);
            let s = Instant::now();
            let a = iovmap_peers::fd_arena(device, black_box(&arena_pieces)).map_err(|e| format!("arena: {e}"))?;
            sums[1] = black_box(touch(a.ptr(), a.len()));
            drop(a);
            t[1].push(s.elapsed().as_secs_f64() * 1e6);
            let s = Instant::now();
            let v = remapper.map(black_box(&ram)).map_err(|e| format!("RAM view: {e}"))?;
            black_box(touch(v.as_ptr(), v.len()));
            drop(v);
            t[2].push(s.elapsed().as_secs_f64() * 1e6);
        }
        if sums[0] != sums[1] {
            return Err(format!("the BAR view and the mmap-per-iovec arena read differently: {sums:?}"));
        }
        Ok(t.map(median))
    }
}
