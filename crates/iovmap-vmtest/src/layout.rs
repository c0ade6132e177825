//! Where the guest test puts what: the layout of BAR2 (the host's backing file) and of the
//! memfd RAM, the scatter lists of the functional checks, and the exact image the BAR must
//! hold when the guest is done, which `host-check` compares with the backing file.

use std::ops::Range;

use crate::mem::page;
use crate::pattern;

/// The size run.sh gives the ivshmem BAR (its host backing file).
pub const BAR_SIZE: u64 = 32 << 20;
/// The smallest BAR the layout fits in.
pub const BAR_MIN: u64 = 16 << 20;
/// Bytes 0..16 of the BAR, written by the guest through its BAR mapping first.
pub const MAGIC: &[u8; 16] = b"IOVMAP-VMTEST-01";
/// Where the guest writes its verdict (`PASS` or `FAIL`) last.
pub const VERDICT_AT: u64 = 16;
/// The BAR part the functional checks use (filled with [`SEED_BAR`] first).
pub const BAR_FUNC: Range<u64> = 0x1_0000..0x80_0000;
/// The BAR part the stress test reads (filled with [`SEED_BAR_STRESS`], never written after).
pub const BAR_STRESS: Range<u64> = 0x80_0000..0x100_0000;
/// Size of the memfd guest RAM.
pub const RAM_SIZE: usize = 16 << 20;
/// The RAM part the functional checks use (filled with [`SEED_RAM`]).
pub const RAM_FUNC: Range<usize> = 0..0x80_0000;
/// The RAM part the stress test reads (filled with [`SEED_RAM_STRESS`]).
pub const RAM_STRESS: Range<usize> = 0x80_0000..0x100_0000;

/// Initial BAR content (functional part).
pub const SEED_BAR: u64 = 0xba5e_0001;
/// Initial RAM content (functional part).
pub const SEED_RAM: u64 = 0xba5e_0002;
/// Written through the BAR or RAM mapping, then read through a view.
pub const SEED_VIA_SOURCE: u64 = 0xba5e_0003;
/// Written through a view, then read through the BAR or RAM mapping.
pub const SEED_VIA_VIEW: u64 = 0xba5e_0004;
/// The stress part of the BAR.
pub const SEED_BAR_STRESS: u64 = 0xba5e_0005;
/// The stress part of the RAM.
pub const SEED_RAM_STRESS: u64 = 0xba5e_0006;

/// Which mapping a piece of a scatter list comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// The BAR mapping (offsets are BAR offsets, i.e. backing file offsets).
    Bar,
    /// The memfd RAM mapping.
    Ram,
}

/// One segment of a scatter list: `len` bytes at `off` of its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The source mapping.
    pub src: Src,
    /// Offset in the source.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
}

const fn bar(off: usize, len: usize) -> Piece {
    Piece { src: Src::Bar, off, len }
}

const fn ram(off: usize, len: usize) -> Piece {
    Piece { src: Src::Ram, off, len }
}

/// Where the guest writes its page size (u32, little endian) into the header page, so
/// that `host-check` (on a host whose pages may differ) builds the same lists.
pub const PAGE_AT: u64 = 20;

/// The first read-write view, for pages of `p` bytes: starts mid-page in the BAR, ends
/// mid-page in RAM; BAR pieces out of order, two adjacent BAR pieces (one run), RAM
/// between them. Its BAR bytes end up written through the view ([`SEED_VIA_VIEW`]). The
/// lists of this module put their pieces at anchors 1 MiB apart (or 64 KiB, for the
/// first), so that the pieces of one list never share a page with pages up to 64 KiB.
pub fn rw_list(p: usize) -> Vec<Piece> {
    vec![
        bar(0x1_0000 + 0x123, 4 * p - 0x123),
        ram(0x20_0000, 2 * p),
        bar(0x10_0000, p),
        bar(0x10_0000 + p, 2 * p),
        ram(0x10_0000, 3 * p),
        bar(0x20_0000, p),
        ram(0x30_0000, p),
        bar(0x20_0000 - p, p),
        ram(0x40_0000, p / 2),
    ]
}

/// A later view of the same Remapper (the BAR's refusal is known by then). Its BAR bytes
/// end up written through the view after the region is unregistered.
pub fn second_list(p: usize) -> Vec<Piece> {
    vec![
        ram(0x50_0000, 2 * p),
        bar(0x30_0000, 8 * p),
        ram(0x58_0000, p),
        bar(0x40_0000, p),
        bar(0x50_0000, 3 * p),
        ram(0x5c_0000, p),
    ]
}

/// The read-only view. Its BAR bytes end up written through the BAR mapping
/// ([`SEED_VIA_SOURCE`]) while the view is live.
pub fn ro_list(p: usize) -> Vec<Piece> {
    vec![bar(0x60_0000, 2 * p), ram(0x60_0000, p), bar(0x68_0000, p), bar(0x70_0000, 4 * p), ram(0x68_0000, 2 * p)]
}

/// The iovecs of `list` over the BAR mapped at `bar` and the RAM mapped at `ram`.
pub fn iovecs(list: &[Piece], bar: *mut u8, ram: *mut u8) -> Vec<libc::iovec> {
    list.iter()
        .map(|p| {
            let base = if p.src == Src::Bar { bar } else { ram };
            libc::iovec { iov_base: base.wrapping_add(p.off).cast(), iov_len: p.len }
        })
        .collect()
}

/// What iovmap should report for a list whose BAR is registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    /// Non-empty segments.
    pub segments: usize,
    /// Runs after coalescing: a piece continues the previous one when it is the next
    /// bytes of the same source.
    pub runs: usize,
    /// Runs from the BAR (fd-mapped).
    pub bar_runs: usize,
    /// Runs from RAM (cloned).
    pub ram_runs: usize,
}

/// The runs iovmap makes of `list` (each source is one mapping).
///
/// ```
/// use iovmap_vmtest::layout::{expect, rw_list, Expect};
/// assert_eq!(expect(&rw_list(4096)), Expect { segments: 9, runs: 8, bar_runs: 4, ram_runs: 4 });
/// ```
pub fn expect(list: &[Piece]) -> Expect {
    let mut e = Expect::default();
    let mut prev: Option<Piece> = None;
    for p in list.iter().filter(|p| p.len > 0) {
        e.segments += 1;
        let continues = prev.is_some_and(|q| q.src == p.src && q.off + q.len == p.off);
        if !continues {
            e.runs += 1;
            match p.src {
                Src::Bar => e.bar_runs += 1,
                Src::Ram => e.ram_runs += 1,
            }
        }
        prev = Some(*p);
    }
    e
}

/// The seed of the byte at `off` of `src` before any write, for the parts of the layout
/// that hold a single pattern: the functional and stress parts.
pub fn initial_seed(src: Src, off: usize) -> Option<u64> {
    let o = off as u64;
    match src {
        Src::Bar if BAR_FUNC.contains(&o) => Some(SEED_BAR),
        Src::Bar if BAR_STRESS.contains(&o) => Some(SEED_BAR_STRESS),
        Src::Ram if RAM_FUNC.contains(&off) => Some(SEED_RAM),
        Src::Ram if RAM_STRESS.contains(&off) => Some(SEED_RAM_STRESS),
        _ => None,
    }
}

/// A small deterministic generator (splitmix64, the testkit's), so every run builds the
/// same lists.
pub use iovmap_testkit::workloads::Rng;

/// A fragmented blob: `n` single pages alternating between random BAR pages of the
/// functional part and random RAM pages of the functional part.
///
/// ```
/// let l = iovmap_vmtest::layout::fragmented_list(1000, 1);
/// assert_eq!(l.len(), 1000);
/// assert!(iovmap_vmtest::layout::expect(&l).runs > 900);
/// ```
pub fn fragmented_list(n: usize, seed: u64) -> Vec<Piece> {
    let mut rng = Rng::new(seed);
    let p = page();
    let bar_pages = ((BAR_FUNC.end - BAR_FUNC.start) as usize) / p;
    let ram_pages = (RAM_FUNC.end - RAM_FUNC.start) / p;
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                bar(BAR_FUNC.start as usize + rng.below(bar_pages) * p, p)
            } else {
                ram(RAM_FUNC.start + rng.below(ram_pages) * p, p)
            }
        })
        .collect()
}

/// A stress view: 2 to 6 pieces of 1 to 4 pages from the stress parts, BAR and RAM
/// mixed, at least one from the BAR (a run the kernel refuses to clone). With
/// `ram_first`, the list starts with a RAM piece, so the BAR's refused clone punches its
/// hole in a reservation that already holds a placed run.
pub fn stress_list(rng: &mut Rng, ram_first: bool) -> Vec<Piece> {
    let n = 2 + rng.below(5);
    let must_bar = if ram_first { 1 } else { rng.below(n) };
    let p = page();
    (0..n)
        .map(|i| {
            let pages = 1 + rng.below(4);
            let from_bar = if ram_first && i == 0 { false } else { i == must_bar || rng.below(2) == 0 };
            if from_bar {
                let span = (BAR_STRESS.end - BAR_STRESS.start) as usize / p - pages;
                bar(BAR_STRESS.start as usize + rng.below(span) * p, pages * p)
            } else {
                let span = (RAM_STRESS.end - RAM_STRESS.start) / p - pages;
                ram(RAM_STRESS.start + rng.below(span) * p, pages * p)
            }
        })
        .collect()
}

fn in_list(list: &[Piece], off: u64) -> bool {
    list.iter().any(|p| p.src == Src::Bar && (p.off as u64..(p.off + p.len) as u64).contains(&off))
}

/// The byte the BAR must hold at `off` when a guest with pages of `p` bytes is done (the
/// verdict bytes aside: see [`VERDICT_AT`]).
pub fn final_bar_byte(off: u64, p: usize) -> u8 {
    if off < MAGIC.len() as u64 {
        MAGIC[off as usize]
    } else if (PAGE_AT..PAGE_AT + 4).contains(&off) {
        (p as u32).to_le_bytes()[(off - PAGE_AT) as usize]
    } else if in_list(&rw_list(p), off) || in_list(&second_list(p), off) {
        pattern::byte(SEED_VIA_VIEW, off)
    } else if in_list(&ro_list(p), off) {
        pattern::byte(SEED_VIA_SOURCE, off)
    } else if BAR_FUNC.contains(&off) {
        pattern::byte(SEED_BAR, off)
    } else if BAR_STRESS.contains(&off) {
        pattern::byte(SEED_BAR_STRESS, off)
    } else {
        0
    }
}

/// The image [`final_bar_byte`] describes, `len` bytes long (verdict bytes zero), built
/// piece by piece.
pub fn expected_image(len: usize, p: usize) -> Vec<u8> {
    let mut img = vec![0u8; len];
    let fill = |img: &mut Vec<u8>, range: Range<u64>, seed: u64| {
        let (s, e) = (range.start as usize, (range.end as usize).min(img.len()));
        if s < e {
            // SAFETY: `[s, e)` lies inside `img`, which no reference covers during the call.
            unsafe { pattern::fill(img.as_mut_ptr().add(s), e - s, seed, range.start) };
        }
    };
    let n = MAGIC.len().min(len);
    img[..n].copy_from_slice(&MAGIC[..n]);
    if len >= PAGE_AT as usize + 4 {
        img[PAGE_AT as usize..PAGE_AT as usize + 4].copy_from_slice(&(p as u32).to_le_bytes());
    }
    fill(&mut img, BAR_FUNC, SEED_BAR);
    fill(&mut img, BAR_STRESS, SEED_BAR_STRESS);
    let bar_pieces = |list: Vec<Piece>| list.into_iter().filter(|p| p.src == Src::Bar);
    for q in bar_pieces(ro_list(p)) {
        fill(&mut img, q.off as u64..(q.off + q.len) as u64, SEED_VIA_SOURCE);
    }
    for q in bar_pieces(rw_list(p)).chain(bar_pieces(second_list(p))) {
        fill(&mut img, q.off as u64..(q.off + q.len) as u64, SEED_VIA_VIEW);
    }
    img
}

/// Compares a BAR image (the backing file after the guest ran, or the BAR itself) with
/// [`expected_image`] for the page size the guest wrote at [`PAGE_AT`], and checks the
/// verdict bytes say `PASS`. Returns a summary, or what differs.
///
/// # Errors
/// A description of the first difference in each part of the layout and how many bytes
/// differ there.
pub fn check_image(image: &[u8]) -> Result<String, String> {
    if (image.len() as u64) < BAR_MIN {
        return Err(format!("the image is {:#x} bytes, smaller than the layout ({BAR_MIN:#x})", image.len()));
    }
    let verdict = VERDICT_AT as usize..VERDICT_AT as usize + 4;
    let mut problems = Vec::new();
    if &image[verdict.clone()] != b"PASS" {
        problems.push(format!(
            "verdict bytes at {VERDICT_AT:#x} are {:?}, not \"PASS\"",
            String::from_utf8_lossy(&image[verdict.clone()])
        ));
    }
    let p = u32::from_le_bytes(image[PAGE_AT as usize..PAGE_AT as usize + 4].try_into().expect("4 bytes")) as usize;
    if !p.is_power_of_two() || !(0x1000..=0x1_0000).contains(&p) {
        problems.push(format!("page size at {PAGE_AT:#x} is {p:#x}, not a page size from 4 KiB to 64 KiB"));
        return Err(problems.join("; "));
    }
    let mut want = expected_image(image.len(), p);
    want[verdict.clone()].copy_from_slice(&image[verdict]);
    let parts: [(&str, Range<u64>); 4] = [
        ("header page", 0..BAR_FUNC.start),
        ("functional part", BAR_FUNC),
        ("stress part", BAR_STRESS),
        ("rest (never written)", BAR_STRESS.end..image.len() as u64),
    ];
    for (name, range) in parts {
        let (s, e) = (range.start as usize, range.end as usize);
        if image[s..e] == want[s..e] {
            continue;
        }
        let bad: Vec<usize> = (s..e).filter(|&i| image[i] != want[i]).collect();
        let first = bad[0];
        problems.push(format!(
            "{name}: {} bytes differ, first at {first:#x}: {:#04x}, want {:#04x}",
            bad.len(),
            image[first],
            want[first]
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "all {:#x} bytes as the guest must leave them (magic, {}K pages, verdict PASS, patterns, zeros)",
            image.len(),
            p >> 10
        ))
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page sizes of Linux on x86_64 and arm64.
    const PAGES: [usize; 3] = [0x1000, 0x4000, 0x1_0000];

    fn overlaps(a: &Piece, b: &Piece, p: usize) -> bool {
        a.src == b.src && a.off / p <= (b.off + b.len - 1) / p && b.off / p <= (a.off + a.len - 1) / p
    }

    fn all_lists(p: usize) -> Vec<Piece> {
        rw_list(p).into_iter().chain(second_list(p)).chain(ro_list(p)).collect()
    }

    #[test]
    fn the_lists_stay_in_the_functional_parts_and_never_share_a_page() {
        for p in PAGES {
            lists_stay_apart(p);
        }
    }

    fn lists_stay_apart(p: usize) {
        let all = all_lists(p);
        for p in &all {
            let inside = match p.src {
                Src::Bar => BAR_FUNC.contains(&(p.off as u64)) && (p.off + p.len) as u64 <= BAR_FUNC.end,
                Src::Ram => p.off + p.len <= RAM_FUNC.end,
            };
            assert!(inside, "{p:?}");
        }
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                // Only the two adjacent BAR pieces of rw_list touch, and they do not share a page.
                assert!(!overlaps(a, b, p), "{a:?} {b:?} with pages of {p:#x}");
            }
        }
    }

    #[test]
    fn expected_runs_follow_coalescing() {
        for p in PAGES {
            assert_eq!(expect(&rw_list(p)), Expect { segments: 9, runs: 8, bar_runs: 4, ram_runs: 4 });
            assert_eq!(expect(&second_list(p)), Expect { segments: 6, runs: 6, bar_runs: 3, ram_runs: 3 });
            assert_eq!(expect(&ro_list(p)), Expect { segments: 5, runs: 5, bar_runs: 3, ram_runs: 2 });
            assert_eq!(expect(&[bar(0, p), bar(p, p), ram(2 * p, p), ram(3 * p, p), bar(2 * p, p)]).runs, 3);
        }
    }

    #[test]
    fn stress_lists_hold_a_bar_piece_and_stay_in_the_stress_parts() {
        let mut rng = Rng::new(5);
        for i in 0..2000 {
            let l = stress_list(&mut rng, i % 2 == 0);
            assert!((2..=6).contains(&l.len()));
            assert!(l.iter().any(|p| p.src == Src::Bar));
            if i % 2 == 0 {
                assert_eq!(l[0].src, Src::Ram);
            }
            for p in &l {
                match p.src {
                    Src::Bar => assert!(BAR_STRESS.start as usize <= p.off && (p.off + p.len) as u64 <= BAR_STRESS.end),
                    Src::Ram => assert!(RAM_STRESS.start <= p.off && p.off + p.len <= RAM_STRESS.end),
                }
                assert_eq!(initial_seed(p.src, p.off), initial_seed(p.src, p.off + p.len - 1));
            }
        }
    }

    fn good_image(p: usize) -> Vec<u8> {
        let mut img = expected_image(BAR_SIZE as usize, p);
        img[VERDICT_AT as usize..VERDICT_AT as usize + 4].copy_from_slice(b"PASS");
        img
    }

    #[test]
    fn the_expected_image_is_what_final_bar_byte_says() {
        for p in PAGES {
            let img = expected_image(BAR_SIZE as usize, p);
            let mut rng = Rng::new(3);
            let edges = all_lists(p).into_iter().flat_map(|q| [q.off, q.off + q.len - 1, q.off + q.len]);
            let samples = (0..20_000)
                .map(|_| rng.below(BAR_SIZE as usize))
                .chain(edges)
                .chain([0, 15, 16, 19, 20, 23, 24, 0xffff, 0x10000]);
            for off in samples {
                assert_eq!(img[off], final_bar_byte(off as u64, p), "at {off:#x} with pages of {p:#x}");
            }
        }
    }

    #[test]
    fn the_host_check_accepts_the_image_and_names_any_difference() {
        for p in PAGES {
            let mut img = good_image(p);
            assert!(check_image(&img).is_ok());
            // A byte written through a view that did not land.
            let off = rw_list(p)[3].off + 5;
            img[off] = pattern::byte(SEED_BAR, off as u64);
            let e = check_image(&img).unwrap_err();
            assert!(e.contains("functional part: 1 bytes differ") && e.contains(&format!("{off:#x}")), "{e}");
            // A stray write past the layout, and a failing verdict.
            let mut img = good_image(p);
            img[(BAR_SIZE - 1) as usize] = 1;
            img[VERDICT_AT as usize..VERDICT_AT as usize + 4].copy_from_slice(b"FAIL");
            let e = check_image(&img).unwrap_err();
            assert!(e.contains("rest (never written): 1 bytes differ") && e.contains("\"FAIL\""), "{e}");
            assert!(check_image(&img[..0x1000]).is_err());
        }
        // The page size the guest wrote decides the lists: a 16K image is not a 4K one.
        let mut img = good_image(0x4000);
        img[PAGE_AT as usize..PAGE_AT as usize + 4].copy_from_slice(&0x1000u32.to_le_bytes());
        assert!(check_image(&img).is_err());
    }
}
