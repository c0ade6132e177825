//! Hardening beyond `leaks.rs`: what a fault, a full VMA table or a vanished source does,
//! for the paths `leaks.rs` does not sweep.
//!
//! - injected failures at every syscall of a read-only, populated view mixing clones and
//!   fd runs (mprotect over fd runs, MADV_POPULATE_READ split around device runs);
//! - injected failures at every syscall on a kernel that punches holes (emulated), which
//!   is where clone probes happen, and at every syscall of `map_guest`;
//! - `map_guest`'s own errors leave nothing behind and name the guest entry;
//! - `vm.max_map_count` pressure at several distances from the limit, for views checked
//!   before placing (>= 512 runs) and views that hit the cap while placing: a view or
//!   `TooManyMappings`, never a half view or a bare ENOMEM;
//! - views outliving every source (mappings unmapped, fds closed, remapper dropped), of
//!   every kind of backing: they keep reading the same memory, and drop cleans up;
//! - a forked child maps its own memory: the VMA lookups iovmap keeps open for the
//!   process describe the child's address space, not the parent's.
//!
//! Like `leaks.rs`, this binary counts process-wide VMAs and fds, so it runs without the
//! libtest harness, one check at a time on the main thread, after a warm-up.
//! `cargo test -p iovmap --test hardening -- <filter>` runs the checks whose name
//! contains `<filter>`.

#[path = "support/steady.rs"]
mod steady;

use iovmap::fault::{Faults, Operation};
use iovmap::{Error, MapOptions, Remapper, View};
use iovmap_testkit::{self as kit, BpfArray, Counts, GuestRam, Mapping, PerfRing};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

fn page() -> usize {
    kit::page()
}

fn main() {
    let checks: &[(&str, fn())] = &[
        ("faults_in_a_read_only_populated_view_with_fd_runs", faults_in_a_read_only_populated_view_with_fd_runs),
        ("faults_on_a_kernel_that_punches_holes", faults_on_a_kernel_that_punches_holes),
        ("faults_and_errors_of_map_guest", faults_and_errors_of_map_guest),
        ("vma_cap_pressure_at_several_distances", vma_cap_pressure_at_several_distances),
        ("views_outlive_every_kind_of_source", views_outlive_every_kind_of_source),
        ("a_forked_child_looks_up_its_own_mappings", a_forked_child_looks_up_its_own_mappings),
    ];
    kit::run_counting_checks("hardening", checks, steady::warm_up);
}

fn regions(r: &Remapper) -> Vec<(usize, usize, u64)> {
    r.regions().map(|g| (g.addr as usize, g.len, g.offset)).collect()
}

#[track_caller]
fn assert_view_matches(view: &View, list: &[libc::iovec]) {
    // SAFETY: the sources are live fixtures nothing writes meanwhile.
    let want = unsafe { iovmap_peers::gather(list) };
    assert_eq!(view.len(), want.len());
    // SAFETY: the view is live for len() bytes.
    let diff = unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) };
    assert_eq!(diff, None, "the view differs from its sources");
}

/// Injects EIO at every call of every syscall `map` makes (counted on a clean run after
/// a warm one), checking each time that the error carries it, and that VMAs, fds and the
/// registered table are as before. Returns how many failures were injected and at which
/// syscalls. `map` runs with faults armed on this thread (`arm` sets them up).
fn sweep(
    what: &str,
    arm: &dyn Fn() -> Faults,
    map: &dyn Fn() -> Result<View, Error>,
    table: &dyn Fn() -> Vec<(usize, usize, u64)>,
) -> (usize, std::collections::BTreeSet<String>) {
    drop(map().unwrap_or_else(|e| panic!("{what}: {e}")));
    let faults = arm();
    let view = map().unwrap_or_else(|e| panic!("{what}: {e}"));
    let calls: Vec<(Operation, usize)> = Operation::ALL.iter().map(|&s| (s, faults.calls(s))).collect();
    drop(faults);
    drop(view);
    let before = Counts::now();
    let registered = table();
    let mut injected = 0;
    let mut reached = std::collections::BTreeSet::new();
    for (sc, n) in calls {
        for k in 0..n {
            let faults = arm().fail(sc, k, libc::EIO);
            let r = map();
            assert!(faults.fired(), "{what}: {sc:?} #{k} was not reached");
            drop(faults);
            let e = r.err().unwrap_or_else(|| panic!("{what}: a failure at {sc:?} #{k} was swallowed"));
            assert_eq!(kit::errno_of(&e), Some(libc::EIO), "{what}: {sc:?} #{k}: {e:?}");
            before.assert_unchanged(&format!("{what}: failure at {sc:?} #{k}"));
            assert_eq!(table(), registered, "{what}: the registered table changed");
            injected += 1;
            reached.insert(format!("{sc:?}"));
        }
    }
    drop(map().unwrap_or_else(|e| panic!("{what}, afterwards: {e}")));
    println!("  {what}: {injected} failures injected, at {reached:?}");
    (injected, reached)
}

fn faults_in_a_read_only_populated_view_with_fd_runs() {
    let p = page();
    let ram = GuestRam::new(64 * p).unwrap();
    ram.fill(31);
    let mut r = Remapper::new();
    r.register(ram.ptr(), 32 * p, ram.fd(), 0).unwrap();
    // RAM clones (registered and not), then device runs and hugetlb between them, so
    // that populate is split into several stretches around the device runs.
    let mut list = vec![ram.iov(2 * p, 2 * p), ram.iov(40 * p, p)];
    let bpf = BpfArray::new(8).ok();
    if let Some(a) = &bpf {
        // SAFETY: the array's writable mapping, not shared yet.
        unsafe { kit::fill(a.map.ptr(), a.map.len(), 32, 0) };
        r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
        list.extend([a.map.iov(p, p), ram.iov(9 * p, p), a.map.iov(5 * p, 2 * p)]);
    } else {
        eprintln!("SKIP part: no BPF array for device fd runs");
    }
    let ring = PerfRing::new(2).ok();
    if let Some(ring) = &ring {
        r.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
        list.push(ring.map.iov(0, ring.map.len()));
    } else {
        eprintln!("SKIP part: no perf ring");
    }
    list.push(ram.iov(50 * p, 3 * p));
    let huge = GuestRam::huge(2 * kit::HUGE_2M);
    match &huge {
        Ok(h) => {
            h.fill(33);
            r.register(h.ptr(), h.len(), h.fd(), 0).unwrap();
            // A huge run must start 2 MiB-aligned in the view: put it first.
            list.insert(0, h.iov(kit::HUGE_2M, kit::HUGE_2M));
        }
        Err(e) => eprintln!("SKIP part: no huge pages: {e}"),
    }
    let opts = MapOptions::new().read_only().populate();
    let view = r.map_with(&list, opts).unwrap();
    assert_view_matches(&view, &list);
    assert!(view.stats().cloned >= 3);
    drop(view);
    let (n, reached) = sweep("read-only, populate, mixed", &Faults::new, &|| r.map_with(&list, opts), &|| regions(&r));
    assert!(n > 0);
    for m in ["Reserve", "Clone", "Protect", "Populate"] {
        assert!(reached.contains(m), "never failed {m}");
    }
    if bpf.is_some() || ring.is_some() || huge.is_ok() {
        assert!(reached.contains("FdMap"), "never failed an fd map");
    }
}

fn faults_on_a_kernel_that_punches_holes() {
    let p = page();
    let ram = GuestRam::new(32 * p).unwrap();
    ram.fill(34);
    let other = Mapping::anon_shared(8 * p).unwrap();
    // SAFETY: a fresh writable mapping.
    unsafe { kit::fill(other.ptr(), other.len(), 35, 0) };
    let bpf = BpfArray::new(4).ok();
    let holes = || Faults::new().assume_holes(true);
    let r = {
        // Registration learns, on such kernels, whether each region clones.
        let _learn = holes();
        let mut r = Remapper::new();
        r.register(ram.ptr(), 16 * p, ram.fd(), 0).unwrap();
        if let Some(a) = &bpf {
            r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
        }
        r
    };
    // Registered RAM (known to clone), unregistered RAM and shared anonymous memory (one
    // probe per VMA per call), the BPF array (known to refuse: straight to the fd).
    let mut list = vec![ram.iov(p, p), ram.iov(20 * p, 2 * p), other.iov(3 * p, p), ram.iov(24 * p, p)];
    if let Some(a) = &bpf {
        list.push(a.map.iov(2 * p, p));
    } else {
        eprintln!("SKIP part: no BPF array");
    }
    let opts = MapOptions::new().populate();
    {
        let faults = holes();
        let view = r.map_with(&list, opts).unwrap();
        assert_view_matches(&view, &list);
        assert_eq!(faults.calls(Operation::CloneProbe), 2, "one probe for each unregistered VMA");
    }
    let (n, reached) = sweep("holes kernel", &holes, &|| r.map_with(&list, opts), &|| regions(&r));
    assert!(n > 0);
    assert!(reached.contains("CloneProbe"), "never failed a clone probe");
}

/// A guest list that must fail, and how.
type GuestCase<'a> = (&'a str, Vec<(GuestAddress, usize)>, fn(&Error) -> bool);

fn memfd_region(len: usize) -> Option<FileOffset> {
    let f = kit::memfd("guest", 0).unwrap();
    f.set_len(len as u64).unwrap();
    Some(FileOffset::new(f, 0))
}

fn faults_and_errors_of_map_guest() {
    const MIB: usize = 1 << 20;
    let p = page();
    let before_all = Counts::now();
    {
        // [0, 4M) memfd, hole, [8M, 12M) memfd, [12M, 16M) hugetlb when it can be had.
        let huge = kit::free_huge_pages() >= 2;
        if !huge {
            eprintln!("SKIP part: no free huge pages; the third region is a plain memfd");
        }
        let third = if huge {
            let f = kit::memfd("guest-huge", libc::MFD_HUGETLB | libc::MFD_HUGE_2MB).unwrap();
            f.set_len(4 * MIB as u64).unwrap();
            Some(FileOffset::new(f, 0))
        } else {
            memfd_region(4 * MIB)
        };
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (GuestAddress(0), 4 * MIB, memfd_region(4 * MIB)),
            (GuestAddress(8 * MIB as u64), 4 * MIB, memfd_region(4 * MIB)),
            (GuestAddress(12 * MIB as u64), 4 * MIB, third),
        ])
        .unwrap();
        let r = Remapper::from_guest_memory(&mem).unwrap();
        let opts = MapOptions::default();
        // An entry that crosses from region 1 into region 2 (two host segments).
        let ranges = [
            (GuestAddress((12 * MIB - 2 * MIB) as u64), 4 * MIB),
            (GuestAddress(5 * p as u64), 3 * p),
            (GuestAddress((8 * MIB + p) as u64), p),
        ];
        let view = r.map_guest(&mem, &ranges, opts).unwrap();
        assert_eq!(view.stats().segments, 4);
        drop(view);

        // Its own errors, with the index of the guest entry, leave nothing behind.
        let before = Counts::now();
        let table = regions(&r);
        let bad: [GuestCase; 5] = [
            ("in the hole", vec![ranges[1], (GuestAddress(5 * MIB as u64), p)], |e| {
                matches!(e, Error::NotInGuestMemory { index: 1 })
            }),
            ("wraps", vec![ranges[1], ranges[2], (GuestAddress(u64::MAX - p as u64 + 1), 2 * p)], |e| {
                matches!(e, Error::NotInGuestMemory { index: 2 })
            }),
            ("empty", vec![(GuestAddress(0), 0)], |e| matches!(e, Error::Empty)),
            // Entry 0 is two host segments: the error names entry 1, not segment 2.
            ("unaligned after a split entry", vec![ranges[0], (GuestAddress(0x3000 + 100), p)], |e| {
                matches!(e, Error::Unaligned { index: 1, .. })
            }),
            ("longer than guest memory", vec![ranges[1], (GuestAddress(0), usize::MAX)], |e| {
                matches!(e, Error::NotInGuestMemory { index: 1 })
            }),
        ];
        for (what, list, want) in &bad {
            let e = r.map_guest(&mem, list, opts).expect_err(what);
            assert!(want(&e), "{what}: {e:?}");
            before.assert_unchanged(what);
            assert_eq!(regions(&r), table, "{what}");
        }
        sweep("map_guest", &Faults::new, &|| r.map_guest(&mem, &ranges, opts), &|| regions(&r));
        // A failure at the second segment's placement names the guest entry it came from.
        let faults = Faults::new().fail(Operation::Clone, 1, libc::EIO);
        let e = r.map_guest(&mem, &ranges, opts).unwrap_err();
        assert!(faults.fired());
        drop(faults);
        // Clones: entry 0's memfd half, then (its hugetlb half being fd-mapped) entry 1.
        assert_eq!(e.index(), Some(if huge { 1 } else { 0 }), "{e:?}");
    }
    before_all.assert_unchanged("guest memory, remapper and views dropped");
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap()
}

/// VMAs iovmap keeps free below vm.max_map_count (`headroom::MARGIN`).
const MARGIN: usize = 8;

/// Makes VMAs on demand: a PROT_NONE mapping in which pages are made readable, each one
/// splitting off VMAs.
struct Filler {
    map: Mapping,
    /// Pages 2, 4, 6...: made readable, two VMAs more each.
    pairs: usize,
    /// Page 0 readable: one VMA more.
    edge: bool,
}

impl Filler {
    fn new(pages: usize) -> Self {
        let map =
            Mapping::new(pages * page(), libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0).unwrap();
        Filler { map, pairs: 0, edge: false }
    }

    fn protect(&self, index: usize, prot: i32) {
        // SAFETY: a page of the filler mapping this test owns.
        let r = unsafe { libc::mprotect(self.map.ptr().add(index * page()).cast(), page(), prot) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    /// Adds or removes VMAs until the process has exactly `target`.
    fn set_vmas(&mut self, target: usize) {
        for _ in 0..8 {
            let now = kit::count_vmas();
            if now == target {
                return;
            }
            let want = self.pairs as isize * 2 + isize::from(self.edge) + target as isize - now as isize;
            assert!(want >= 0, "the process already has more than {target} VMAs");
            let (pairs, edge) = (want as usize / 2, want % 2 == 1);
            assert!(2 * pairs + 2 < self.map.len() / page(), "the filler is too small");
            while self.pairs < pairs {
                self.pairs += 1;
                self.protect(2 * self.pairs, libc::PROT_READ);
            }
            while self.pairs > pairs {
                self.protect(2 * self.pairs, libc::PROT_NONE);
                self.pairs -= 1;
            }
            if self.edge != edge {
                self.protect(0, if edge { libc::PROT_READ } else { libc::PROT_NONE });
                self.edge = edge;
            }
        }
        panic!("could not bring the process to {target} VMAs (now {})", kit::count_vmas());
    }
}

fn vma_cap_pressure_at_several_distances() {
    let max = max_map_count();
    let p = page();
    // Every other page of a memfd: views whose runs never merge.
    let ram = GuestRam::new(1400 * p).unwrap();
    ram.fill(36);
    let list = |runs: usize| -> Vec<libc::iovec> { (0..runs).map(|i| ram.iov(2 * i * p, p)).collect() };
    let mut filler = Filler::new(max + 64);
    // (runs in the view, VMAs left free beyond iovmap's margin). Below 512 runs the cap
    // is found while placing; from 512 on it is checked before anything is reserved.
    let cases: &[(usize, &[usize])] = &[
        (100, &[0, 1, 50, 91, 92, 99, 100, 101, 150]),
        (511, &[0, 505, 510, 511, 512]),
        (512, &[0, 1, 511, 512, 513]),
        (700, &[650, 699, 700, 701]),
    ];
    let (mut views, mut refused) = (0, 0);
    for &(runs, distances) in cases {
        let l = list(runs);
        let mut line = format!("  {runs} runs:");
        for &d in distances {
            // Leave exactly `d` VMAs available under iovmap's reckoning.
            filler.set_vmas(max - MARGIN - d);
            let before = Counts::now();
            let faults = Faults::new();
            let got = iovmap::map(&l);
            let reserved = faults.calls(Operation::Reserve);
            drop(faults);
            let what = format!("{runs} runs, {d} VMAs available");
            match got {
                Ok(view) => {
                    assert!(runs <= d + MARGIN, "{what}: a view with more runs than the kernel allows?");
                    assert_eq!(view.stats().runs, runs);
                    assert_view_matches(&view, &l);
                    drop(view);
                    views += 1;
                    line += &format!(" {d} free: view;");
                }
                Err(Error::TooManyMappings { needed, available }) => {
                    assert!(runs > d, "{what}: refused although there was room");
                    assert_eq!((needed, available), (runs, d), "{what}");
                    if runs >= 512 {
                        assert_eq!(reserved, 0, "{what}: reserved before refusing");
                    }
                    refused += 1;
                    line += &format!(" {d} free: refused;");
                }
                Err(e) => panic!("{what}: {e:?} (neither a view nor TooManyMappings)"),
            }
            before.assert_unchanged(&what);
        }
        println!("{line}");
    }
    println!("  {views} views built and {refused} refused with TooManyMappings near vm.max_map_count = {max}");
    assert!(views > 0 && refused > 0);
}

fn views_outlive_every_kind_of_source() {
    use std::os::unix::fs::FileExt;
    let p = page();
    let before = Counts::now();
    let mut kinds = vec!["memfd (clone)", "shared anonymous (clone)"];
    {
        let ram = GuestRam::new(16 * p).unwrap();
        ram.fill(37);
        let keep = ram.file().try_clone().unwrap(); // to look at the file once unmapped
        let anon = Mapping::anon_shared(8 * p).unwrap();
        // SAFETY: a fresh writable mapping.
        unsafe { kit::fill(anon.ptr(), anon.len(), 38, 0) };
        let mut r = Remapper::new();
        let mut list = vec![ram.iov(3 * p, 2 * p), anon.iov(p, p)];
        let bpf = BpfArray::new(4).ok();
        if let Some(a) = &bpf {
            // SAFETY: the array's writable mapping.
            unsafe { kit::fill(a.map.ptr(), a.map.len(), 39, 0) };
            r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
            list.push(a.map.iov(p, 2 * p));
            kinds.push("BPF array (fd)");
        }
        let ring = PerfRing::new(2).ok();
        if let Some(ring) = &ring {
            r.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
            list.push(ring.map.iov(0, ring.map.len()));
            kinds.push("perf ring (fd)");
        }
        let huge = GuestRam::huge(kit::HUGE_2M).ok();
        let ram_at = if huge.is_some() { kit::HUGE_2M } else { 0 };
        if let Some(h) = &huge {
            h.fill(40);
            r.register(h.ptr(), h.len(), h.fd(), 0).unwrap();
            list.insert(0, h.iov(0, kit::HUGE_2M));
            kinds.push("hugetlb (fd)");
        }
        let view = r.map(&list).unwrap();
        // SAFETY: the sources are live and nothing writes them.
        let want = unsafe { iovmap_peers::gather(&list) };
        assert_view_matches(&view, &list);
        // Every source goes: the remapper's fds, the mappings, the fixtures' own fds.
        drop(r);
        drop((ram, anon, bpf, ring, huge));
        // SAFETY: the view is live for len() bytes.
        let diff = unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) };
        assert_eq!(diff, None, "the view changed when its sources went");
        // It still aliases the memfd: a write through it reaches the file.
        let at = ram_at + 5;
        // SAFETY: in bounds of the live, writable view.
        unsafe { view.as_mut_ptr().unwrap().add(at).write_volatile(0x77) };
        let mut b = [0u8];
        keep.read_exact_at(&mut b, (3 * p + 5) as u64).unwrap();
        assert_eq!(b[0], 0x77, "a write through the view missed the memfd");
        drop(keep);
        drop(view);
    }
    before.assert_unchanged("views outlived their sources, then dropped");
    println!("  outlived: {kinds:?}");
}

/// After a fork, the child's lookups describe the child. iovmap keeps /proc/self/maps
/// open for PROCMAP_QUERY; the child inherits that fd, which still describes the parent.
/// A mapping made only in the child must be found, and one unmapped only in the child
/// must not be (a page wiped on fork tells the child to reopen the fd).
fn a_forked_child_looks_up_its_own_mappings() {
    let ram = GuestRam::new(8 * page()).unwrap();
    ram.fill(4);
    // The parent has used the lookups: the fd is open.
    drop(iovmap::map(&[ram.iov(0, page()), ram.iov(2 * page(), page())]).unwrap());
    // SAFETY: the child runs only this function's code and exits; this binary runs its
    // checks on one thread, so no lock is held by another thread at the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(|| {
            let mine = GuestRam::new(4 * page()).unwrap();
            mine.fill(6);
            let view = iovmap::map(&[mine.iov(0, page()), mine.iov(2 * page(), page())])
                .unwrap_or_else(|e| panic!("the child's own memory: {e}"));
            assert_eq!(view.len(), 2 * page());
            drop(view);
            // Unmapped in the child only: the parent still has it.
            let gone = ram.iov(4 * page(), page());
            // SAFETY: the child's copy of the parent's RAM mapping, which nothing uses here.
            unsafe { libc::munmap(gone.iov_base, page()) };
            let e = iovmap::map(&[ram.iov(0, page()), gone]).unwrap_err();
            assert!(matches!(e, Error::NotMapped { index: 1 }), "a page the child unmapped: {e:?}");
        })
        .map_or(1, |()| 0);
        // SAFETY: leaving the child at once, without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child failed: status {status:#x}");
    // And the parent's lookups still describe the parent.
    drop(iovmap::map(&[ram.iov(4 * page(), page()), ram.iov(6 * page(), page())]).unwrap());
}
