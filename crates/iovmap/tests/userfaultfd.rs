//! Guest RAM a userfaultfd monitor owns, on the real kernel: a monitor thread plays the
//! VMM (places missing pages with UFFDIO_COPY, restores and approves minor faults with
//! UFFDIO_CONTINUE, saves and unprotects write-protected pages), and every kind of view
//! is checked against it. For MISSING and MINOR every byte of the view is the monitor's
//! and the monitor's own placement of every remaining page succeeds (no EEXIST); for WP
//! views that can write are refused and read-only views are built.
//!
//! The record of armed ranges is process-wide; each test arms memory of its own, so they
//! may run side by side.

use std::os::fd::{AsFd, AsRawFd};

use iovmap::userfaultfd::{self, Modes};
use iovmap::{Error, MapOptions, Remapper};
use iovmap_testkit::monitor::{self, Mode, Monitor, Watchdog};
use iovmap_testkit::{self as kit, GuestRam, Mapping, pattern, skip};

const PAGES: usize = 32;
/// The pages a view is made of: runs 3 | 20-21 | 7 | 30 (in the missing half and the
/// received half alike).
const LIST: [usize; 5] = [3, 20, 21, 7, 30];
/// Bytes of the "stale" page cache a MINOR monitor must replace before anyone reads it.
const STALE: u64 = 0x57a1e;

fn page() -> usize {
    kit::page()
}

/// The ways a VMM makes views, each checked against each mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `Remapper::map` of unregistered RAM: read-write, automatic placement.
    Default,
    /// `MapOptions::new().populate()`.
    Populate,
    /// `MapOptions::new().read_only()`.
    ReadOnly,
    /// The RAM registered with the Remapper (its runs can be fd-mapped).
    Registered,
    /// A single iovec: a one-run view, placed with no reservation.
    OneRun,
    /// `MapOptions::new().kernel_built()`: udmabuf.
    KernelBuilt,
    /// `Remapper::dmabufs`: dma-bufs with no CPU mapping.
    DmaBufs,
}

const KINDS: [Kind; 7] =
    [Kind::Default, Kind::Populate, Kind::ReadOnly, Kind::Registered, Kind::OneRun, Kind::KernelBuilt, Kind::DmaBufs];

/// Guest RAM (a sealed memfd, as QEMU's), one mapping of it registered with a monitor.
struct Armed {
    ram: GuestRam,
    /// The registered mapping: the RAM's own for MISSING and WP, a second one for MINOR
    /// (whose page tables must be empty for minor faults to happen).
    second: Option<Mapping>,
    monitor: Monitor,
}

impl Armed {
    /// RAM armed in `mode` through iovmap, or why this kernel cannot: MISSING with the
    /// first half of the pages received, MINOR with all of the page cache stale, WP with
    /// every page written and write-protected.
    fn new(mode: Mode) -> Result<Armed, kit::Unavailable> {
        let uffd = monitor::open(mode, 0)?;
        let ram = GuestRam::sealed(PAGES * page()).expect("sealed memfd RAM");
        let len = ram.len();
        let second = match mode {
            Mode::Missing => {
                // The first half arrived before the switch to postcopy.
                // SAFETY: our own mapping, half of it.
                unsafe { kit::fill(ram.ptr(), len / 2, Monitor::SEED, 0) };
                None
            }
            Mode::Minor => {
                ram.fill(STALE);
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                Some(Mapping::new(len, rw, libc::MAP_SHARED, Some(ram.fd()), 0).expect("second mapping"))
            }
            Mode::Wp => {
                ram.fill(Monitor::SEED);
                None
            }
        };
        let base = second.as_ref().map_or(ram.ptr(), Mapping::ptr);
        let modes = Modes::from_bits(mode.bits()).unwrap();
        userfaultfd::register(uffd.as_fd(), base, len, modes)
            .map_err(|e| kit::Unavailable(format!("UFFDIO_REGISTER {mode:?} of a memfd mapping: {e}")))?;
        if mode == Mode::Wp {
            monitor::writeprotect(uffd.as_fd(), base as usize, len, true).expect("UFFDIO_WRITEPROTECT");
        }
        let monitor = Monitor::start(uffd, mode, base as usize, len, page(), ram.fd());
        if mode == Mode::Missing {
            monitor.received(0, len / 2);
        }
        Ok(Armed { ram, second, monitor })
    }

    fn base(&self) -> *mut u8 {
        self.second.as_ref().map_or(self.ram.ptr(), Mapping::ptr)
    }

    fn iov(&self, page_index: usize, pages: usize) -> libc::iovec {
        kit::iov(self.base().wrapping_add(page_index * page()), pages * page())
    }

    /// The list of a kind: [`LIST`], or one iovec for a one-run view.
    fn list(&self, kind: Kind) -> (Vec<libc::iovec>, Vec<usize>) {
        if kind == Kind::OneRun {
            return (vec![self.iov(14, 4)], (14..18).collect());
        }
        (LIST.iter().map(|&p| self.iov(p, 1)).collect(), LIST.to_vec())
    }

    fn remapper(&self, kind: Kind) -> Remapper {
        let mut r = Remapper::new();
        if matches!(kind, Kind::Registered | Kind::KernelBuilt | Kind::DmaBufs) {
            r.register(self.base(), self.ram.len(), self.ram.fd(), 0).expect("register the RAM");
        }
        r
    }

    fn unregister(&self) {
        userfaultfd::unregister(self.monitor.fd(), self.base(), self.ram.len()).expect("UFFDIO_UNREGISTER");
    }
}

fn options(kind: Kind) -> MapOptions {
    match kind {
        Kind::Populate => MapOptions::new().populate(),
        Kind::ReadOnly => MapOptions::new().read_only(),
        Kind::KernelBuilt => MapOptions::new().kernel_built(),
        _ => MapOptions::new(),
    }
}

/// Whether this kind needs udmabuf, and udmabuf is missing (then it is checked in the
/// guest rows that have it).
fn lacks_udmabuf(kind: Kind) -> Option<kit::Unavailable> {
    matches!(kind, Kind::KernelBuilt | Kind::DmaBufs).then(kit::udmabuf).and_then(Result::err)
}

/// Checks that `bytes` (a view or a dma-buf mapping of `pages`, in order) holds the
/// monitor's bytes of those pages.
fn assert_monitors_bytes(what: &str, bytes: *const u8, pages: &[usize]) {
    for (k, &p) in pages.iter().enumerate() {
        for off in (0..page()).step_by(61).chain([page() - 1]) {
            // SAFETY: `k * page + off` lies in the view (pages.len() pages long).
            let got = unsafe { bytes.add(k * page() + off).read_volatile() };
            let want = pattern(Monitor::SEED, p * page() + off);
            assert_eq!(got, want, "{what}: page {p} byte {off}: not the monitor's (stale or zero-filled)");
        }
    }
}

/// Maps the dma-bufs of `list` read-only, one after the other, and returns the mapping.
fn read_dmabufs(r: &Remapper, list: &[libc::iovec], len: usize) -> Result<Mapping, Error> {
    let bufs = r.dmabufs(list)?;
    let whole = Mapping::new(len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0).unwrap();
    for b in bufs.buffers() {
        // SAFETY: MAP_FIXED into the range reserved just above, which this test owns.
        let p = unsafe {
            libc::mmap(
                whole.ptr().add(b.offset()).cast(),
                b.len(),
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                b.fd().as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of a dma-buf: {}", std::io::Error::last_os_error());
    }
    Ok(whole)
}

/// MISSING or MINOR: every kind of view shows only the monitor's bytes, the monitor saw
/// faults for the pages it had not resolved, and then resolves every other page without
/// an EEXIST.
fn monitor_resolves_every_page_first(mode: Mode) {
    let _watchdog = Watchdog::new(120, &format!("{mode:?} views"));
    for kind in KINDS {
        if let Some(why) = lacks_udmabuf(kind) {
            eprintln!("SKIP {mode:?} {kind:?}: {why}");
            continue;
        }
        let armed = match Armed::new(mode) {
            Ok(a) => a,
            Err(why) => skip!("{mode:?}: {why}"),
        };
        let (list, pages) = armed.list(kind);
        let r = armed.remapper(kind);
        let what = format!("{mode:?} {kind:?}");
        let resolved = if kind == Kind::DmaBufs {
            let m = read_dmabufs(&r, &list, pages.len() * page()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_monitors_bytes(&what, m.ptr(), &pages);
            None
        } else {
            let view = r.map_with(&list, options(kind)).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_monitors_bytes(&what, view.as_ptr(), &pages);
            Some(view.stats().monitor_resolved)
        };
        let log = armed.monitor.log();
        assert!(log.errors.is_empty(), "{what}: the monitor failed: {:?}", log.errors);
        // The pages the monitor had not resolved were asked of it, each once: MISSING
        // pages of the second half, every MINOR page.
        let unresolved: Vec<usize> =
            pages.iter().copied().filter(|&p| mode == Mode::Minor || p >= PAGES / 2).map(|p| p * page()).collect();
        let mut faulted = log.faults.clone();
        faulted.sort_unstable();
        let mut want = unresolved.clone();
        want.sort_unstable();
        want.dedup();
        assert_eq!(faulted, want, "{what}: the monitor saw other faults than the list's unresolved pages");
        if let Some(bytes) = resolved {
            assert_eq!(bytes, list.iter().map(|i| i.iov_len).sum::<usize>(), "{what}: MapStats::monitor_resolved");
        }
        let refused = armed.monitor.place_the_rest();
        assert!(refused.is_empty(), "{what}: the monitor found pages already there (EEXIST) at {refused:x?}");
        armed.unregister();
        println!("{what}: {} pages faulted in through the monitor first, the rest placed after", want.len());
    }
}

#[test]
fn missing_pages_are_placed_by_the_monitor_before_any_view_shows_them() {
    monitor_resolves_every_page_first(Mode::Missing);
}

#[test]
fn minor_faults_are_approved_by_the_monitor_before_any_view_shows_them() {
    monitor_resolves_every_page_first(Mode::Minor);
}

#[test]
fn write_protected_memory_gets_read_only_views_only() {
    let _watchdog = Watchdog::new(120, "WP views");
    let armed = match Armed::new(Mode::Wp) {
        Ok(a) => a,
        Err(why) => skip!("WP: {why}"),
    };
    // Segment 0 in memory no monitor owns, segment 1 and on in the protected RAM.
    let other = GuestRam::new(4 * page()).unwrap();
    for kind in KINDS {
        let (mut list, pages) = armed.list(kind);
        if kind != Kind::OneRun {
            list.insert(0, other.iov(0, page()));
        }
        let first = if kind == Kind::OneRun { 0 } else { 1 };
        let r = armed.remapper(kind);
        let what = format!("WP {kind:?}");
        let refused = match kind {
            Kind::DmaBufs => r.dmabufs(&list).map(drop),
            Kind::ReadOnly => Ok(()),
            _ => r.map_with(&list, options(kind)).map(drop),
        };
        if kind != Kind::ReadOnly {
            let e = refused.expect_err(&what);
            assert!(matches!(e, Error::WriteProtected { index } if index == first), "{what}: {e:?}");
            assert!(e.to_string().contains("Access::ReadOnly"), "{what}: the message says what to do: {e}");
        }
        // Read-only, the same list is a view (kernel-built where udmabuf is).
        let ro = match kind {
            Kind::KernelBuilt | Kind::DmaBufs => match lacks_udmabuf(kind) {
                Some(why) => {
                    eprintln!("SKIP {what} read-only: {why}");
                    continue;
                }
                None => MapOptions::new().kernel_built().read_only(),
            },
            Kind::Populate => MapOptions::new().read_only().populate(),
            _ => MapOptions::new().read_only(),
        };
        // udmabuf takes only registered sealed memfds: the armed RAM alone there.
        let (list, first) =
            if ro.placement() == iovmap::Placement::KernelBuilt { (&list[first..], 0) } else { (&list[..], first) };
        let view = r.map_with(list, ro).unwrap_or_else(|e| panic!("{what} read-only: {e}"));
        // SAFETY: the view is `list`'s length; the armed pages start after `first` pages.
        assert_monitors_bytes(&what, unsafe { view.as_ptr().add(first * page()) }, &pages);
        assert_eq!(kit::write_signal(view.as_ptr()), Some(libc::SIGSEGV), "{what}: the read-only view took a write");
    }
    // The monitor still sees every write through the source, and saves the old bytes.
    armed.ram.write(5 * page() + 9, 0x42);
    let log = armed.monitor.log();
    assert_eq!(log.saved.len(), 1, "{log:?}");
    assert_eq!((log.saved[0].0, log.saved[0].1[9]), (5 * page(), pattern(Monitor::SEED, 5 * page() + 9)));
    // The snapshot ends: read-write views again.
    armed.unregister();
    let view = Remapper::new().map(&[armed.iov(5, 1)]).expect("a read-write view after the snapshot");
    assert_eq!(unsafe { view.as_ptr().add(9).read_volatile() }, 0x42);
}

#[test]
fn huge_page_ram_waits_for_the_monitor_too() {
    let _watchdog = Watchdog::new(120, "hugetlb MISSING");
    let uffd = match monitor::open(Mode::Missing, monitor::FEATURE_MISSING_HUGETLBFS) {
        Ok(u) => u,
        Err(why) => skip!("{why}"),
    };
    let ram = match GuestRam::huge(4 * kit::HUGE_2M) {
        Ok(r) => r,
        Err(why) => skip!("{why}"),
    };
    let h = kit::HUGE_2M;
    // Huge page 0 arrived; 1 to 3 are still on the source.
    // SAFETY: our own mapping, its first huge page.
    unsafe { kit::fill(ram.ptr(), h, Monitor::SEED, 0) };
    let (base, len) = (ram.ptr(), ram.len());
    // The raw ioctl and a declaration, as a VMM that registers by itself (QEMU) does.
    userfaultfd::declare_armed(base, len, Modes::MISSING);
    monitor::register_raw(uffd.as_fd(), base as usize, len, Mode::Missing).expect("UFFDIO_REGISTER hugetlb");
    let monitor = Monitor::start(uffd, Mode::Missing, base as usize, len, h, ram.fd());
    monitor.received(0, h);
    let mut r = Remapper::new();
    r.register(base, len, ram.fd(), 0).unwrap();
    let list = [ram.iov(2 * h, h), ram.iov(0, h)];
    let view = r.map(&list).expect("a view of huge pages 2 and 0");
    for (k, huge) in [2usize, 0].into_iter().enumerate() {
        for off in (0..h).step_by(4093) {
            let got = unsafe { view.as_ptr().add(k * h + off).read_volatile() };
            assert_eq!(got, pattern(Monitor::SEED, huge * h + off), "huge page {huge} byte {off}");
        }
    }
    assert_eq!(monitor.log().faults, [2 * h]);
    assert!(monitor.place_the_rest().is_empty(), "EEXIST after the view");
    userfaultfd::declare_disarmed(base, len);
}

/// What the record is for: a registration iovmap was not told of loses pages. A view of
/// a missing page zero-fills it in the memfd without asking the monitor, whose later
/// UFFDIO_COPY fails with EEXIST: measured here so that a kernel that ever carries
/// registrations into clones shows up.
#[test]
fn an_undeclared_registration_loses_pages() {
    let _watchdog = Watchdog::new(60, "undeclared MISSING");
    let uffd = match monitor::open(Mode::Missing, 0) {
        Ok(u) => u,
        Err(why) => skip!("{why}"),
    };
    let ram = GuestRam::new(PAGES * page()).unwrap();
    monitor::register_raw(uffd.as_fd(), ram.ptr() as usize, ram.len(), Mode::Missing).expect("UFFDIO_REGISTER");
    let monitor = Monitor::start(uffd, Mode::Missing, ram.ptr() as usize, ram.len(), page(), ram.fd());
    let view = iovmap::map(&[ram.iov(9 * page(), page())]).unwrap();
    assert_eq!(view.stats().monitor_resolved, 0);
    // SAFETY: in the view.
    assert_eq!(unsafe { view.as_ptr().add(5).read_volatile() }, 0, "the view's read was served by the monitor");
    assert!(monitor.log().faults.is_empty());
    assert_eq!(monitor.place_the_rest(), [9 * page()], "only the page the view zero-filled is refused");
}
