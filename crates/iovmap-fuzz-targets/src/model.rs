//! A reference model of the planner ([`iovmap::plan::plan`]) and of the map path's
//! choice of strategy, written to be read rather than to be fast: linear searches, whole
//! runs re-examined at every step, no caches and no fast path.
//!
//! The rules it implements are the documented contract (docs/design.md, "How a view is
//! built" and "Error model"), one numbered rule per check:
//!
//! 1. Zero-length segments are skipped; the running sum of lengths must not exceed
//!    `isize::MAX` (else `TooLarge`, at the segment that makes it too large).
//! 2. A segment that wraps the address space is `NotMapped`.
//! 3. Each segment is cut into *pieces* at every VMA boundary and every registered-region
//!    boundary. At the first byte of each piece, in this order: a hole of a device
//!    region is `DeviceHole`, an address with no VMA is `NotMapped`, a private VMA is
//!    `NotShareable`, and a piece of a registered region whose VMA does not map what was
//!    registered there (another file, or the file at another offset) is `StaleRegion`
//!    (all naming the segment).
//! 4. A piece joins the open run when it has the run's page size and the run *with* it
//!    can still be placed by one clone (every piece in one VMA, each starting where the
//!    previous ended) or by one fd mapping (every piece in a registered region of one
//!    file, each at the file offset where the previous ended). Otherwise it starts a new
//!    run.
//! 5. A new run needs the previous run to end on a boundary of the previous run's page
//!    size and to map a whole number of its pages (else `Unaligned` naming the previous
//!    run's last segment), and its own first
//!    byte and its place in the view on a boundary of its own page size (else
//!    `Unaligned` naming its segment). A run's page size is that of its first piece:
//!    the largest of the VMA's, the region's and the base page; for a kernel-built plan,
//!    the base page for a piece of a region udmabuf takes (`RegionSpan::kernel_built`).
//! 6. The first run is mapped from the page boundary below its first byte (`lead`),
//!    which must lie in the same VMA and the same region, or gap between regions.
//! 7. A run allows what every one of its pieces' VMAs allows (the AND of their
//!    protections), and the plan what all its runs allow.
//! 8. After the list: no bytes at all is `Empty`; the last run is mapped to a whole
//!    number of its pages, the tail going on from its last piece, which must lie in
//!    the VMA and the region (or gap) of its last piece (else `Unaligned` naming that
//!    piece's segment); a reservation beyond `isize::MAX` is `TooLarge`.
//!
//! Placement (`place`): a run that one clone cannot place goes to its fd; one that can
//! is cloned unless its region or VMA is known to refuse; on kernels that punch holes an
//! unknown source is probed first, unless the view is one run (placed where the kernel
//! chooses, with no reservation a refusal could punch); a refused clone falls back to the
//! fd, and with no fd the map fails naming the run's first segment.

use std::collections::BTreeMap;

use iovmap::plan::RegionSpan;
use iovmap::plan::{Clonability, FdSource, Run, Strategy, Vma};

use crate::run::{RunInfo, info};

/// The mappings and registered regions the model plans against.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    /// VMAs, disjoint (any order).
    pub vmas: &'a [Vma],
    /// Registered regions, sorted by address and disjoint.
    pub regions: &'a [RegionSpan],
    /// The base page size.
    pub base_page: usize,
    /// Plan for a kernel-built view: runs of regions udmabuf takes are laid out at the base
    /// page (rule 5).
    pub kernel_built_pages: bool,
}

/// Why the model refuses a list: the planner's errors, with the segment index they name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No bytes.
    Empty,
    /// Beyond the address space.
    TooLarge,
    /// An address with no VMA (or a wrapping segment).
    NotMapped(usize),
    /// Private memory.
    NotShareable(usize),
    /// A run boundary off a page boundary.
    Unaligned(usize),
    /// A hole of a device region.
    DeviceHole(usize),
    /// A registered region whose mapping is no longer what was registered.
    StaleRegion(usize),
}

impl Refusal {
    /// Whether `e` is this refusal, index included.
    pub fn matches(&self, e: &iovmap::Error) -> bool {
        use iovmap::Error as E;
        match (*self, e) {
            (Refusal::Empty, E::Empty) | (Refusal::TooLarge, E::TooLarge) => true,
            (Refusal::NotMapped(i), E::NotMapped { index })
            | (Refusal::NotShareable(i), E::NotShareable { index })
            | (Refusal::Unaligned(i), E::Unaligned { index, .. })
            | (Refusal::DeviceHole(i), E::DeviceHole { index })
            | (Refusal::StaleRegion(i), E::StaleRegion { index, .. }) => i == *index,
            _ => false,
        }
    }
}

/// Bytes `[start, end)` of segment `seg`, inside one VMA and one region (or gap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index of the segment in the list.
    pub seg: usize,
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Index of its VMA in the table.
    pub vma: usize,
    /// Index of its registered region, if any.
    pub region: Option<usize>,
    /// End of its VMA and of its region (or of the gap between regions).
    pub window: usize,
}

/// A run as the model lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRun {
    /// Its pieces, in list order.
    pub pieces: Vec<Piece>,
    /// Offset in the reservation.
    pub dst: usize,
    /// Bytes mapped.
    pub len: usize,
    /// Page-aligned source address.
    pub src: usize,
    /// Placeable by one clone.
    pub clone: bool,
    /// Placeable by one fd mapping: (region index, file offset of the first mapped byte).
    pub fd: Option<(usize, u64)>,
    /// Page size.
    pub page_size: usize,
}

/// A plan as the model lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPlan {
    /// The runs, in view order.
    pub runs: Vec<ModelRun>,
    /// Non-empty segments.
    pub segments: usize,
    /// Bytes in the view.
    pub len: usize,
    /// Offset of the first byte in the first page.
    pub lead: usize,
    /// Bytes reserved.
    pub map_len: usize,
    /// Alignment of the reservation.
    pub align: usize,
}

impl Table<'_> {
    /// The VMA containing `addr`.
    pub fn vma_at(&self, addr: usize) -> Option<usize> {
        self.vmas.iter().position(|v| v.start <= addr && addr < v.end)
    }

    /// The registered region containing `addr` and its end, or `None` and the end of the
    /// gap `addr` lies in (the start of the next region, or the end of the address space).
    pub fn region_at(&self, addr: usize) -> (Option<usize>, usize) {
        if let Some(i) = self.regions.iter().position(|r| r.start <= addr && addr < r.end) {
            return (Some(i), self.regions[i].end);
        }
        (None, self.regions.iter().map(|r| r.start).filter(|&s| s > addr).min().unwrap_or(usize::MAX))
    }

    /// Page size of a run that starts with `p` (rule 5).
    pub fn page_size(&self, p: &Piece) -> usize {
        if self.kernel_built_pages && p.region.is_some_and(|r| self.regions[r].kernel_built) {
            return self.base_page;
        }
        let region = p.region.map_or(0, |r| self.regions[r].page_size);
        self.vmas[p.vma].page_size.max(region).max(self.base_page)
    }

    /// File offset of `addr`, which lies in region `r`.
    pub fn offset(&self, r: usize, addr: usize) -> u64 {
        self.regions[r].offset + (addr - self.regions[r].start) as u64
    }

    /// Whether one clone places all of `pieces` (rule 4).
    pub fn by_clone(&self, pieces: &[Piece]) -> bool {
        pieces.iter().all(|p| p.vma == pieces[0].vma) && pieces.windows(2).all(|w| w[1].start == w[0].end)
    }

    /// Whether one fd mapping places all of `pieces` (rule 4).
    pub fn by_fd(&self, pieces: &[Piece]) -> bool {
        let file = |p: &Piece| p.region.map(|r| self.regions[r].file);
        file(&pieces[0]).is_some()
            && pieces.iter().all(|p| file(p) == file(&pieces[0]))
            && pieces.windows(2).all(|w| {
                let (a, b) = (w[0], w[1]);
                self.offset(b.region.unwrap(), b.start)
                    == self.offset(a.region.unwrap(), a.start) + (a.end - a.start) as u64
            })
    }

    /// Where the region or gap containing `addr` starts (rule 6).
    pub fn window_start(&self, addr: usize) -> usize {
        match self.region_at(addr).0 {
            Some(r) => self.regions[r].start,
            None => self.regions.iter().map(|r| r.end).filter(|&e| e <= addr).max().unwrap_or(0),
        }
    }

    fn joins(&self, run: &[Piece], p: Piece) -> bool {
        // A run has one page size (rule 4).
        if self.page_size(&p) != self.page_size(&run[0]) {
            return false;
        }
        let mut with = run.to_vec();
        with.push(p);
        self.by_clone(&with) || self.by_fd(&with)
    }
}

/// Plans `iovs` (as `(address, length)`) against `t` by the rules above.
pub fn plan(t: &Table<'_>, iovs: &[(usize, usize)]) -> Result<ModelPlan, Refusal> {
    let mut segments = 0;
    let mut total = 0usize;
    let mut runs: Vec<Vec<Piece>> = Vec::new();
    let mut lead = 0;
    // Bytes of the view laid out so far (the lead and every piece placed): at most a page
    // more than `total`, which rule 1 keeps below isize::MAX, so it cannot wrap.
    let mut laid = 0usize;
    for (i, &(addr, len)) in iovs.iter().enumerate() {
        if len == 0 {
            continue; // rule 1
        }
        segments += 1;
        total = total.checked_add(len).filter(|&t| t <= isize::MAX as usize).ok_or(Refusal::TooLarge)?; // rule 1
        let end = addr.checked_add(len).ok_or(Refusal::NotMapped(i))?; // rule 2
        let mut at = addr;
        while at < end {
            // Rule 3.
            let (region, region_end) = t.region_at(at);
            if region.is_some_and(|r| !t.regions[r].mappable) {
                return Err(Refusal::DeviceHole(i));
            }
            let vma = t.vma_at(at).ok_or(Refusal::NotMapped(i))?;
            if !t.vmas[vma].shared {
                return Err(Refusal::NotShareable(i));
            }
            if let Some(r) = region.map(|r| t.regions[r]) {
                let v = t.vmas[vma];
                let seen = v.offset.wrapping_add((at - v.start) as u64);
                if v.file != r.mapped_file || seen != r.mapped_offset.wrapping_add((at - r.start) as u64) {
                    return Err(Refusal::StaleRegion(i));
                }
            }
            let window = t.vmas[vma].end.min(region_end);
            let piece = Piece { seg: i, start: at, end: end.min(window), vma, region, window };
            at = piece.end;
            // Rule 4.
            if let Some(run) = runs.last_mut() {
                if t.joins(run, piece) {
                    run.push(piece);
                    laid += piece.end - piece.start;
                    continue;
                }
            }
            let ps = t.page_size(&piece);
            match runs.last() {
                // Rule 5.
                Some(prev) => {
                    let prev_end = prev.last().expect("runs are never empty");
                    let prev_ps = t.page_size(&prev[0]);
                    // The bytes it maps (its lead too if it is the first run).
                    let prev_len =
                        prev.iter().map(|p| p.end - p.start).sum::<usize>() + if runs.len() == 1 { lead } else { 0 };
                    if prev_end.end % prev_ps != 0 || prev_len % prev_ps != 0 {
                        return Err(Refusal::Unaligned(prev_end.seg));
                    }
                    if piece.start % ps != 0 || laid % ps != 0 {
                        return Err(Refusal::Unaligned(i));
                    }
                }
                // Rule 6.
                None => {
                    let src = piece.start - piece.start % ps;
                    if src < t.vmas[vma].start || src < t.window_start(piece.start) {
                        return Err(Refusal::Unaligned(i));
                    }
                    lead = piece.start - src;
                    laid = lead;
                }
            }
            runs.push(vec![piece]);
            laid += piece.end - piece.start;
        }
    }
    // Rule 8.
    if total == 0 {
        return Err(Refusal::Empty);
    }
    let last = *runs.last().and_then(|r| r.last()).expect("bytes were planned");
    let last_run = runs.last().expect("bytes were planned");
    let last_ps = t.page_size(&last_run[0]);
    let last_len = last_run.iter().map(|p| p.end - p.start).sum::<usize>() + if runs.len() == 1 { lead } else { 0 };
    // Mapped to a whole number of pages: the tail goes on from the last piece.
    let tail = last_len.checked_next_multiple_of(last_ps).ok_or(Refusal::TooLarge)? - last_len;
    let tail_end = last.end.checked_add(tail).ok_or(Refusal::TooLarge)?;
    if tail_end > last.window {
        return Err(Refusal::Unaligned(last.seg));
    }
    let count = runs.len();
    let mut out = Vec::with_capacity(count);
    let mut dst = 0usize;
    let mut align = t.base_page;
    for (k, pieces) in runs.into_iter().enumerate() {
        let first = pieces[0];
        let page_size = t.page_size(&first);
        let src = if k == 0 { first.start - lead } else { first.start };
        let mut len = (first.start - src) + pieces.iter().map(|p| p.end - p.start).sum::<usize>();
        if k + 1 == count {
            len += tail_end - last.end;
        }
        let fd = t.by_fd(&pieces).then(|| {
            let r = first.region.expect("registered");
            (r, t.offset(r, first.start) - (first.start - src) as u64)
        });
        align = align.max(page_size);
        out.push(ModelRun { clone: t.by_clone(&pieces), fd, pieces, dst, len, src, page_size });
        dst = dst.checked_add(len).ok_or(Refusal::TooLarge)?;
    }
    if dst > isize::MAX as usize - align {
        return Err(Refusal::TooLarge);
    }
    Ok(ModelPlan { runs: out, segments, len: total, lead, map_len: dst, align })
}

/// Compares the planner's plan with the model's, run by run. Panics on a difference.
pub fn assert_same_plan(t: &Table<'_>, got: &iovmap::plan::Plan, want: &ModelPlan) {
    let runs: Vec<RunInfo> = got.runs.iter().map(info).collect();
    assert_eq!(
        (got.segments, got.len, got.lead, got.map_len, got.align, runs.len()),
        (want.segments, want.len, want.lead, want.map_len, want.align, want.runs.len()),
        "plan (segments, len, lead, map_len, align, runs) differ\nplanner: {runs:#x?}\nmodel: {want:#x?}"
    );
    for (k, (g, w)) in runs.iter().zip(&want.runs).enumerate() {
        let first = &w.pieces[0];
        let expect = RunInfo {
            dst: w.dst,
            len: w.len,
            src: w.src,
            clone: w.clone,
            vma: g.vma, // an identity: compared below
            fd: w.fd.map(|(region, offset)| FdSource { region, offset }),
            page_size: w.page_size,
            // Rule 7.
            prot: w.pieces.iter().fold(0xff, |all, p| all & t.vmas[p.vma].prot),
            first: first.seg,
        };
        assert_eq!(*g, expect, "run {k} differs\nplanner: {runs:#x?}\nmodel: {want:#x?}");
    }
    assert_eq!(got.prot, runs.iter().fold(!0, |all, r| all & r.prot), "the plan's protection (rule 7)");
    // `vma` identifies the source VMA of a run's first piece: equal exactly when the VMAs are.
    for (a, wa) in runs.iter().zip(&want.runs) {
        for (b, wb) in runs.iter().zip(&want.runs) {
            assert_eq!(
                a.vma == b.vma,
                wa.pieces[0].vma == wb.pieces[0].vma,
                "run VMA identities differ\nplanner: {runs:#x?}\nmodel: {want:#x?}"
            );
        }
    }
}

/// What a region is known to do when cloned, as the model tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Nothing learned yet.
    Unknown,
    /// A clone of it worked.
    Clones,
    /// The kernel refused to clone it.
    Refused,
}

/// What placing a plan costs, as `MapStats` counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Runs cloned.
    pub cloned: usize,
    /// Runs mapped from an fd.
    pub fd_mapped: usize,
    /// mremap/mmap attempts for runs, probes and refused clones included.
    pub syscalls: usize,
    /// Probes among those (kernels that punch holes).
    pub probes: usize,
}

/// The model's strategy for a run (placement rules in the module docs).
pub fn expected_strategy(run: &RunInfo, known: Known, holes: bool) -> Strategy {
    let fallback = if run.fd.is_some() { Strategy::Fd } else { Strategy::Fail };
    match known {
        _ if !run.clone => fallback,
        Known::Refused => fallback,
        Known::Clones => Strategy::Clone,
        Known::Unknown if holes => Strategy::Probe,
        Known::Unknown => Strategy::Clone,
    }
}

fn clonability(k: Known) -> Clonability {
    match k {
        Known::Unknown => Clonability::Unknown,
        Known::Clones => Clonability::Clones,
        Known::Refused => Clonability::Refused(libc::EFAULT),
    }
}

/// Plays the map path over the planner's `runs`: `refuses(run)` says whether the kernel
/// refuses to clone the run's source, `fd_refuses(run)` whether it refuses to map the
/// run's fd (a perf ring maps only whole), `regions` is what each registered region is
/// known to do (updated as the map path learns), `holes` whether the kernel punches
/// holes. Checks [`iovmap::plan::strategy`] against [`expected_strategy`] at every step
/// and returns the cost, or the index `NoFallback` names.
pub fn place(
    runs: &[Run],
    refuses: impl Fn(&RunInfo) -> bool,
    fd_refuses: impl Fn(&RunInfo) -> bool,
    regions: &mut [Known],
    holes: bool,
) -> Result<Placement, usize> {
    let mut cost = Placement::default();
    // A view of one run has no reservation: nothing of its own for a refusal to punch.
    let holes = holes && runs.len() > 1;
    let mut probed: BTreeMap<usize, bool> = BTreeMap::new(); // VMA identity -> clones
    let decide = |run: &Run, info: &RunInfo, known: Known| {
        let got = iovmap::plan::strategy(run, clonability(known), holes);
        let want = expected_strategy(info, known, holes);
        assert_eq!(got, want, "strategy of {info:#x?} when {known:?}, holes {holes}");
        got
    };
    for run in runs {
        let r = info(run);
        let region = r.fd.map(|f| f.region);
        let known = match region.map(|i| regions[i]) {
            Some(k @ (Known::Clones | Known::Refused)) => k,
            _ => match probed.get(&r.vma) {
                Some(true) => Known::Clones,
                Some(false) => Known::Refused,
                None => Known::Unknown,
            },
        };
        let mut step = decide(run, &r, known);
        if step == Strategy::Probe {
            let clones = !refuses(&r);
            cost.syscalls += 1;
            cost.probes += 1;
            probed.insert(r.vma, clones);
            if let Some(i) = region {
                regions[i] = if clones { Known::Clones } else { Known::Refused };
            }
            step = decide(run, &r, if clones { Known::Clones } else { Known::Refused });
        }
        if step == Strategy::Clone {
            cost.syscalls += 1;
            if !refuses(&r) {
                cost.cloned += 1;
                if let (Some(i), Known::Unknown) = (region, known) {
                    regions[i] = Known::Clones;
                }
                continue;
            }
            if let Some(i) = region {
                regions[i] = Known::Refused;
            }
            step = decide(run, &r, Known::Refused);
        }
        match step {
            Strategy::Fd if fd_refuses(&r) => return Err(r.first),
            Strategy::Fd => {
                cost.syscalls += 1;
                cost.fd_mapped += 1;
            }
            Strategy::Fail => return Err(r.first),
            other => panic!("after learning, {other:?} for {r:#x?}"),
        }
    }
    Ok(cost)
}

/// Checks what must hold of any plan the planner returns, whatever the model says: the
/// runs tile the reservation, are aligned, cover exactly the list's bytes in order, and
/// never map across a mapping boundary. `iovs` as `(address, length)`.
pub fn assert_plan_invariants(t: &Table<'_>, got: &iovmap::plan::Plan, iovs: &[(usize, usize)]) {
    let runs: Vec<RunInfo> = got.runs.iter().map(info).collect();
    let ctx = || format!("runs: {runs:#x?}");
    assert!(!runs.is_empty(), "a plan without runs");
    let nonempty: Vec<(usize, usize)> = iovs.iter().copied().filter(|&(_, l)| l > 0).collect();
    assert_eq!(got.segments, nonempty.len());
    assert_eq!(got.len, nonempty.iter().map(|&(_, l)| l).sum::<usize>());
    assert!(got.len <= isize::MAX as usize);
    assert!(got.align.is_power_of_two() && got.align >= t.base_page);
    assert_eq!(got.align, runs.iter().map(|r| r.page_size).max().unwrap().max(t.base_page));
    let mut dst = 0;
    for r in &runs {
        assert!(r.page_size.is_power_of_two(), "{}", ctx());
        assert_eq!(r.dst, dst, "runs must tile the reservation: {}", ctx());
        assert!(r.len > 0 && r.len % r.page_size == 0 && r.dst % r.page_size == 0, "{}", ctx());
        assert_eq!(r.src % r.page_size, 0, "{}", ctx());
        assert!(r.clone || r.fd.is_some(), "a run nothing can place: {}", ctx());
        if r.clone {
            // No clone crosses a mapping boundary: one VMA holds all of it, shared.
            let v = t.vma_at(r.src).map(|i| t.vmas[i]);
            assert!(
                v.is_some_and(|v| v.shared && r.src + r.len <= v.end),
                "clone run outside its VMA {v:#x?}: {}",
                ctx()
            );
            // Nor maps a byte of a device hole, even in the part of a page it does not show.
            let hole = t.regions.iter().find(|s| !s.mappable && s.start < r.src + r.len && r.src < s.end);
            assert!(hole.is_none(), "clone run over the hole {hole:#x?}: {}", ctx());
        }
        if let Some(fd) = r.fd {
            let span = t.regions[fd.region];
            assert!(span.mappable, "{}", ctx());
            assert!(fd.offset >= span.offset, "fd run starts before its region: {}", ctx());
        }
        dst += r.len;
    }
    assert_eq!(got.map_len, dst);
    assert!(got.map_len <= isize::MAX as usize - got.align);
    assert!(got.lead < runs[0].page_size);
    assert!(got.lead + got.len <= got.map_len && got.map_len - (got.lead + got.len) < runs.last().unwrap().page_size);

    // Coverage: byte `k` of the view is byte `k` of the list. Walk the list in pieces
    // (cut at VMA and region boundaries) beside the runs.
    let mut view = got.lead;
    let mut k = 0;
    for &(addr, len) in &nonempty {
        let end = addr + len;
        let mut at = addr;
        while at < end {
            let vma = t.vma_at(at).expect("a planned byte is mapped");
            let (region, region_end) = t.region_at(at);
            let piece_end = end.min(t.vmas[vma].end).min(region_end);
            while runs[k].dst + runs[k].len <= view {
                k += 1;
            }
            let r = runs[k];
            assert!(
                view + (piece_end - at) <= r.dst + r.len,
                "piece [{at:#x}, {piece_end:#x}) straddles two runs: {}",
                ctx()
            );
            if r.clone {
                assert_eq!(r.src + (view - r.dst), at, "clone run shows another address: {}", ctx());
                assert_eq!(t.vma_at(r.src), Some(vma), "clone run from another VMA: {}", ctx());
            }
            if let Some(fd) = r.fd {
                let here = region.expect("fd run over an unregistered piece");
                assert_eq!(t.regions[here].file, t.regions[fd.region].file, "fd run over another file: {}", ctx());
                assert_eq!(
                    fd.offset + (view - r.dst) as u64,
                    t.offset(here, at),
                    "fd run at another offset: {}",
                    ctx()
                );
            }
            view += piece_end - at;
            at = piece_end;
        }
    }
}
