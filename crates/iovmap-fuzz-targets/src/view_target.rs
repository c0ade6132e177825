//! The `view` target: end to end on real kernel objects ([`crate::fixtures`]).
//!
//! For a fuzzed list over the arena (segments relative to a fixture, continuing the
//! previous one, anywhere in the arena, or in unmapped memory), fuzzed options (read-only,
//! populate, a kernel that punches holes) and maybe one injected syscall failure:
//!
//! 1. the model plans the list against the arena's table and predicts the outcome: an
//!    error and its index, or the view's `MapStats` (runs, clones, fd maps, syscalls);
//! 2. the planner given the kernel's VMAs (`Remapper::plan`) and given the table agree;
//! 3. a fresh `Remapper` (everything registered) maps the list: the result must be what
//!    the model predicted, or, if the injected failure fired, an error carrying its errno;
//! 4. a view's every byte equals its source's, a write through it reaches the source, and
//!    every page of its range has exactly the protection asked for;
//! 5. once the view and the remapper are dropped, the process has exactly the VMAs and
//!    fds it had before.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use iovmap::fault::{Faults, Operation};
use iovmap::{Access, Error, MapOptions, View};
use iovmap_testkit::{self as kit, Counts};

use crate::fixtures::{Kind, World};
use crate::model::{self, Known, Table};

/// The base page of this kernel (16 KiB on arm64-16k): the world is laid out in pages.
fn p() -> usize {
    kit::page()
}
const MAX_SEGMENTS: usize = 16;

static WORLD: OnceLock<World> = OnceLock::new();

/// The arena, built on first use, after which the process is warmed up: every lazily
/// opened fd and cached allocation of the map path exists before any count is taken.
pub fn world() -> &'static World {
    WORLD.get_or_init(|| {
        // glibc adds a malloc arena (VMAs) whenever threads contend; the map path runs on
        // one thread, but the fuzzer or the test harness may have others.
        // SAFETY: mallopt has no memory-safety preconditions.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        let w = World::new();
        for m in &w.missing {
            eprintln!("view target: running without {m}");
        }
        for holes in [false, true] {
            let faults = Faults::new().assume_holes(holes);
            let r = w.remapper();
            for f in &w.fixtures {
                // One run (placed where the kernel chooses), and two (in a reservation,
                // marked on kernels that punch holes: the marker memfd is opened now).
                let _ = r.map(&[kit::iov(f.start as *const u8, f.len)]);
                let page = kit::iov(f.start as *const u8, p());
                let _ = r.map(&[page, page]);
            }
            drop(faults);
        }
        let _ = Counts::now();
        w
    })
}

#[derive(Arbitrary, Debug)]
enum Len {
    Pages(u8),
    Bytes(u16),
    PagesAndBytes(u8, i16),
    /// To the end of the fixture (or guard) it starts in.
    ToEnd,
}

#[derive(Arbitrary, Debug)]
enum Seg {
    /// Page `page` of fixture `which`, `byte` bytes off.
    Fixture { which: u8, page: u16, byte: i16, len: Len },
    /// Where the previous segment ended, `byte` bytes off.
    Continue { byte: i16, len: Len },
    /// The previous segment again.
    Repeat,
    /// Page `page` of the arena (fixtures and guards alike), `byte` bytes off.
    Arena { page: u16, byte: i16, len: Len },
    /// Unmapped memory (below vm.mmap_min_addr).
    Unmapped { pages: u8 },
    /// A zero-length segment.
    Empty,
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    populate: bool,
    /// Behave as a kernel that punches holes (Linux before 6.17): probes before clones.
    holes: bool,
    /// Fail the `nth` call of a syscall of the map path with EIO.
    fault: Option<(u8, u8)>,
    segments: Vec<Seg>,
}

fn offset_by(at: usize, by: i16) -> usize {
    (at as isize).wrapping_add(by as isize) as usize
}

/// Builds the list: every address in the arena or in unmapped memory, every segment
/// ending inside the arena.
fn build_list(w: &World, segs: &[Seg]) -> Vec<libc::iovec> {
    let end = w.base + w.len;
    let mut list: Vec<libc::iovec> = Vec::new();
    for seg in segs.iter().take(MAX_SEGMENTS) {
        let prev = list.last().map(|v| (v.iov_base as usize, v.iov_len));
        let (addr, len) = match seg {
            Seg::Unmapped { pages } => {
                let at = kit::unmapped_address() as usize;
                list.push(kit::iov(at as *const u8, (usize::from(*pages) % 15 + 1) * p() - at % p()));
                continue;
            }
            Seg::Empty => (prev.map_or(w.base, |p| p.0), 0),
            Seg::Repeat => prev.unwrap_or((w.base, p())),
            Seg::Fixture { which, page, byte, len } => {
                let f = w.fixtures[usize::from(*which) % w.fixtures.len()];
                let ps = if f.kind == Kind::Huge { kit::HUGE_2M } else { p() };
                let at = offset_by(f.start + usize::from(*page) % (f.len / ps) * ps, *byte);
                (at, length(w, at, len))
            }
            Seg::Continue { byte, len } => {
                let at = offset_by(prev.map_or(w.base, |p| p.0.wrapping_add(p.1)), *byte);
                (at, length(w, at, len))
            }
            Seg::Arena { page, byte, len } => {
                let at = offset_by(w.base + usize::from(*page) % (w.len / p()) * p(), *byte);
                (at, length(w, at, len))
            }
        };
        // Stay in the arena: the model knows nothing outside it.
        let addr = addr.clamp(w.base, end - 1);
        let len = len.min(end - addr);
        list.push(kit::iov(addr as *const u8, len));
    }
    list
}

fn length(w: &World, at: usize, len: &Len) -> usize {
    let page = if w.kind_at(at) == Some(Kind::Huge) { kit::HUGE_2M } else { p() };
    match *len {
        Len::Pages(n) => usize::from(n % 8) * page,
        Len::Bytes(b) => usize::from(b),
        Len::PagesAndBytes(n, b) => offset_by(usize::from(n % 8) * page, b),
        Len::ToEnd => w.vmas.iter().find(|v| v.start <= at && at < v.end).map_or(p(), |v| v.end - at),
    }
}

/// What a view's `MapStats` count, as the model predicts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stats {
    segments: usize,
    runs: usize,
    cloned: usize,
    fd_mapped: usize,
    syscalls: usize,
}

impl Stats {
    fn of(s: &iovmap::MapStats) -> Stats {
        Stats { segments: s.segments, runs: s.runs, cloned: s.cloned, fd_mapped: s.fd_mapped, syscalls: s.syscalls }
    }
}

/// What the model predicts for a list.
#[derive(Debug)]
enum Prediction {
    Refused(model::Refusal),
    /// A read-write view of a run whose source is read-only, naming its first segment.
    ExceedsSource(usize),
    NoFallback(usize),
    View(Stats),
}

fn predict(w: &World, list: &[libc::iovec], holes: bool, access: Access) -> Prediction {
    let t = Table { vmas: &w.vmas, regions: &w.spans, base_page: p(), kernel_built_pages: false };
    let pairs: Vec<(usize, usize)> = list.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect();
    let plan = match model::plan(&t, &pairs) {
        Err(r) => return Prediction::Refused(r),
        Ok(p) => p,
    };
    // A view allows no more than any run's source (the AND of its pieces' VMAs).
    if access == Access::ReadWrite {
        let read_only = plan.runs.iter().find(|r| r.pieces.iter().any(|p| t.vmas[p.vma].prot & libc::PROT_WRITE == 0));
        if let Some(run) = read_only {
            return Prediction::ExceedsSource(run.pieces[0].seg);
        }
    }
    // The planner's runs (the model's were compared with them by the plan target; the
    // view target compares the planner with the kernel's VMAs below).
    let mut table = w.vmas.clone();
    let runs = iovmap::plan::plan(list, &mut table[..], &w.spans, p()).expect("the model planned it").runs;
    // What each region knows once registered: on kernels that punch holes, registration
    // learns whether each mappable region clones.
    let mut known: Vec<Known> = w
        .spans
        .iter()
        .zip(&w.span_kinds)
        .map(|(s, k)| match (holes && s.mappable, k.refuses_clone()) {
            (false, _) => Known::Unknown,
            (true, false) => Known::Clones,
            (true, true) => Known::Refused,
        })
        .collect();
    let refuses = |r: &crate::run::RunInfo| w.kind_at(r.src).is_some_and(Kind::refuses_clone);
    // A perf ring's fd maps only the whole ring, from offset 0.
    let fd_refuses = |r: &crate::run::RunInfo| {
        r.fd.is_some_and(|fd| {
            w.span_kinds[fd.region] == Kind::Perf
                && (fd.offset != 0 || r.len != w.spans[fd.region].end - w.spans[fd.region].start)
        })
    };
    match model::place(&runs, refuses, fd_refuses, &mut known, holes) {
        Err(index) => Prediction::NoFallback(index),
        Ok(cost) => Prediction::View(Stats {
            segments: plan.segments,
            runs: plan.runs.len(),
            cloned: cost.cloned,
            fd_mapped: cost.fd_mapped,
            syscalls: cost.syscalls,
        }),
    }
}

/// The view's bytes are its sources', writes through it reach them, and its pages have
/// the protection asked for.
fn check_view(w: &World, view: &View, list: &[libc::iovec], access: Access) {
    let mut at = 0;
    for (i, v) in list.iter().enumerate() {
        let src = v.iov_base as *mut u8;
        // SAFETY: the sources are the arena's mapped fixtures, the view is live for its
        // len(); nothing else writes either meanwhile.
        let diff = unsafe { kit::first_difference(view.as_ptr().add(at), src, v.iov_len) };
        assert_eq!(diff, None, "segment {i} differs from its source at byte {diff:?}");
        if access == Access::ReadWrite && v.iov_len > 0 && w.kind_at(src as usize).is_some_and(Kind::writable) {
            let k = v.iov_len / 2;
            // SAFETY: byte `k` of the segment, in the source and in the view, both mapped
            // writable; restored below.
            unsafe {
                let orig = src.add(k).read_volatile();
                view.as_mut_ptr().unwrap().add(at + k).write_volatile(orig ^ 0x5a);
                assert_eq!(
                    src.add(k).read_volatile(),
                    orig ^ 0x5a,
                    "segment {i}: a write through the view missed the source"
                );
                view.as_mut_ptr().unwrap().add(at + k).write_volatile(orig);
            }
        }
        at += v.iov_len;
    }
    assert_eq!(at, view.len());
    let range = view.mapped_range();
    let want = match access {
        Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        Access::ReadOnly => libc::PROT_READ,
    };
    let mut covered = range.start;
    for line in std::fs::read_to_string("/proc/self/maps").unwrap().lines() {
        let (r, rest) = line.split_once(' ').unwrap();
        let (s, e) = r.split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        if e <= range.start || s >= range.end {
            continue;
        }
        assert_eq!(s.max(range.start), covered, "the view's range has a hole at {covered:#x}");
        let p = rest.as_bytes();
        let prot = (if p[0] == b'r' { libc::PROT_READ } else { 0 }) | (if p[1] == b'w' { libc::PROT_WRITE } else { 0 });
        assert_eq!(prot, want, "a page of the view has the wrong protection: {line}");
        assert_eq!(p[3], b's', "a private page in a view: {line}");
        covered = e.min(range.end);
    }
    assert_eq!(covered, range.end, "the view's range ends unmapped");
}

fn syscall(i: u8) -> Operation {
    Operation::ALL[usize::from(i) % Operation::ALL.len()]
}

/// Runs one input. Returns a word for what happened (for the replay's tally).
pub fn check(data: &[u8]) -> &'static str {
    let w = world();
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return "undecodable" };
    let list = build_list(w, &input.segments);
    let access = if input.read_only { Access::ReadOnly } else { Access::ReadWrite };
    let opts = MapOptions::new().with_access(access);
    let opts = if input.populate { opts.populate() } else { opts };
    let want = predict(w, &list, input.holes, access);

    let before = Counts::now();
    let outcome;
    {
        let faults = Faults::new().assume_holes(input.holes);
        let remapper = w.remapper();
        // The planner sees the kernel's VMAs as the table has them.
        let mut table = w.vmas.clone();
        let from_table = iovmap::plan::plan(&list, &mut table[..], &w.spans, p());
        match (remapper.plan(&list), from_table) {
            (Ok(mut k), Ok(t)) => {
                // Without PROCMAP_QUERY (before 6.11) iovmap reads /proc/self/maps, which
                // does not say a VMA's page size: it reports the base page even for
                // hugetlb VMAs (the runs, compared here too, come out the same).
                if !kit::has_procmap_query() {
                    for (kv, tv) in k.vmas.iter_mut().zip(&t.vmas) {
                        kv.page_size = tv.page_size;
                    }
                }
                assert_eq!(k, t, "the kernel's VMAs and the table plan differently")
            }
            (Err(k), Err(t)) => assert_eq!(format!("{k:?}"), format!("{t:?}")),
            (k, t) => panic!("the kernel's VMAs give {k:?}, the table {t:?}"),
        }
        let faults = match input.fault {
            Some((sc, nth)) => faults.fail(syscall(sc), usize::from(nth % 8), libc::EIO),
            None => faults,
        };
        let got = remapper.map_with(&list, opts);
        let fired = faults.fired();
        drop(faults);
        outcome = match (&want, got) {
            (_, Err(e)) if fired => {
                assert_eq!(kit::errno_of(&e), Some(libc::EIO), "an injected failure came back as {e:?}");
                "injected failure"
            }
            (_, Ok(v)) if fired => panic!("an injected failure was swallowed: {:?}", v.stats()),
            (Prediction::Refused(r), Err(e)) => {
                assert!(r.matches(&e), "model refuses with {r:?}, iovmap with {e:?}");
                "refused"
            }
            (Prediction::ExceedsSource(i), Err(e)) => {
                assert!(
                    matches!(e, Error::ExceedsSource { index, .. } if index == *i),
                    "model: ExceedsSource({i}), iovmap: {e:?}"
                );
                "beyond its source"
            }
            (Prediction::NoFallback(i), Err(e)) => {
                assert!(
                    matches!(e, Error::NoFallback { index, .. } if index == *i),
                    "model: NoFallback({i}), iovmap: {e:?}"
                );
                "no fallback"
            }
            (Prediction::View(stats), Ok(view)) => {
                assert_eq!(Stats::of(view.stats()), *stats, "MapStats differ from the model's");
                check_view(w, &view, &list, access);
                match (stats.cloned > 0, stats.fd_mapped > 0) {
                    (true, true) => "view: clones and fd maps",
                    (false, true) => "view: fd maps",
                    _ => "view: clones",
                }
            }
            (want, got) => panic!("model predicts {want:?}, iovmap gives {got:?}"),
        };
    }
    before.assert_unchanged("after the view and the remapper were dropped");
    outcome
}

/// The `view` fuzz target.
pub fn view(data: &[u8]) {
    check(data);
}
