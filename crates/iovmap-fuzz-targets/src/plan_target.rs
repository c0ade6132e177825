//! The `plan` target: a fuzzed table of mappings and registered regions, a fuzzed list,
//! the planner against the reference model ([`crate::model`]).
//!
//! The input is decoded into a *table* laid out so that the fuzzer reaches every corner
//! cheaply: VMAs one after the other from a chosen base address (low, typical, or just
//! under the top of the address space), each aligned to its page size, with gaps;
//! registered regions over them (files, offsets, holes); then a list whose segments are
//! expressed relative to the table (a page of a VMA or region, the end of the previous
//! segment, the next file offset of the previous segment in another alias...) or raw.
//! A `raw` table instead takes VMA bounds as given (unaligned, empty, near the top),
//! which no kernel reports but a `VmaSource` could.

use arbitrary::{Arbitrary, Unstructured};
use iovmap::plan::{FileId, RegionSpan, Vma};

/// Every VMA maps one notional file, at file offset = address (so any region over any
/// stretch of VMAs is consistent), unless it was replaced by another file's mapping.
const MAPPED: FileId = FileId { dev: 7, ino: 7 };
const REPLACED: FileId = FileId { dev: 7, ino: 8 };

use crate::model::{self, Known, Table};

const MAX_VMAS: usize = 8;
const MAX_REGIONS: usize = 6;
const MAX_SEGMENTS: usize = 24;
const FILES: usize = 3;

/// Page sizes a VMA or file may have (as shifts): mostly the base page.
fn page_shift(sel: u8, base_shift: u32) -> u32 {
    let shift = match sel % 8 {
        0..=4 => 12,
        5 => 14,
        6 => 16,
        _ => 21,
    };
    shift.max(base_shift)
}

#[derive(Arbitrary, Debug)]
struct VmaSpec {
    /// Unmapped pages before it (0: adjacent to the previous VMA).
    gap: u8,
    pages: u8,
    page: u8,
    private: bool,
    /// Low 3 bits: `PROT_*`; high 5 bits all set (1 in 32): the mapping was replaced by
    /// another file's since the regions over it were registered (they are stale there).
    prot: u8,
    /// The kernel refuses to clone it (a device or hugetlbfs mapping).
    refuses: bool,
}

#[derive(Arbitrary, Debug)]
struct RegionSpec {
    /// Which VMA it starts in, and how many of its own pages in.
    vma: u8,
    skip: u8,
    pages: u8,
    file: u8,
    /// File offset, in its pages.
    offset: u16,
    hole: bool,
    /// What the map path knows of it before the call (mod 3); 252 and up (1 in 64):
    /// registered at the wrong offset (what a registration made before a remap records);
    /// bit 6: a memfd udmabuf takes.
    known: u8,
    /// Registered before the VMAs under it were replaced by ones with larger pages: its
    /// alignment is its file's only.
    stale: bool,
}

#[derive(Arbitrary, Debug)]
enum RawVma {
    Bounds { start: u64, len: u64, private: bool, shift: u8, refuses: bool },
}

#[derive(Arbitrary, Debug)]
enum Addr {
    /// Page `page` of VMA `vma`, `byte` bytes off.
    InVma { vma: u8, page: u16, byte: i16 },
    /// Page `page` of region `region`, `byte` bytes off.
    InRegion { region: u8, page: u16, byte: i16 },
    /// Where the previous segment ended, `byte` bytes off.
    AfterPrevious { byte: i16 },
    /// Where the previous segment started (a duplicate).
    SameAsPrevious,
    /// The address, in another region of the same file, of the file offset where the
    /// previous segment ended (a hop between aliases).
    NextFileOffset { pick: u8 },
    /// Anything at all.
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Pages(u8),
    PagesAndBytes {
        pages: u8,
        bytes: i16,
    },
    Bytes(u16),
    /// To the end of the mapping the segment starts in, `byte` bytes off.
    ToVmaEnd {
        byte: i16,
    },
    Zero,
    Raw(u64),
    /// Whatever brings the list's total to `minus` bytes short of `usize::MAX`.
    FillToMax {
        minus: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct SegSpec {
    addr: Addr,
    len: Len,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Base page: 4 KiB, 16 KiB or 64 KiB.
    base: u8,
    /// Where the VMAs start: low, typical, or just under the top of the address space.
    place: u8,
    vmas: Vec<VmaSpec>,
    raw: Option<Vec<RawVma>>,
    /// Page size of each file (as a selector).
    files: [u8; FILES],
    regions: Vec<RegionSpec>,
    segments: Vec<SegSpec>,
    holes: bool,
}

/// The decoded world: the table, what refuses the clone, and the list.
#[derive(Debug)]
pub struct World {
    /// VMAs, disjoint.
    pub vmas: Vec<Vma>,
    /// Whether the kernel refuses to clone each VMA.
    pub refuses: Vec<bool>,
    /// Registered regions, sorted, disjoint.
    pub regions: Vec<RegionSpan>,
    /// What each region is known to do before the call.
    pub known: Vec<Known>,
    /// The list, as (address, length).
    pub list: Vec<(usize, usize)>,
    /// Base page.
    pub base_page: usize,
    /// Whether the kernel punches holes.
    pub holes: bool,
    /// Whether a region is aligned below the pages of a VMA it covers, which
    /// registration refuses but a mapping changed since can leave behind.
    pub stale: bool,
}

fn offset_by(at: usize, by: i64) -> usize {
    (at as i64).wrapping_add(by) as usize
}

fn build_vmas(input: &Input, base_shift: u32) -> (Vec<Vma>, Vec<bool>) {
    let mut vmas = Vec::new();
    let mut refuses = Vec::new();
    if let Some(raw) = &input.raw {
        for RawVma::Bounds { start, len, private, shift, refuses: r } in raw.iter().take(MAX_VMAS) {
            let start = *start as usize;
            let end = start.saturating_add(*len as usize);
            // Kernels never report overlapping VMAs: skip any that would.
            if vmas.iter().any(|v: &Vma| v.start < end && start < v.end) {
                continue;
            }
            let page_size = 1usize << (u32::from(*shift) % 40).max(base_shift);
            vmas.push(Vma { start, end, prot: 3, shared: !private, page_size, offset: start as u64, file: MAPPED });
            refuses.push(*r);
        }
        return (vmas, refuses);
    }
    let mut at: usize = match input.place % 4 {
        0 => 0x10000,
        1 => 0x7f00_0000_0000,
        // Near the top: the last VMA may end at the last page of the address space.
        _ => usize::MAX - (0x100 << 21) + 1,
    };
    for spec in input.vmas.iter().take(MAX_VMAS) {
        let page = 1usize << page_shift(spec.page, base_shift);
        let Some(start) =
            at.checked_add(usize::from(spec.gap % 4) * page).and_then(|s| s.checked_next_multiple_of(page))
        else {
            break;
        };
        let pages = usize::from(spec.pages % 32) + 1;
        let Some(end) = start.checked_add(pages * page) else { break };
        let prot = i32::from(spec.prot % 8) | libc::PROT_READ;
        let file = if spec.prot & 0xf8 == 0xf8 { REPLACED } else { MAPPED };
        vmas.push(Vma { start, end, prot, shared: !spec.private, page_size: page, offset: start as u64, file });
        refuses.push(spec.refuses);
        at = end;
    }
    (vmas, refuses)
}

/// The regions, what each is known to do, and whether any is stale (aligned below the
/// pages of a VMA it covers).
fn build_regions(input: &Input, vmas: &[Vma], base_shift: u32) -> (Vec<RegionSpan>, Vec<Known>, bool) {
    let mut regions: Vec<(RegionSpan, Known)> = Vec::new();
    if vmas.is_empty() {
        return (Vec::new(), Vec::new(), false);
    }
    'spec: for spec in input.regions.iter().take(MAX_REGIONS) {
        let file = usize::from(spec.file) % FILES;
        let vma = vmas[usize::from(spec.vma) % vmas.len()];
        // As registration does: the region's page size is the largest of its file's and
        // of the VMAs it covers, and its address, length and offset are aligned to it.
        let mut page = 1usize << page_shift(input.files[file], base_shift);
        let (start, end) = loop {
            let Some(start) = vma
                .start
                .checked_next_multiple_of(page)
                .and_then(|s| s.checked_add(usize::from(spec.skip % 16) * page))
            else {
                continue 'spec;
            };
            let Some(end) = start.checked_add((usize::from(spec.pages % 32) + 1) * page) else { continue 'spec };
            let covered = vmas.iter().filter(|v| v.start < end && start < v.end).map(|v| v.page_size).max();
            match covered {
                Some(p) if p > page && !spec.stale => page = p,
                _ => break (start, end),
            }
        };
        let offset = u64::from(spec.offset) * page as u64;
        if regions.iter().any(|(r, _)| r.start < end && start < r.end) {
            continue;
        }
        let misregistered = if spec.known >= 252 { page as u64 } else { 0 };
        let span = RegionSpan {
            start,
            end,
            offset,
            file: FileId { dev: 1, ino: file as u64 },
            page_size: page,
            mappable: !spec.hole,
            mapped_file: MAPPED,
            mapped_offset: (start as u64).wrapping_add(misregistered),
            kernel_built: spec.known & 0x40 != 0,
            ..RegionSpan::default()
        };
        let known = match spec.known % 3 {
            0 => Known::Unknown,
            1 => Known::Clones,
            _ => Known::Refused,
        };
        regions.push((span, known));
    }
    regions.sort_by_key(|(r, _)| r.start);
    let stale = regions
        .iter()
        .any(|(r, _)| vmas.iter().any(|v| v.start < r.end && r.start < v.end && v.page_size > r.page_size));
    let (spans, known) = regions.into_iter().unzip();
    (spans, known, stale)
}

fn build_list(input: &Input, vmas: &[Vma], regions: &[RegionSpan]) -> Vec<(usize, usize)> {
    let mut list: Vec<(usize, usize)> = Vec::new();
    let t = Table { vmas, regions, base_page: 0, kernel_built_pages: false };
    for spec in input.segments.iter().take(MAX_SEGMENTS) {
        let prev = list.last().copied();
        let addr = match spec.addr {
            Addr::InVma { vma, page, byte } if !vmas.is_empty() => {
                let v = vmas[usize::from(vma) % vmas.len()];
                let pages = ((v.end.wrapping_sub(v.start)) / v.page_size.max(1)).max(1);
                offset_by(v.start.wrapping_add(usize::from(page) % (pages + 1) * v.page_size), i64::from(byte))
            }
            Addr::InRegion { region, page, byte } if !regions.is_empty() => {
                let r = regions[usize::from(region) % regions.len()];
                let pages = (r.end - r.start) / r.page_size;
                offset_by(r.start + usize::from(page) % (pages + 1) * r.page_size, i64::from(byte))
            }
            Addr::AfterPrevious { byte } => prev.map_or(0, |(a, l)| offset_by(a.wrapping_add(l), i64::from(byte))),
            Addr::SameAsPrevious => prev.map_or(0, |(a, _)| a),
            Addr::NextFileOffset { pick } => {
                // The previous segment's end, as a file offset, found again in another
                // region of the same file.
                let found = prev.and_then(|(a, l)| {
                    let end = a.wrapping_add(l);
                    let last = end.wrapping_sub(1);
                    let r = t.region_at(last).0?;
                    let off = t.offset(r, last) + 1;
                    let file = regions[r].file;
                    let others: Vec<usize> = (0..regions.len())
                        .filter(|&o| o != r && regions[o].file == file)
                        .filter(|&o| {
                            let s = regions[o];
                            s.offset <= off && off < s.offset + (s.end - s.start) as u64
                        })
                        .collect();
                    let o = *others.get(usize::from(pick) % others.len().max(1))?;
                    Some(regions[o].start + (off - regions[o].offset) as usize)
                });
                found.unwrap_or(0)
            }
            Addr::Raw(a) => a as usize,
            _ => 0,
        };
        let page = t.vma_at(addr).map_or(0x1000, |v| vmas[v].page_size);
        let len = match spec.len {
            Len::Pages(p) => usize::from(p % 16) * page,
            Len::PagesAndBytes { pages, bytes } => offset_by(usize::from(pages % 16) * page, i64::from(bytes)),
            Len::Bytes(b) => usize::from(b),
            Len::ToVmaEnd { byte } => {
                t.vma_at(addr).map_or(0, |v| offset_by(vmas[v].end.wrapping_sub(addr), i64::from(byte)))
            }
            Len::Zero => 0,
            Len::Raw(l) => l as usize,
            Len::FillToMax { minus } => {
                let sum = list.iter().fold(0usize, |s, &(_, l)| s.wrapping_add(l));
                usize::MAX.wrapping_sub(sum).wrapping_sub(usize::from(minus))
            }
        };
        list.push((addr, len));
    }
    list
}

impl World {
    /// Decodes fuzzer bytes.
    pub fn decode(data: &[u8]) -> Option<World> {
        let input = Input::arbitrary_take_rest(Unstructured::new(data)).ok()?;
        let base_shift = [12, 12, 12, 12, 12, 12, 14, 16][usize::from(input.base % 8)];
        let (vmas, refuses) = build_vmas(&input, base_shift);
        let (regions, known, stale) = build_regions(&input, &vmas, base_shift);
        let list = build_list(&input, &vmas, &regions);
        Some(World { vmas, refuses, regions, known, list, base_page: 1 << base_shift, holes: input.holes, stale })
    }

    /// The table the model and the planner plan against.
    pub fn table(&self) -> Table<'_> {
        Table { vmas: &self.vmas, regions: &self.regions, base_page: self.base_page, kernel_built_pages: false }
    }
}

/// Plans `w.list` with the planner and the model and checks they agree; on a plan,
/// checks the invariants and plays the strategies.
pub fn check(w: &World) {
    let iovs: Vec<libc::iovec> =
        w.list.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }).collect();
    // The plain plan and, where a region udmabuf takes is in the table, the kernel-built one.
    check_one(w, &iovs, false);
    if w.regions.iter().any(|r| r.kernel_built) {
        check_one(w, &iovs, true);
    }
}

fn check_one(w: &World, iovs: &[libc::iovec], kernel_built_pages: bool) {
    let t = Table { kernel_built_pages, ..w.table() };
    let mut source = w.vmas.clone();
    let got = if kernel_built_pages {
        iovmap::plan::plan_for_kernel_built(iovs, &mut source[..], &w.regions, w.base_page)
    } else {
        iovmap::plan::plan(iovs, &mut source[..], &w.regions, w.base_page)
    };
    let want = model::plan(&t, &w.list);
    match (&got, &want) {
        (Ok(p), Ok(m)) => {
            if !w.stale {
                // A stale table can break two of them (tests/replay.rs names how).
                model::assert_plan_invariants(&t, p, &w.list);
            }
            model::assert_same_plan(&t, p, m);
            let mut known = w.known.clone();
            let refuses = |r: &crate::run::RunInfo| t.vma_at(r.src).is_some_and(|v| w.refuses[v]);
            let _ = model::place(&p.runs, refuses, |_| false, &mut known, w.holes);
        }
        (Err(e), Err(m)) => assert!(m.matches(e), "planner refused with {e:?}, the model with {m:?}\n{w:#x?}"),
        (Ok(p), Err(m)) => panic!("planner planned {p:#x?}, the model refused with {m:?}\n{w:#x?}"),
        (Err(e), Ok(m)) => panic!("planner refused with {e:?}, the model planned {m:#x?}\n{w:#x?}"),
    }
}

/// The `plan` fuzz target.
pub fn plan(data: &[u8]) {
    if let Some(w) = World::decode(data) {
        check(&w);
    }
}
