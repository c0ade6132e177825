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

use std::os::fd::{AsFd, BorrowedFd};

use iovmap::fault::Faults;
use iovmap::vfio::{VFIO_REGION_INFO_FLAG_MMAP, VfioRegionInfo};
use iovmap::{Error, MapOptions, Operation, RegionContext, RegionError, Remapper};
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
        ("kernel_built_refusals_fall_back_or_fail_cleanly", kernel_built_refusals_fall_back_or_fail_cleanly),
        (
            "userfaultfd_refusals_and_failures_leave_nothing_behind",
            userfaultfd_refusals_and_failures_leave_nothing_behind,
        ),
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
    r.regions().map(|g| (g.addr as usize, g.len, g.offset)).collect()
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
            matches!(e, Error::Unaligned { index: 1, .. })
        }),
        ("not mapped", vec![ram.iov(0, page()), dangling], |e| matches!(e, Error::NotMapped { index: 1 })),
        ("private", vec![ram.iov(0, page()), private.iov(0, page())], |e| {
            matches!(e, Error::NotShareable { index: 1 })
        }),
        // A read-write view of a read-only mapping is refused before anything is mapped.
        ("beyond its source", vec![ram.iov(0, page()), ro_map.iov(page(), page())], |e| {
            matches!(e, Error::ExceedsSource { index: 1, prot: libc::PROT_READ, .. })
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
    // Asked to raise it, the clone of page 0 succeeds, then mprotect refuses (the fd was
    // opened read-only): the placed run is undone.
    let raise = MapOptions::new().raise_source_protection();
    let e = r.map_with(&[ram.iov(0, page()), ro_map.iov(page(), page())], raise).unwrap_err();
    assert!(matches!(e, Error::NotWritable { index: 1 }), "{e:?}");
    before.assert_unchanged("not writable");
    // A mapping longer than its file: populate reaches a page past the end (which a load
    // would meet with SIGBUS), by madvise or, on a kernel without MADV_POPULATE_*, by
    // reads. Either names the segment, and the view is undone.
    let short = kit::memfd("short", 0).unwrap();
    short.set_len(2 * page() as u64).unwrap();
    let past =
        Mapping::new(4 * page(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(short.as_fd()), 0).unwrap();
    let list = [ram.iov(0, page()), past.iov(0, 4 * page())];
    let before = Counts::now();
    for old_kernel in [false, true] {
        let faults = if old_kernel { Faults::new().without_populate_advice() } else { Faults::new() };
        let e = r.map_with(&list, MapOptions::new().populate()).unwrap_err();
        drop(faults);
        match &e {
            Error::Os { op: Operation::Populate, index: Some(1), source } => {
                assert_eq!(source.raw_os_error(), Some(libc::EFAULT), "{e:?}")
            }
            other => panic!("without MADV_POPULATE_* {old_kernel}: {other:?}"),
        }
        before.assert_unchanged(&format!("populate past the end of the file (emulating 5.13: {old_kernel})"));
    }
    // dma-bufs of BAR runs vfio-pci will not export (a perf ring registered as a vfio
    // region: no VFIO_DEVICE_FEATURE, ENOTTY), after a memfd run: nothing stays open.
    if let Some(ring) = &ring {
        let sealed = GuestRam::sealed(4 * page()).unwrap();
        let info = VfioRegionInfo {
            index: 2,
            flags: VFIO_REGION_INFO_FLAG_MMAP | iovmap::vfio::VFIO_REGION_INFO_FLAG_READ,
            size: ring.map.len() as u64,
            offset: 0,
            sparse_areas: None,
        };
        let mut bars = Remapper::new();
        bars.register_vfio_region_info(ring.fd(), &info, ring.map.ptr()).unwrap();
        bars.register(sealed.ptr(), sealed.len(), sealed.fd(), 0).unwrap();
        let before = Counts::now();
        let e = bars.dmabufs(&[sealed.iov(0, page()), ring.map.iov(0, page())]).unwrap_err();
        // With udmabuf, the memfd's dma-buf is made first and closed again.
        let at = if kit::udmabuf().is_ok() { 1 } else { 0 };
        assert!(matches!(e, Error::KernelBuilt { index, .. } if index == at), "{e:?}");
        before.assert_unchanged("dma-bufs of a BAR run that is not exported");
    }
}

/// A registration that must fail, and how.
type RegistrationCase<'a> = (&'a str, *const u8, usize, BorrowedFd<'a>, u64, fn(&RegionError) -> bool);

fn registration_errors_leave_nothing_behind() {
    let ram = GuestRam::new(16 * page()).unwrap();
    let other = GuestRam::new(16 * page()).unwrap();
    let private = Mapping::anon_private(4 * page()).unwrap();
    let (pipe_r, _pipe_w) = kit::pipe().unwrap();
    let gone_ptr = kit::unmapped_address();
    // A mapping longer than its file (2 pages of file, 4 mapped): what lies past the end
    // would SIGBUS.
    let short = kit::memfd("short", 0).unwrap();
    short.set_len(2 * page() as u64).unwrap();
    let past =
        Mapping::new(4 * page(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(short.as_fd()), 0).unwrap();
    let mut r = Remapper::new();
    r.register(ram.ptr(), 8 * page(), ram.fd(), 0).unwrap();
    let before = Counts::now();
    let table = regions(&r);
    let p = page();
    let at = |pages: usize| ram.ptr().wrapping_add(pages * p) as *const u8;
    let fd = ram.fd();
    let bad: Vec<RegistrationCase> = vec![
        ("zero length", at(0), 0, fd, 0, |k| matches!(k, RegionError::Empty)),
        ("overlap", at(4), 8 * p, fd, 4 * p as u64, |k| matches!(k, RegionError::Overlap { .. })),
        ("file too short", past.ptr(), 4 * p, short.as_fd(), 0, |k| matches!(k, RegionError::FileTooShort { .. })),
        ("unaligned address", ram.ptr().wrapping_add(8 * p + 1), p, fd, 0, |k| {
            matches!(k, RegionError::Unaligned { .. })
        }),
        ("unaligned offset", at(8), p, fd, 7, |k| matches!(k, RegionError::Unaligned { .. })),
        ("unaligned length", at(8), p + 1, fd, 0, |k| matches!(k, RegionError::Unaligned { .. })),
        ("wraps", (usize::MAX - p + 1) as *const u8, 2 * p, fd, 0, |k| matches!(k, RegionError::Wraps)),
        ("offset overflows", at(8), p, fd, u64::MAX - p as u64 + 1, |k| matches!(k, RegionError::OffsetOverflow)),
        ("not mapped", gone_ptr, p, fd, 0, |k| matches!(k, RegionError::NotMapped { .. })),
        ("private", private.ptr(), p, fd, 0, |k| matches!(k, RegionError::Private { .. })),
        ("another file's fd", at(8), p, other.fd(), 8 * p as u64, |k| matches!(k, RegionError::NotTheFile { .. })),
        ("a pipe", at(8), p, pipe_r.as_fd(), 8 * p as u64, |k| matches!(k, RegionError::NotTheFile { .. })),
        ("wrong offset", at(8), p, fd, 9 * p as u64, |k| matches!(k, RegionError::WrongOffset { .. })),
    ];
    for (what, addr, len, fd, off, kind) in bad {
        let e = r.register(addr, len, fd, off).expect_err(what);
        assert!(
            matches!(&e, Error::InvalidRegion { addr: a, len: l, offset: o, context: RegionContext::Register, kind: k }
                if *a == addr as usize && *l == len && *o == off && kind(k)),
            "{what}: {e:?}"
        );
        assert!(e.to_string().starts_with("cannot register ["), "{what}: {e}");
        before.assert_unchanged(what);
        assert_eq!(regions(&r), table, "{what}: registered table changed");
    }
    // The syscalls a registration makes, failed one by one: nothing registered, no fd kept.
    for op in [Operation::FileStat, Operation::VmaQuery, Operation::MapsRead, Operation::DupFd] {
        let faults = Faults::new().fail(op, 0, libc::EIO);
        let res = r.register(at(8), 8 * p, fd, 8 * p as u64);
        if !faults.fired() {
            assert!(res.is_ok(), "{op:?}: {res:?}");
            drop(faults);
            r.unregister(res.unwrap()).unwrap();
            continue; // PROCMAP_QUERY or /proc/self/maps, whichever this kernel uses
        }
        let e = res.expect_err("an injected failure");
        assert!(
            matches!(&e, Error::InvalidRegion { kind: RegionError::Os { op: o, source }, .. }
                if (*o == op || (op == Operation::MapsRead && *o == Operation::VmaQuery)) && source.raw_os_error() == Some(libc::EIO)),
            "{op:?}: {e:?}"
        );
        drop(faults);
        before.assert_unchanged(&format!("registration failing at {op:?}"));
        assert_eq!(regions(&r), table, "{op:?}: registered table changed");
    }
    // A vfio registration of several areas fails whole: the first area was fine.
    let sparse = VfioRegionInfo {
        index: 2,
        flags: VFIO_REGION_INFO_FLAG_MMAP,
        size: 8 * p as u64,
        offset: 8 * p as u64,
        sparse_areas: Some(vec![(0, 2 * p as u64), (4 * p as u64, 2 * p as u64)]),
    };
    let other_file =
        VfioRegionInfo { sparse_areas: Some(vec![(0, 2 * p as u64), (4 * p as u64, 2 * p as u64)]), ..sparse.clone() };
    let e = r.register_vfio_region_info(other.fd(), &other_file, at(8)).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::InvalidRegion {
                context: RegionContext::Vfio { index: 2 },
                kind: RegionError::NotTheFile { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let past_end =
        VfioRegionInfo { sparse_areas: Some(vec![(0, 2 * p as u64), (4 * p as u64, 8 * p as u64)]), ..sparse };
    let e = r.register_vfio_region_info(ram.fd(), &past_end, at(8)).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::InvalidRegion { context: RegionContext::Vfio { index: 2 }, kind: RegionError::Vfio(_), .. }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("vfio region 2"), "{e}");
    let no_mmap = VfioRegionInfo { flags: 0, sparse_areas: None, ..past_end };
    assert!(r.register_vfio_region_info(ram.fd(), &no_mmap, at(8)).is_err());
    before.assert_unchanged("vfio registrations");
    assert_eq!(regions(&r), table);

    // Unregistering closes the duplicated fd; an id that is gone is refused.
    let id = r.regions().next().unwrap().id;
    r.unregister(id).unwrap();
    assert_eq!(kit::count_fds(), before.fds - 1);
    let e = r.unregister(id).unwrap_err();
    assert!(matches!(e, Error::NotRegistered { id: gone } if gone == id), "{e:?}");
}

/// One scenario of the fault-injection sweep: a remapper, a list, options.
struct Scenario<'a> {
    name: &'a str,
    remapper: &'a Remapper,
    list: Vec<libc::iovec>,
    opts: MapOptions,
    /// Emulate a kernel without MADV_POPULATE_* (Linux before 5.14).
    no_populate_advice: bool,
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
            opts: MapOptions::new().populate(),
            no_populate_advice: false,
        },
        Scenario {
            name: "mixed, populate by reads (no MADV_POPULATE_*, Linux before 5.14)",
            remapper: &mixed,
            list: list.clone(),
            opts: MapOptions::new().populate(),
            no_populate_advice: true,
        },
        Scenario {
            name: "read-only (mprotect)",
            remapper: &plain,
            list: vec![ram.iov(0, p), ram.iov(8 * p, 8 * p)],
            opts: MapOptions::new().read_only().populate(),
            no_populate_advice: false,
        },
        Scenario {
            name: "many runs",
            remapper: &plain,
            list: (0..600).map(|i| ram.iov((i % 32) * 2 * p, p)).collect(),
            opts: MapOptions::default(),
            no_populate_advice: false,
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
                no_populate_advice: false,
            });
        }
        Err(e) => eprintln!("SKIP part: no huge pages for the trim step: {e}"),
    }
    // Kernel-built runs (udmabuf): the device's open, each buffer's ioctl and mmap.
    let sealed = GuestRam::sealed(64 * p).unwrap();
    sealed.fill(2);
    let mut sealed_remapper = Remapper::new();
    sealed_remapper.register(sealed.ptr(), sealed.len(), sealed.fd(), 0).unwrap();
    let udmabuf = kit::udmabuf();
    match &udmabuf {
        Ok(()) => {
            let scattered: Vec<libc::iovec> = (0..16).map(|i| sealed.iov((31 - i) * 2 * p, p)).collect();
            let mut with_clone = scattered[..8].to_vec();
            with_clone.push(ram.iov(50 * p, 2 * p));
            with_clone.extend_from_slice(&scattered[8..]);
            scenarios.push(Scenario {
                name: "kernel-built, populate",
                remapper: &sealed_remapper,
                list: scattered,
                opts: MapOptions::new().kernel_built().populate(),
                no_populate_advice: false,
            });
            scenarios.push(Scenario {
                name: "automatic: kernel-built and cloned, read-only",
                remapper: &sealed_remapper,
                list: with_clone,
                opts: MapOptions::new().read_only().populate(),
                no_populate_advice: false,
            });
        }
        Err(e) => eprintln!("SKIP part: no kernel-built scenario: {e}"),
    }
    let mut injected = 0;
    let mut reached = std::collections::BTreeSet::new();
    for s in &scenarios {
        // A clean run first, so the remapper has learned which regions refuse the clone;
        // then a counted one: how many times does each syscall happen?
        let armed = || if s.no_populate_advice { Faults::new().without_populate_advice() } else { Faults::new() };
        drop(s.remapper.map_with(&s.list, s.opts).unwrap_or_else(|e| panic!("{}: {e}", s.name)));
        let faults = armed();
        let view = s.remapper.map_with(&s.list, s.opts).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        let calls: Vec<(Operation, usize)> = Operation::ALL.iter().map(|&sc| (sc, faults.calls(sc))).collect();
        drop(faults);
        drop(view);
        let before = Counts::now();
        let table = regions(s.remapper);
        for (sc, n) in calls {
            for k in 0..n {
                let faults = armed().fail(sc, k, libc::EIO);
                let r = s.remapper.map_with(&s.list, s.opts);
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
        drop(s.remapper.map_with(&s.list, s.opts).unwrap());
    }
    println!("  injected {injected} failures across {} scenarios, at {reached:?}", scenarios.len());
    // VMA lookups are PROCMAP_QUERY ioctls (Linux 6.11+) or reads of /proc/self/maps;
    // the up-front VMA count (near the cap only) has its own check below.
    let mut must = vec!["Reserve", "Clone", "Protect", "Populate"];
    must.push(if kit::has_procmap_query() { "VmaQuery" } else { "MapsRead" });
    if iovmap::kernel_punches_holes() {
        must.push("CloneProbe");
    }
    if bpf.is_some() || ring.is_some() {
        must.push("FdMap");
    }
    if huge.is_ok() {
        must.push("Trim");
    }
    if udmabuf.is_ok() {
        must.extend(["UdmabufOpen", "UdmabufCreate", "DmabufMap"]);
    }
    for m in must {
        assert!(reached.contains(m), "the sweep never failed {m}");
    }
}

/// Where udmabuf refuses in ways automatic placement falls back from (the device denied,
/// seals, limits, pinning), the view is remapped, says why, and leaves nothing behind;
/// kernel-built placement fails instead, naming the reason, and leaves nothing behind.
fn kernel_built_refusals_fall_back_or_fail_cleanly() {
    if let Err(e) = kit::udmabuf() {
        eprintln!("SKIP kernel_built_refusals_fall_back_or_fail_cleanly: {e}");
        return;
    }
    let p = page();
    let sealed = GuestRam::sealed(64 * p).unwrap();
    sealed.fill(3);
    let mut r = Remapper::new();
    r.register(sealed.ptr(), sealed.len(), sealed.fd(), 0).unwrap();
    let list: Vec<libc::iovec> = (0..16).map(|i| sealed.iov(i * 2 * p, p)).collect();
    // A clean view of each kind first: what the process keeps is in place.
    drop(r.map(&list).unwrap());
    drop(r.map_with(&list, MapOptions::new().kernel_built()).unwrap());
    let before = Counts::now();
    use iovmap::KernelBuiltError as K;
    for (op, errno, why) in [
        (Operation::UdmabufOpen, libc::EACCES, K::DeviceDenied { errno: libc::EACCES }),
        (Operation::UdmabufCreate, libc::EINVAL, K::Refused { errno: libc::EINVAL }),
        (Operation::UdmabufCreate, libc::E2BIG, K::Refused { errno: libc::E2BIG }),
        (Operation::UdmabufCreate, libc::ENOMEM, K::Refused { errno: libc::ENOMEM }),
    ] {
        let faults = Faults::new().fail(op, 0, errno);
        let view = r.map(&list).unwrap_or_else(|e| panic!("{op:?} {errno}: automatic must fall back: {e}"));
        assert!(faults.fired());
        drop(faults);
        let s = *view.stats();
        assert_eq!((s.kernel_built, s.cloned, s.dmabufs, s.kernel_built_declined), (0, 16, 0, Some(why)), "{op:?}");
        drop(view);
        before.assert_unchanged(&format!("automatic after {op:?} {errno}"));
        let faults = Faults::new().fail(op, 0, errno);
        let e = r.map_with(&list, MapOptions::new().kernel_built()).unwrap_err();
        drop(faults);
        assert!(matches!(e, Error::KernelBuilt { index: 0, reason } if reason == why), "{op:?}: {e:?}");
        before.assert_unchanged(&format!("kernel-built after {op:?} {errno}"));
    }
    println!("  automatic fell back and kernel-built failed cleanly on 4 refusals");
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
    assert_eq!(faults.calls(Operation::Reserve), 0, "refused before reserving anything");
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
    assert!(faults.calls(Operation::Clone) > 1, "placement started before the cap was hit");
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
    assert_eq!(faults.calls(Operation::VmaCount), 0, "far from the cap: not counted");
    // Within SLACK (8,192) of the cap: counted.
    let near: Vec<_> = (0..max - 4000).map(|i| ram.iov(2 * i * p, p)).collect();
    let before = Counts::now();
    let r = iovmap::map(&near);
    assert_eq!(faults.calls(Operation::VmaCount), 1, "near the cap: counted before placing");
    drop(faults);
    drop(r.unwrap());
    before.assert_unchanged("near-cap view");
    // A count that fails leaves nothing behind either.
    let faults = Faults::new().fail(Operation::VmaCount, 0, libc::EIO);
    let e = iovmap::map(&near).unwrap_err();
    assert!(faults.fired());
    assert_eq!(kit::errno_of(&e), Some(libc::EIO), "{e:?}");
    assert_eq!(faults.calls(Operation::Reserve), 0, "nothing was reserved");
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
    assert_eq!(faults.calls(Operation::CloneProbe), 1, "registration learns the refusal");
    let list = [ram.iov(0, p), ring.map.iov(0, ring.map.len()), ram.iov(4 * p, p)];
    let view = r.map(&list).unwrap();
    let s = view.stats();
    assert_eq!((s.cloned, s.fd_mapped), (2, 1));
    assert_eq!(s.syscalls, 4, "one probe of the RAM, two clones, one fd map: no refused clone");
    assert_eq!(faults.calls(Operation::Clone), 2, "only clones known to work went into the reservation");
    // SAFETY: the sources are live fixtures nothing writes meanwhile.
    let want = unsafe { iovmap_peers::gather(&list) };
    // SAFETY: the view is live for len() bytes.
    assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
    drop(view);
    // Unregistered, beside RAM: the probes learn (the RAM clones, the ring refuses), and
    // nothing is cloned into the reservation that could be refused.
    let e = iovmap::map(&[ram.iov(0, p), ring.map.iov(0, ring.map.len())]).unwrap_err();
    assert!(matches!(e, Error::NoFallback { index: 1, .. }), "{e:?}");
    assert_eq!(kit::errno_of(&e), Some(libc::EFAULT), "the probe's refusal is the error's source");
    assert_eq!(faults.calls(Operation::CloneProbe), 4);
    assert_eq!(faults.calls(Operation::Clone), 3, "only the RAM's clone, known to work, went into a reservation");
    // Alone, the ring is a one-run view: no reservation, so no probe: the clone goes where
    // the kernel chooses, and its refusal loses nothing.
    let e = iovmap::map(&[ring.map.iov(0, ring.map.len())]).unwrap_err();
    assert!(matches!(e, Error::NoFallback { index: 0, .. }), "{e:?}");
    assert_eq!(kit::errno_of(&e), Some(libc::EFAULT));
    assert_eq!((faults.calls(Operation::CloneProbe), faults.calls(Operation::Clone)), (4, 4));
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
        let faults = Faults::new().assume_holes(true).fail(Operation::Clone, 1, libc::EFAULT);
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
        let faults = Faults::new().assume_holes(true).refuse_before_unmap().fail(Operation::Clone, 1, libc::EFAULT);
        let got = match remapper {
            Some(r) => r.map(&list),
            None => iovmap::map(&list),
        };
        assert!(faults.fired());
        let lookups = faults.calls(Operation::VmaQuery) + faults.calls(Operation::MapsRead);
        drop(faults);
        match (what, got) {
            ("registered", Ok(view)) => {
                assert_eq!(view.stats().fd_mapped, 2, "refilled with MAP_FIXED, the range being ours");
                // SAFETY: live fixtures and view.
                let want = unsafe { iovmap_peers::gather(&list) };
                assert_eq!(unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) }, None);
            }
            ("unregistered", Err(Error::NoFallback { index: 1, .. })) => {}
            (_, got) => panic!("{what}: {:?}", got.map(|v| *v.stats())),
        }
        assert!(lookups >= 1, "{what}: the kernel was asked what is at the destination");
        before.assert_unchanged(&format!("{what}: refusal before the unmap"));
    }

    // Another thread maps into the hole first: iovmap must neither overwrite nor unmap it.
    for (what, remapper) in [("registered", Some(&r2)), ("unregistered", None)] {
        let faults = Faults::new().assume_holes(true).fail(Operation::Clone, 1, libc::EFAULT).squat_in_holes();
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
        faults.calls(Operation::Clone)
    };
    assert!(clones >= 6);
    let (mut refilled, mut refused) = (0, 0);
    for k in 0..clones {
        let before = Counts::now();
        let r = fresh();
        let faults = Faults::new().assume_holes(true).fail(Operation::Clone, k, libc::EFAULT);
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

/// The userfaultfd guard's error paths: a writable view of write-protected memory, and a
/// failure while faulting armed pages in, leave no mapping and no fd (the userfaultfd is
/// really registered: MISSING, or WP where the kernel has it on shmem).
fn userfaultfd_refusals_and_failures_leave_nothing_behind() {
    use iovmap::userfaultfd::{self, Modes};
    use iovmap_testkit::monitor::{self, Mode};
    let ram = GuestRam::new(8 * page()).unwrap();
    ram.fill(3);
    let other = GuestRam::new(2 * page()).unwrap();
    let list = [other.iov(0, page()), ram.iov(0, page()), ram.iov(4 * page(), 2 * page())];
    let (mode, modes) = match monitor::open(Mode::Wp, 0) {
        Ok(u) => (Some(u), Modes::WP),
        Err(why) => {
            eprintln!("SKIP part: WP on shmem ({why}); the refusal is checked with the record alone");
            (None, Modes::WP)
        }
    };
    let r = Remapper::new();
    match &mode {
        Some(u) => drop(userfaultfd::register(u.as_fd(), ram.ptr(), ram.len(), modes).expect("UFFDIO_REGISTER WP")),
        None => userfaultfd::declare_armed(ram.ptr(), ram.len(), modes),
    }
    let before = Counts::now();
    for opts in [MapOptions::new(), MapOptions::new().populate(), MapOptions::new().kernel_built()] {
        let e = r.map_with(&list, opts).unwrap_err();
        assert!(matches!(e, Error::WriteProtected { index: 1 }), "{opts:?}: {e:?}");
        before.assert_unchanged(&format!("write-protected, {opts:?}"));
    }
    drop(r.map_with(&list, MapOptions::new().read_only()).expect("a read-only view of WP memory"));
    before.assert_unchanged("a read-only view of WP memory, dropped");
    match &mode {
        Some(u) => userfaultfd::unregister(u.as_fd(), ram.ptr(), ram.len()).unwrap(),
        None => userfaultfd::declare_disarmed(ram.ptr(), ram.len()),
    }
    drop(mode);
    // MISSING, every page present (no monitor needed): a failure while faulting them in.
    let uffd = monitor::open(Mode::Missing, 0).expect("a MISSING userfaultfd (Linux 4.11+)");
    userfaultfd::register(uffd.as_fd(), ram.ptr(), ram.len(), Modes::MISSING).unwrap();
    let before = Counts::now();
    for opts in [MapOptions::new(), MapOptions::new().read_only()] {
        let faults = Faults::new().fail(Operation::FaultInArmed, 0, libc::EINTR);
        let e = r.map_with(&list, opts).unwrap_err();
        assert!(faults.fired());
        assert!(matches!(e, Error::Os { op: Operation::FaultInArmed, index: Some(1), .. }), "{opts:?}: {e:?}");
        before.assert_unchanged(&format!("a failure faulting armed pages in, {opts:?}"));
    }
    let view = r.map(&list).expect("the same list, without the failure");
    assert_eq!(view.stats().monitor_resolved, 3 * page());
    drop(view);
    before.assert_unchanged("a view of MISSING memory, dropped");
    userfaultfd::unregister(uffd.as_fd(), ram.ptr(), ram.len()).unwrap();
}
