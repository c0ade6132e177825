//! Nothing leaks: every error path, every injected syscall failure, VMA-cap pressure and
//! concurrent use leave the process's VMA and fd counts (and the registered table) as
//! they were.
//!
//! This binary runs without the libtest harness (`harness = false` in Cargo.toml): the
//! harness starts a thread per test, and a new thread's stack is a new VMA that would
//! land in another test's count. Here every check runs in turn on the main thread, after
//! a warm-up that lets glibc cache what it keeps (thread stacks, arenas, the PROCMAP_QUERY
//! fd iovmap keeps open).
//!
//! `cargo test --test leaks -- <filter>` runs the checks whose name contains `<filter>`.

#[path = "support/steady.rs"]
mod steady;

use std::os::fd::AsFd;

use iovmap::fault::{Faults, Syscall};
use iovmap::vfio::{VFIO_REGION_INFO_FLAG_MMAP, VfioRegionInfo};
use iovmap::{Access, Error, MapOptions, Remapper};
use iovmap_testkit::workloads::Rng;
use iovmap_testkit::{self as kit, BpfArray, Counts, GuestRam, IoUringSq, Mapping, PerfRing};

fn page() -> usize {
    kit::page()
}

fn main() {
    let checks: &[(&str, fn())] = &[
        ("error_paths_leave_nothing_behind", error_paths_leave_nothing_behind),
        ("registration_errors_leave_nothing_behind", registration_errors_leave_nothing_behind),
        ("injected_failures_roll_back_at_every_syscall", injected_failures_roll_back_at_every_syscall),
        ("too_many_runs_are_refused_before_placing", too_many_runs_are_refused_before_placing),
        ("vma_cap_hit_while_placing_is_rolled_back", vma_cap_hit_while_placing_is_rolled_back),
        ("vmas_are_counted_up_front_only_near_the_cap", vmas_are_counted_up_front_only_near_the_cap),
        ("threads_share_a_remapper_without_leaks", threads_share_a_remapper_without_leaks),
        ("hole_kernels_learn_refusals_without_cloning_into_the_reservation", hole_kernels_learn_refusals),
        ("hole_kernels_never_clobber_or_unmap_a_foreign_mapping", hole_kernels_never_clobber),
        ("hole_kernels_roll_back_a_refusal_at_every_clone", hole_kernels_refusal_sweep),
    ];
    kit::run_counting_checks("leaks", checks, warm_up);
}

/// Lets the process reach its steady state: what iovmap keeps open, malloc arenas and
/// cached thread stacks.
fn warm_up() {
    steady::warm_up();
    let ram = GuestRam::new(16 * page()).unwrap();
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    threads_workload(&r, &ram, None, 4, 20);
}

fn regions(r: &Remapper) -> Vec<(usize, usize, u64)> {
    r.regions().map(|(a, l, o)| (a as usize, l, o)).collect()
}

/// A list that must fail, and how.
type ErrorCase<'a> = (&'a str, Vec<libc::iovec>, fn(&Error) -> bool);

fn error_paths_leave_nothing_behind() {
    let ram = GuestRam::new(32 * page()).unwrap();
    let private = Mapping::anon_private(4 * page()).unwrap();
    let dangling = kit::iov(kit::unmapped_address(), page());
    let ring = PerfRing::new(2).ok();
    let uring = IoUringSq::new().ok();
    let ro_map = {
        use std::os::fd::AsRawFd;
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", ram.fd().as_raw_fd())).unwrap();
        Mapping::new(4 * page(), libc::PROT_READ, libc::MAP_SHARED, Some(ro.as_fd()), 0).unwrap()
    };
    let mut r = Remapper::new();
    if let Some(u) = &uring {
        r.register(u.map.ptr(), u.map.len(), u.fd(), 0).unwrap();
    }
    let before = Counts::now();
    let table = regions(&r);
    let mut cases: Vec<ErrorCase> = vec![
        ("empty", vec![ram.iov(0, 0)], |e| matches!(e, Error::Empty)),
        ("unaligned", vec![ram.iov(0, page()), ram.iov(5 * page(), 10), ram.iov(9 * page(), page())], |e| {
            matches!(e, Error::Unaligned { index: 1 })
        }),
        ("not mapped", vec![ram.iov(0, page()), dangling], |e| matches!(e, Error::NotMapped { index: 1 })),
        ("private", vec![ram.iov(0, page()), private.iov(0, page())], |e| {
            matches!(e, Error::NotShareable { index: 1 })
        }),
        // The clone of page 0 succeeds, then mprotect refuses: the placed run is undone.
        ("not writable", vec![ram.iov(0, page()), ro_map.iov(page(), page())], |e| {
            matches!(e, Error::NotWritable { index: 1 })
        }),
    ];
    if let Some(ring) = &ring {
        cases.push(("no fallback (perf)", vec![ram.iov(0, page()), ring.map.iov(0, ring.map.len())], |e| {
            matches!(e, Error::NoFallback { index: 1, .. })
        }));
    } else {
        eprintln!("SKIP part: no perf ring");
    }
    if let Some(u) = uring.as_ref().filter(|u| u.refuses_map_fixed()) {
        cases.push((
            "no fallback (io_uring fd refuses MAP_FIXED)",
            vec![ram.iov(0, page()), u.map.iov(0, page())],
            |e| matches!(e, Error::NoFallback { index: 1, .. }),
        ));
    } else {
        eprintln!("SKIP part: no io_uring, or its fd accepts MAP_FIXED here (Linux 5.10): it has a fallback");
    }
    for (what, list, expected) in &cases {
        let e = r.map(list).expect_err(what);
        assert!(expected(&e), "{what}: unexpected error {e:?}");
        before.assert_unchanged(what);
        assert_eq!(regions(&r), table, "{what}: registered table changed");
    }
}

fn registration_errors_leave_nothing_behind() {
    let ram = GuestRam::new(16 * page()).unwrap();
    let private = Mapping::anon_private(4 * page()).unwrap();
    let gone_ptr = kit::unmapped_address();
    let mut r = Remapper::new();
    r.register(ram.ptr(), 8 * page(), ram.fd(), 0).unwrap();
    let before = Counts::now();
    let table = regions(&r);
    let p = page();
    let bad: Vec<(&str, *const u8, usize, u64, &str)> = vec![
        ("zero length", ram.ptr(), 0, 0, "length 0"),
        ("overlap", ram.ptr().wrapping_add(4 * p), 8 * p, 4 * p as u64, "overlaps"),
        ("file too short", ram.ptr().wrapping_add(8 * p), 8 * p, 16 * p as u64, "shorter"),
        ("unaligned address", ram.ptr().wrapping_add(8 * p + 1), p, 0, "aligned"),
        ("unaligned offset", ram.ptr().wrapping_add(8 * p), p, 7, "aligned"),
        ("unaligned length", ram.ptr().wrapping_add(8 * p), p + 1, 0, "aligned"),
        ("wraps", usize::MAX as *const u8, 2 * p, 0, "wraps"),
        ("not mapped", gone_ptr, p, 0, "not mapped"),
        ("private", private.ptr(), p, 0, "private"),
    ];
    for (what, addr, len, off, says) in bad {
        let e = r.register(addr, len, ram.fd(), off).expect_err(what);
        assert!(matches!(&e, Error::InvalidRegion { reason } if reason.contains(says)), "{what}: {e}");
        before.assert_unchanged(what);
        assert_eq!(regions(&r), table, "{what}: registered table changed");
    }
    // A vfio registration of several areas fails whole: the first area was fine.
    let sparse = VfioRegionInfo {
        index: 2,
        flags: VFIO_REGION_INFO_FLAG_MMAP,
        size: 8 * p as u64,
        offset: 8 * p as u64,
        sparse_areas: Some(vec![(0, 2 * p as u64), (4 * p as u64, 8 * p as u64)]),
    };
    let e = r.register_vfio_region_info(ram.fd(), &sparse, ram.ptr().wrapping_add(8 * p)).unwrap_err();
    assert!(matches!(&e, Error::InvalidRegion { reason } if reason.contains("vfio region 2")), "{e}");
    let no_mmap = VfioRegionInfo { flags: 0, sparse_areas: None, ..sparse };
    assert!(r.register_vfio_region_info(ram.fd(), &no_mmap, ram.ptr().wrapping_add(8 * p)).is_err());
    before.assert_unchanged("vfio registrations");
    assert_eq!(regions(&r), table);

    let e = r.unregister(ram.ptr().wrapping_add(p)).unwrap_err();
    assert!(e.to_string().contains("no region is registered"), "{e}");
    // Unregistering closes the duplicated fd.
    r.unregister(ram.ptr()).unwrap();
    assert_eq!(kit::count_fds(), before.fds - 1);
}

/// One scenario of the fault-injection sweep: a remapper, a list, options.
struct Scenario<'a> {
    name: &'a str,
    remapper: &'a Remapper,
    list: Vec<libc::iovec>,
    opts: MapOptions,
}

fn injected_failures_roll_back_at_every_syscall() {
    let ram = GuestRam::new(64 * page()).unwrap();
    ram.fill(1);
    let p = page();
    let mut mixed = Remapper::new();
    let mut list = vec![ram.iov(3 * p, 2 * p), ram.iov(10 * p, p), ram.iov(20 * p, 4 * p)];
    let bpf = BpfArray::new(16).ok();
    if let Some(a) = &bpf {
        mixed.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
        list.extend([a.map.iov(2 * p, p), a.map.iov(9 * p, 2 * p)]);
    } else {
        eprintln!("SKIP part: no BPF array for fd runs");
    }
    let ring = PerfRing::new(2).ok();
    if let Some(ring) = &ring {
        mixed.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
        list.push(ring.map.iov(0, ring.map.len()));
    }
    list.push(ram.iov(40 * p, p));
    let plain = Remapper::new();
    let mut scenarios = vec![
        Scenario {
            name: "mixed, populate",
            remapper: &mixed,
            list: list.clone(),
            opts: MapOptions { populate: true, ..Default::default() },
        },
        Scenario {
            name: "read-only (mprotect)",
            remapper: &plain,
            list: vec![ram.iov(0, p), ram.iov(8 * p, 8 * p)],
            opts: MapOptions { access: Access::ReadOnly, populate: true },
        },
        Scenario {
            name: "many runs",
            remapper: &plain,
            list: (0..600).map(|i| ram.iov((i % 32) * 2 * p, p)).collect(),
            opts: MapOptions::default(),
        },
    ];
    let huge = GuestRam::huge(2 * kit::HUGE_2M);
    let mut huge_remapper = Remapper::new();
    match &huge {
        Ok(h) => {
            huge_remapper.register(h.ptr(), h.len(), h.fd(), 0).unwrap();
            scenarios.push(Scenario {
                name: "hugetlb (trimmed reservation)",
                remapper: &huge_remapper,
                list: vec![h.iov(kit::HUGE_2M, kit::HUGE_2M), h.iov(0, 4096)],
                opts: MapOptions::default(),
            });
        }
        Err(e) => eprintln!("SKIP part: no huge pages for the trim step: {e}"),
    }
    let mut injected = 0;
    let mut reached = std::collections::BTreeSet::new();
    for s in &scenarios {
        // A clean run first, so the remapper has learned which regions refuse the clone;
        // then a counted one: how many times does each syscall happen?
        drop(s.remapper.map_with(&s.list, &s.opts).unwrap_or_else(|e| panic!("{}: {e}", s.name)));
        let faults = Faults::new();
        let view = s.remapper.map_with(&s.list, &s.opts).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        let calls: Vec<(Syscall, usize)> = Syscall::ALL.iter().map(|&sc| (sc, faults.calls(sc))).collect();
        drop(faults);
        drop(view);
        let before = Counts::now();
        let table = regions(s.remapper);
        for (sc, n) in calls {
            for k in 0..n {
                let faults = Faults::new().fail(sc, k, libc::EIO);
                let r = s.remapper.map_with(&s.list, &s.opts);
                assert!(faults.fired(), "{}: {sc:?} #{k} was not reached", s.name);
                drop(faults);
                let e = r.expect_err(s.name);
                assert_eq!(kit::errno_of(&e), Some(libc::EIO), "{}: {sc:?} #{k}: {e:?}", s.name);
                before.assert_unchanged(&format!("{}: failure at {sc:?} #{k}", s.name));
                assert_eq!(regions(s.remapper), table);
                injected += 1;
                reached.insert(format!("{sc:?}"));
            }
        }
        // And it still works afterwards.
        drop(s.remapper.map_with(&s.list, &s.opts).unwrap());
    }
    println!("  injected {injected} failures across {} scenarios, at {reached:?}", scenarios.len());
    // VMA lookups are PROCMAP_QUERY ioctls (Linux 6.11+) or reads of /proc/self/maps;
    // the up-front VMA count (near the cap only) has its own check below.
    let mut must = vec!["Reserve", "Clone", "Protect", "Populate"];
    must.push(if kit::has_procmap_query() { "VmaQuery" } else { "MapsRead" });
    if iovmap::fault::kernel_punches_holes() {
        must.push("CloneProbe");
    }
    if bpf.is_some() || ring.is_some() {
        must.push("FdMap");
    }
    if huge.is_ok() {
        must.push("Trim");
    }
    for m in must {
        assert!(reached.contains(m), "the sweep never failed {m}");
    }
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap()
}

fn too_many_runs_are_refused_before_placing() {
    let max = max_map_count();
    let pages = 2 * (max + 500);
    let ram = GuestRam::new(pages * page()).unwrap(); // sparse: never touched
    let list: Vec<_> = (0..pages / 2).map(|i| ram.iov(2 * i * page(), page())).collect();
    let before = Counts::now();
    let faults = Faults::new();
    let e = iovmap::map(&list).unwrap_err();
    match e {
        Error::TooManyMappings { needed, available } => {
            assert_eq!(needed, max + 500);
            assert!(available < max && available + before.vmas + 6 >= max - 8, "available {available}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(faults.calls(Syscall::Reserve), 0, "refused before reserving anything");
    drop(faults);
    before.assert_unchanged("TooManyMappings");
    assert!(e_message_mentions_sysctl());
}

fn e_message_mentions_sysctl() -> bool {
    Error::TooManyMappings { needed: 2, available: 1 }.to_string().contains("vm.max_map_count")
}

fn vma_cap_hit_while_placing_is_rolled_back() {
    // Fill the address space with VMAs until ~100 are left, then map a 300-run view:
    // small enough not to be counted up front, so the cap is hit while placing.
    let max = max_map_count();
    let ram = GuestRam::new(600 * page()).unwrap();
    let list: Vec<_> = (0..300).map(|i| ram.iov(2 * i * page(), page())).collect();
    let now = kit::count_vmas();
    let filler_pages = (max - now - 100) / 2 + 1;
    let filler =
        Mapping::new(2 * filler_pages * page(), libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0)
            .unwrap();
    for i in 0..filler_pages {
        // SAFETY: every other page of the filler mapping this test owns: one VMA each.
        assert_eq!(unsafe { libc::mprotect(filler.ptr().add(2 * i * page()).cast(), page(), libc::PROT_READ) }, 0);
    }
    let before = Counts::now();
    assert!(before.vmas + 300 > max, "the filler did not fill ({} VMAs)", before.vmas);
    let faults = Faults::new();
    let e = iovmap::map(&list).unwrap_err();
    assert!(faults.calls(Syscall::Clone) > 1, "placement started before the cap was hit");
    drop(faults);
    assert!(matches!(e, Error::TooManyMappings { needed: 300, .. }), "{e:?}");
    before.assert_unchanged("cap hit while placing");
}

fn vmas_are_counted_up_front_only_near_the_cap() {
    // A 1,000-run view in a process far from vm.max_map_count is not counted up front
    // (the count costs ~0.25 µs per VMA of the process); a view whose runs could reach
    // the cap is.
    let max = max_map_count();
    let p = page();
    let ram = GuestRam::new(2 * (max + 100) * p).unwrap(); // sparse
    let small: Vec<_> = (0..1000).map(|i| ram.iov(2 * i * p, p)).collect();
    drop(iovmap::map(&small).unwrap()); // the first one is counted: nothing known yet
    let faults = Faults::new();
    drop(iovmap::map(&small).unwrap());
    assert_eq!(faults.calls(Syscall::VmaCount), 0, "far from the cap: not counted");
    // Within SLACK (8,192) of the cap: counted.
    let near: Vec<_> = (0..max - 4000).map(|i| ram.iov(2 * i * p, p)).collect();
    let before = Counts::now();
    let r = iovmap::map(&near);
    assert_eq!(faults.calls(Syscall::VmaCount), 1, "near the cap: counted before placing");
    drop(faults);
    drop(r.unwrap());
    before.assert_unchanged("near-cap view");
    // A count that fails leaves nothing behind either.
    let faults = Faults::new().fail(Syscall::VmaCount, 0, libc::EIO);
    let e = iovmap::map(&near).unwrap_err();
    assert!(faults.fired());
    assert_eq!(kit::errno_of(&e), Some(libc::EIO), "{e:?}");
    assert_eq!(faults.calls(Syscall::Reserve), 0, "nothing was reserved");
    drop(faults);
    before.assert_unchanged("failed count");
}

/// `threads` threads each build and drop `views` views of random lists over `ram` (and
/// the BPF array, when given), checking the bytes of one view in ten.
fn threads_workload(r: &Remapper, ram: &GuestRam, bpf: Option<&BpfArray>, threads: usize, views: usize) -> usize {
    let p = page();
    let ram_pages = ram.len() / p;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng::new(0x9e37_79b9 + t as u64);
                    let mut checked = 0;
                    for v in 0..views {
                        let mut list = Vec::new();
                        for _ in 0..1 + rng.below(12) {
                            let run = 1 + rng.below(4);
                            match bpf {
                                Some(a) if rng.below(3) == 0 => {
                                    let start = rng.below(a.map.len() / p - run);
                                    list.push(a.map.iov(start * p, run * p));
                                }
                                _ => list.push(ram.iov(rng.below(ram_pages - run) * p, run * p)),
                            }
                        }
                        let view = r.map(&list).unwrap_or_else(|e| panic!("thread {t} view {v}: {e}"));
                        if v % 10 == 0 {
                            // SAFETY: nothing writes the sources during the workload.
                            let want = unsafe { iovmap_peers::gather(&list) };
                            // SAFETY: the view is live for len() bytes.
                            let diff = unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) };
                            assert_eq!(diff, None, "thread {t} view {v}");
                            checked += 1;
                        }
                    }
                    checked
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

fn threads_share_a_remapper_without_leaks() {
    let ram = GuestRam::new(256 * page()).unwrap();
    ram.fill(3);
    let bpf = BpfArray::new(32).ok();
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    if let Some(a) = &bpf {
        // SAFETY: the array mapping is writable and not yet shared.
        unsafe { kit::fill(a.map.ptr(), a.map.len(), 4, 0) };
        r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
    } else {
        eprintln!("SKIP part: no BPF array, RAM only");
    }
    threads_workload(&r, &ram, bpf.as_ref(), 4, 10); // warm the thread caches
    let before = Counts::now();
    let checked = threads_workload(&r, &ram, bpf.as_ref(), 4, 1000);
    before.assert_unchanged("4 threads x 1,000 views");
    assert_eq!(checked, 400);
}

// Kernels that punch holes (Linux before 6.17) are emulated here with
// `Faults::assume_holes(true)`: the map path takes its hole-safe branch, and an injected
// clone refusal really unmaps its destination, as 6.1 does. The guest VM test
// (crates/iovmap-vmtest) runs the same path on a real 6.1 kernel and vfio BAR.

fn hole_kernels_learn_refusals() {
    let p = page();
    let ram = GuestRam::new(16 * p).unwrap();
    ram.fill(21);
    let Ok(ring) = PerfRing::new(2) else {
        eprintln!("SKIP hole_kernels_learn_refusals: no perf ring");
        return;
    };
    let faults = Faults::new().assume_holes(true);
    let mut r = Remapper::new();
    r.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
    assert_eq!(faults.calls(Syscall::CloneProbe), 1, "registration learns the refusal");
    let list = [ram.iov(0, p), ring.map.iov(0, ring.map.len()), ram.iov(4 * p, p)];
    let view = r.map(&list).unwrap();
    let s = view.stats();
    assert_eq!((s.cloned, s.fd_mapped), (2, 1));
    assert_eq!(s.syscalls, 4, "one probe of the RAM, two clones, one fd map: no refused clone");
    assert_eq!(faults.calls(Syscall::Clone), 2, "only clones known to work went into the reservation");
    // SAFETY: the sources are live fixtures nothing writes meanwhile.
    let want = unsafe { iovmap_peers::gather(&list) };
    // SAFETY: the view is live for len() bytes.
    assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
    drop(view);
    // Unregistered: the probe refuses, and nothing is cloned into the reservation.
    let e = iovmap::map(&[ring.map.iov(0, ring.map.len())]).unwrap_err();
    assert!(matches!(e, Error::NoFallback { index: 0, .. }), "{e:?}");
    assert_eq!(kit::errno_of(&e), Some(libc::EFAULT), "the probe's refusal is the error's source");
    assert_eq!(faults.calls(Syscall::Clone), 2);
    assert_eq!(faults.calls(Syscall::CloneProbe), 3);
}

fn hole_kernels_never_clobber() {
    let p = page();
    let ram = GuestRam::new(16 * p).unwrap();
    ram.fill(22);
    let list = [ram.iov(0, p), ram.iov(4 * p, 2 * p), ram.iov(8 * p, p)];
    let registered = || {
        let _learn = Faults::new().assume_holes(true);
        let mut r = Remapper::new();
        r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
        r
    };
    let r1 = registered();
    let r2 = registered();
    let r3 = registered();
    let before = Counts::now();

    // The second clone is refused anyway (as if the source changed under the call). The
    // kernel has unmapped its destination; nobody took it: the fd fills it without
    // replacing anything, and the view is right.
    {
        let faults = Faults::new().assume_holes(true).fail(Syscall::Clone, 1, libc::EFAULT);
        let view = r1.map(&list).unwrap();
        assert!(faults.fired());
        // The refusal is learned: the third run goes to the fd directly.
        assert_eq!((view.stats().cloned, view.stats().fd_mapped), (1, 2));
        // SAFETY: live fixtures and view.
        let want = unsafe { iovmap_peers::gather(&list) };
        assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
    }
    before.assert_unchanged("refused clone, hole refilled by MAP_FIXED_NOREPLACE");

    // The same refusal for a source that is not mapped at all comes before the unmap: the
    // destination is still the reservation. iovmap must see that (the reservation is
    // marked) and neither fail to refill it nor leave it behind.
    for (what, remapper) in [("registered", Some(&r3)), ("unregistered", None)] {
        let faults = Faults::new().assume_holes(true).refuse_before_unmap().fail(Syscall::Clone, 1, libc::EFAULT);
        let got = match remapper {
            Some(r) => r.map(&list),
            None => iovmap::map(&list),
        };
        assert!(faults.fired());
        let lookups = faults.calls(Syscall::VmaQuery) + faults.calls(Syscall::MapsRead);
        drop(faults);
        match (what, got) {
            ("registered", Ok(view)) => {
                assert_eq!(view.stats().fd_mapped, 2, "refilled with MAP_FIXED, the range being ours");
                // SAFETY: live fixtures and view.
                let want = unsafe { iovmap_peers::gather(&list) };
                assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
            }
            ("unregistered", Err(Error::NoFallback { index: 1, .. })) => {}
            (_, got) => panic!("{what}: {:?}", got.map(|v| v.stats().clone())),
        }
        assert!(lookups >= 1, "{what}: the kernel was asked what is at the destination");
        before.assert_unchanged(&format!("{what}: refusal before the unmap"));
    }

    // Another thread maps into the hole first: iovmap must neither overwrite nor unmap it.
    for (what, remapper) in [("registered", Some(&r2)), ("unregistered", None)] {
        let faults = Faults::new().assume_holes(true).fail(Syscall::Clone, 1, libc::EFAULT).squat_in_holes();
        let e = match remapper {
            Some(r) => r.map(&list).unwrap_err(),
            None => iovmap::map(&list).unwrap_err(),
        };
        let (at, len) = faults.squatter().expect("the injected refusal punched a hole and it was taken");
        drop(faults);
        match (what, &e) {
            ("registered", Error::Os { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EEXIST), "{e}"),
            ("unregistered", Error::NoFallback { index: 1, .. }) => {}
            _ => panic!("{what}: {e:?}"),
        }
        // SAFETY: the squatter mapping is live (that is the point) for `len` bytes.
        let intact = unsafe { std::slice::from_raw_parts(at as *const u8, len) }
            .iter()
            .all(|&b| b == iovmap::fault::SQUATTER_BYTE);
        assert!(intact, "{what}: the foreign mapping in the hole was overwritten");
        assert_eq!(kit::count_vmas(), before.vmas + 1, "{what}: exactly the foreign mapping remains");
        // SAFETY: the squatter is this test's mapping, made by the fault injector.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
        before.assert_unchanged(what);
    }
}

fn hole_kernels_refusal_sweep() {
    let p = page();
    let ram = GuestRam::new(64 * p).unwrap();
    ram.fill(23);
    let bpf = BpfArray::new(8).ok();
    // Half of guest RAM registered, half not; a BPF array (refused) when we have one.
    let mut list: Vec<libc::iovec> = (0..6).map(|i| ram.iov(i * 10 * p, 2 * p)).collect();
    if let Some(a) = &bpf {
        list.insert(3, a.map.iov(2 * p, p));
    }
    let fresh = || {
        let _learn = Faults::new().assume_holes(true);
        let mut r = Remapper::new();
        r.register(ram.ptr(), 32 * p, ram.fd(), 0).unwrap();
        if let Some(a) = &bpf {
            r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
        }
        r
    };
    let clones = {
        let r = fresh();
        let faults = Faults::new().assume_holes(true);
        drop(r.map(&list).unwrap());
        faults.calls(Syscall::Clone)
    };
    assert!(clones >= 6);
    let (mut refilled, mut refused) = (0, 0);
    for k in 0..clones {
        let before = Counts::now();
        let r = fresh();
        let faults = Faults::new().assume_holes(true).fail(Syscall::Clone, k, libc::EFAULT);
        match r.map(&list) {
            Ok(view) => {
                // SAFETY: live fixtures and view.
                let want = unsafe { iovmap_peers::gather(&list) };
                assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
                refilled += 1;
            }
            Err(Error::NoFallback { .. }) => refused += 1,
            Err(e) => panic!("refusal at clone #{k}: {e:?}"),
        }
        assert!(faults.fired());
        drop(faults);
        drop(r);
        before.assert_unchanged(&format!("refusal at clone #{k}"));
    }
    println!("  {clones} refusals: {refilled} refilled from the fd, {refused} without a fallback");
    assert!(refilled > 0 && refused > 0, "both the registered and the unregistered half were hit");
}
