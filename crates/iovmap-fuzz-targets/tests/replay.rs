//! Replays every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! through the `plan` and `maps` targets on the stable toolchain, so CI exercises the
//! fuzzers' findings without nightly; and the named regressions: each input a campaign
//! found, rebuilt by hand, with what the library does about it. (The `view` target
//! counts process-wide VMAs and fds and replays in `tests/replay_view.rs`, alone.)

use std::path::PathBuf;

use iovmap::plan::{FileId, RegionSpan, Vma};
use iovmap_fuzz_targets::fuzz_dir;
use iovmap_fuzz_targets::model;
use iovmap_fuzz_targets::plan_target::World;

const P: usize = 0x1000;

/// Runs `target` over every file of the corpus and regressions of `name`; returns how
/// many files there were. A failing file is named.
fn replay(name: &str, target: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert_eq!(kind, "regressions", "{} is missing", dir.display());
            continue;
        };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("the {name} target fails on {}", f.display());
            }
            n += 1;
        }
    }
    n
}

#[test]
fn plan_corpus_and_regressions() {
    let n = replay("plan", iovmap_fuzz_targets::plan);
    assert!(n >= 20, "only {n} plan inputs");
}

#[test]
fn maps_corpus_and_regressions() {
    let n = replay("maps", iovmap_fuzz_targets::maps);
    assert!(n >= 20, "only {n} maps inputs");
}

/// The plan corpus keeps inputs that reach every outcome: each error of the model, and
/// plans with clone runs, fd runs and runs that hop between aliases of one file. A
/// corpus that lost them would replay without testing much.
#[test]
fn plan_corpus_reaches_every_outcome() {
    let mut seen = std::collections::BTreeSet::new();
    for f in std::fs::read_dir(fuzz_dir().join("corpus/plan")).unwrap() {
        let Some(w) = World::decode(&std::fs::read(f.unwrap().path()).unwrap()) else { continue };
        match model::plan(&w.table(), &w.list) {
            Err(e) => {
                seen.insert(format!("{e:?}").split('(').next().unwrap().to_string());
            }
            Ok(p) => {
                for r in &p.runs {
                    seen.insert(match (r.clone, r.fd.is_some()) {
                        (true, true) => "clone or fd".into(),
                        (true, false) => "clone only".into(),
                        (false, _) => "fd only".into(),
                    });
                    if r.pieces.windows(2).any(|w| w[1].start != w[0].end) {
                        seen.insert("hop".into());
                    }
                }
            }
        }
    }
    for want in [
        "Empty",
        "TooLarge",
        "NotMapped",
        "NotShareable",
        "Unaligned",
        "DeviceHole",
        "StaleRegion",
        "clone or fd",
        "clone only",
        "fd only",
        "hop",
    ] {
        assert!(seen.contains(want), "no plan input reaches {want}: {seen:?}");
    }
}

fn world(vmas: Vec<Vma>, regions: Vec<RegionSpan>, list: Vec<(usize, usize)>) -> World {
    World {
        refuses: vec![false; vmas.len()],
        known: vec![model::Known::Unknown; regions.len()],
        vmas,
        regions,
        list,
        base_page: P,
        holes: false,
        stale: false,
    }
}

fn plan_of(w: &World) -> Result<iovmap::plan::Plan, iovmap::Error> {
    let iovs: Vec<libc::iovec> =
        w.list.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }).collect();
    iovmap::plan::plan(&iovs, &mut w.vmas.clone()[..], &w.regions, w.base_page)
}

/// Found by the `plan` campaign (fuzz/regressions/plan/lead-into-hole): a first segment
/// that starts in an unregistered gap just after a device hole was mapped from the page
/// boundary below it, which lay in the hole when the VMA's pages are larger than the
/// hole's alignment (only a table that changed after registration can be like that). The
/// lead of a first run now stays in its region or gap, as the tail of a last run does:
/// such a list is `Unaligned`, and no run ever covers a hole.
#[test]
fn a_lead_never_reaches_back_into_a_hole() {
    // Registered over a VMA at file offset 0 from address 0: its mapping is at offset `start`.
    let span = |start: usize, end, mappable| RegionSpan {
        start,
        end,
        offset: 0,
        file: FileId { dev: 1, ino: 1 },
        page_size: P,
        mappable,
        mapped_offset: start as u64,
        ..RegionSpan::default()
    };
    let mut w = world(
        vec![Vma { start: 0, end: 0x10_0000, prot: 3, shared: true, page_size: 0x4000, ..Default::default() }],
        vec![span(0, P, false), span(0x5000, 0xb000, true)],
        vec![(0x32e7, 0x100)],
    );
    w.stale = true;
    assert!(matches!(plan_of(&w), Err(iovmap::Error::Unaligned { index: 0, .. })), "{:?}", plan_of(&w));
    iovmap_fuzz_targets::plan_target::check(&w);

    // The campaign's input: refused, or planned with no clone over a hole.
    let data = std::fs::read(fuzz_dir().join("regressions/plan/lead-into-hole")).unwrap();
    let w = World::decode(&data).unwrap();
    iovmap_fuzz_targets::plan_target::check(&w);
    if let Ok(p) = plan_of(&w) {
        let over_hole = p.runs.iter().any(|r| {
            r.clonable() && w.regions.iter().any(|s| !s.mappable && s.start < r.src() + r.len() && r.src() < s.end)
        });
        assert!(!over_hole, "{w:#x?}");
    }
}

/// Found by the `plan` campaign (fuzz/regressions/plan/hop-len-not-multiple): a run that
/// hops by file offset into a region aligned to a smaller page than the run's (its first
/// VMA's pages are larger than the second region's alignment: only a table that changed
/// after registration) ended with a length that was not a multiple of its page size. The
/// last run is now rounded by the bytes it maps, and its tail must fit after its last
/// piece: here it does not, so the list is `Unaligned`; a run's length is always a whole
/// number of its pages.
#[test]
fn a_hop_into_a_region_aligned_below_the_run_page_size() {
    let span = |start: usize, end| RegionSpan {
        start,
        end,
        offset: 0x14c_0000,
        file: FileId { dev: 1, ino: 2 },
        page_size: 0x4000,
        mapped_offset: start as u64,
        ..RegionSpan::default()
    };
    let w = world(
        vec![Vma { start: 0, end: 0x100_0000, prot: 3, shared: true, page_size: 0x8000, ..Default::default() }],
        vec![span(0, 0x14000), span(0x34000, 0x40000)],
        vec![(0, 0x8000), (0x3c000, 0x69)],
    );
    match plan_of(&w) {
        Ok(p) => assert!(p.runs.iter().all(|r| r.len() % r.page_size() == 0), "{p:#x?}"),
        Err(e) => assert!(matches!(e, iovmap::Error::Unaligned { index: 1, .. }), "{e:?}"),
    }
    iovmap_fuzz_targets::plan_target::check(&w);
}

/// A list whose lengths add up to more than `isize::MAX` is `TooLarge` at the segment
/// that makes it so: the planner's place for a run (the lead plus the bytes before it)
/// can then never wrap. (It used to be summed unchecked and panicked in debug builds.)
#[test]
fn a_list_too_large_is_refused_where_it_becomes_so() {
    let w = world(
        vec![Vma { start: P, end: usize::MAX - P + 1, prot: 3, shared: true, page_size: P, ..Default::default() }],
        vec![],
        vec![(P + 0xfff, (1 << 63) - 0xfff), (P, 1 << 63), (P, 1)],
    );
    assert_eq!(model::plan(&w.table(), &w.list), Err(model::Refusal::TooLarge));
    assert!(matches!(plan_of(&w), Err(iovmap::Error::TooLarge)));
    iovmap_fuzz_targets::plan_target::check(&w);
}
