//! Races between `map` and another thread that changes the source mapping under it.
//!
//! The source is an 8-page slot `X` of a test-owned range (PROT_NONE guard pages on both
//! sides), normally file F1 from page 4. A racer thread changes it in a loop, the way a
//! VMM thread could (memory hot-unplug, a remap of guest RAM), while the mapper builds
//! views of a list whose last segment is all of `X` (after `PREFIX` scattered pages of
//! stable RAM, which widen the window between planning and cloning). Each view is read
//! through /proc/self/mem (so that a page that would SIGBUS reads as an error instead of
//! killing the test) and each page of its `X` part is judged against what the scenario
//! says may be there.
//!
//! The guarantee checked (docs/reliability.md): a view returned without an error shows,
//! at each page, the memory that was mapped at that page's source address at some moment
//! during the call, or the registered file at the registered offset.

#![allow(dead_code)] // each test binary uses part of it

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iovmap::{Error, Remapper};
use iovmap_testkit::{self as kit, GuestRam, Mapping};

pub fn page() -> usize {
    kit::page()
}

/// Pages of `X`.
pub const N: usize = 8;
/// File page of F1 (and F2) that `X` starts at.
pub const OFF: usize = 4;
/// Scattered pages of stable RAM before `X` in every list.
pub const PREFIX: usize = 48;

const SEED_F1: u64 = 71;
const SEED_F2: u64 = 72;

/// What the racer does, over and over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// munmap X, then map F1 there again.
    Unmap,
    /// munmap the second half of X, then map it again.
    UnmapTail,
    /// Map F2 over all of X (same offsets), then F1 again.
    ReplaceWhole,
    /// Map F2 over the second half of X, then F1 again.
    ReplaceTail,
    /// Map private anonymous memory over all of X, then F1 again.
    ReplacePrivate,
    /// mprotect pages 2..5 of X read-only and back: VMAs split and merge.
    Protect,
    /// Map F2 over the first half of X, then F1 again.
    ReplaceHead,
    /// Map 4 pages of fresh shared anonymous memory over the first half of X, then F1.
    ReplaceHeadAnon,
}

impl Change {
    /// Every change whose outcome the guarantee covers today.
    pub const GUARANTEED: [Change; 8] = [
        Change::Unmap,
        Change::UnmapTail,
        Change::ReplaceWhole,
        Change::ReplaceTail,
        Change::ReplacePrivate,
        Change::Protect,
        Change::ReplaceHead,
        Change::ReplaceHeadAnon,
    ];
}

/// The outcome of a race run.
#[derive(Debug, Default)]
pub struct Tally {
    pub views: usize,
    /// Views whose bytes or stats show the source changed under the call.
    pub disturbed: usize,
    pub errors: std::collections::BTreeMap<String, usize>,
    /// Pages shown that the guarantee does not allow, with a description of the first.
    pub violations: usize,
    /// Views with such pages.
    pub bad_views: usize,
    pub first_violation: Option<String>,
    pub changes: usize,
}

impl Tally {
    pub fn interfered(&self) -> usize {
        self.disturbed + self.errors.values().sum::<usize>()
    }
}

pub struct World {
    f1: std::fs::File,
    f2: std::fs::File,
    slot: Mapping,
    ram: GuestRam,
    mem: std::fs::File,
}

fn map_at(at: usize, len: usize, flags: i32, fd: i32, offset: usize) {
    // SAFETY: `at` lies in the slot this module reserved, all of it mapped by this module
    // (an unmapped part is refilled by `refill` before anything maps over it again).
    let p = unsafe {
        libc::mmap(at as *mut libc::c_void, len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset as libc::off_t)
    };
    assert_eq!(p as usize, at, "mapping into the race slot failed: {}", std::io::Error::last_os_error());
}

/// Maps `fd` back into the hole at `at` that the racer just unmapped. Until it does, any
/// thread's kernel-placed mapping may land in that hole (a view's reservation, a clone
/// probe, a test's buffer): those are short-lived, so this waits them out (up to 10 s)
/// instead of replacing them.
fn refill(at: usize, len: usize, fd: i32, offset: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: MAP_FIXED_NOREPLACE maps only into the hole at `at` and fails rather
        // than touch anything that now lies there.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                fd,
                offset as libc::off_t,
            )
        };
        if p as usize == at {
            return;
        }
        if p != libc::MAP_FAILED {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and place it elsewhere.
            // SAFETY: the mapping just made, at an address nothing else knows.
            unsafe { libc::munmap(p, len) };
            panic!("MAP_FIXED_NOREPLACE unsupported: mapped at {p:?} instead of {at:#x}");
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "refilling the race slot: {err}");
        assert!(Instant::now() < deadline, "the race slot's hole stayed taken for 10 s");
        std::thread::yield_now();
    }
}

impl World {
    pub fn new() -> World {
        let p = page();
        let file = |seed| {
            let f = kit::memfd("race", 0).unwrap();
            let bytes: Vec<u8> = (0..32 * p).map(|i| kit::pattern(seed, i)).collect();
            f.write_all_at(&bytes, 0).unwrap();
            f
        };
        let (f1, f2) = (file(SEED_F1), file(SEED_F2));
        let slot =
            Mapping::new((N + 2) * p, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0).unwrap();
        let ram = GuestRam::new(2 * PREFIX * p).unwrap();
        ram.fill(73);
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let w = World { f1, f2, slot, ram, mem };
        w.restore_all();
        w
    }

    /// Start of X.
    pub fn x(&self) -> usize {
        self.slot.ptr() as usize + page()
    }

    fn restore_all(&self) {
        map_at(self.x(), N * page(), libc::MAP_SHARED | libc::MAP_FIXED, self.f1.as_raw_fd(), OFF * page());
    }

    /// One change and its undoing.
    fn change(&self, c: Change) {
        let p = page();
        let (x, half) = (self.x(), N / 2 * p);
        let shared_fixed = libc::MAP_SHARED | libc::MAP_FIXED;
        let (f1, f2) = (self.f1.as_raw_fd(), self.f2.as_raw_fd());
        match c {
            Change::Unmap => {
                // SAFETY: X is this module's mapping.
                unsafe { libc::munmap(x as *mut libc::c_void, N * p) };
                refill(x, N * p, f1, OFF * p);
            }
            Change::UnmapTail => {
                // SAFETY: the second half of X, this module's mapping.
                unsafe { libc::munmap((x + half) as *mut libc::c_void, half) };
                refill(x + half, half, f1, OFF * p + half);
            }
            Change::ReplaceWhole => {
                map_at(x, N * p, shared_fixed, f2, OFF * p);
                map_at(x, N * p, shared_fixed, f1, OFF * p);
            }
            Change::ReplaceTail => {
                map_at(x + half, half, shared_fixed, f2, OFF * p + half);
                map_at(x + half, half, shared_fixed, f1, OFF * p + half);
            }
            Change::ReplacePrivate => {
                map_at(x, N * p, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0);
                map_at(x, N * p, shared_fixed, f1, OFF * p);
            }
            Change::Protect => {
                // SAFETY: pages of X, this module's mapping.
                unsafe {
                    libc::mprotect((x + 2 * p) as *mut libc::c_void, 3 * p, libc::PROT_READ);
                    libc::mprotect((x + 2 * p) as *mut libc::c_void, 3 * p, libc::PROT_READ | libc::PROT_WRITE);
                }
            }
            Change::ReplaceHead => {
                map_at(x, half, shared_fixed, f2, OFF * p);
                map_at(x, half, shared_fixed, f1, OFF * p);
            }
            Change::ReplaceHeadAnon => {
                map_at(x, half, libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0);
                map_at(x, half, shared_fixed, f1, OFF * p);
            }
        }
    }

    /// The list: PREFIX scattered pages of stable RAM, then X.
    pub fn list(&self) -> Vec<libc::iovec> {
        let p = page();
        let mut l: Vec<libc::iovec> = (0..PREFIX).map(|i| self.ram.iov(2 * i * p, p)).collect();
        l.push(kit::iov(self.x() as *const u8, N * p));
        l
    }

    /// A remapper with X registered as F1 from page OFF (retried while the racer has X
    /// in a state registration refuses).
    fn registered(&self) -> Remapper {
        loop {
            let mut r = Remapper::new();
            if r.register(self.x() as *const u8, N * page(), self.f1.as_fd(), (OFF * page()) as u64).is_ok() {
                return r;
            }
        }
    }

    /// Reads `len` bytes at `addr` through /proc/self/mem: `None` where a page cannot be
    /// read (unmapped, or past the end of its file: a SIGBUS for a plain load).
    fn read(&self, addr: usize, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem.read_exact_at(&mut buf, addr as u64).ok()?;
        Some(buf)
    }

    fn file_page(&self, f: &std::fs::File, index: usize) -> Vec<u8> {
        let mut buf = vec![0u8; page()];
        f.read_exact_at(&mut buf, (index * page()) as u64).unwrap();
        buf
    }

    /// Races `map` against `change` for `secs` seconds (or until `enough` views saw the
    /// source change), with X registered or not.
    pub fn race(&self, change: Change, registered: bool, secs: f64, enough: usize) -> Tally {
        let p = page();
        let list = self.list();
        let stop = AtomicBool::new(false);
        let changes = AtomicUsize::new(0);
        let f1: Vec<Vec<u8>> = (0..N).map(|j| self.file_page(&self.f1, OFF + j)).collect();
        let f2: Vec<Vec<u8>> = (0..N).map(|j| self.file_page(&self.f2, OFF + j)).collect();
        // Which pages may show F2: those the racer maps F2 over.
        let f2_allowed = |j: usize| match change {
            Change::ReplaceWhole => true,
            Change::ReplaceTail => j >= N / 2,
            Change::ReplaceHead => j < N / 2,
            _ => false,
        };
        // A fresh shared anonymous head reads as zeroes where it is mapped.
        let zero_allowed = |j: usize| change == Change::ReplaceHeadAnon && j < N / 2;
        let mut t = Tally::default();
        let undisturbed = (PREFIX + 1, PREFIX + 1, 0); // runs, cloned, fd_mapped
        std::thread::scope(|s| {
            let racer = s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    self.change(change);
                    changes.fetch_add(1, Ordering::Relaxed);
                }
            });
            // Until the race has been seen, up to 5 times longer.
            let start = Instant::now();
            let (short, long) = (Duration::from_secs_f64(secs), Duration::from_secs_f64(5.0 * secs));
            // A registered region remembers a refused clone and goes to its fd from then
            // on: a fresh registration once that happened keeps the clone path raced.
            let mut remapper: Option<Remapper> = None;
            while t.interfered() < enough
                && (start.elapsed() < short || (t.interfered() == 0 && start.elapsed() < long))
            {
                let r = remapper.get_or_insert_with(|| if registered { self.registered() } else { Remapper::new() });
                let got = r.map(&list);
                if got.as_ref().map_or(true, |v| v.stats().fd_mapped > 0) {
                    remapper = None;
                }
                match got {
                    Err(e) => {
                        let kind = format!("{e:?}").split([' ', '(', '{']).next().unwrap().to_string();
                        let kind = match &e {
                            Error::NoFallback { source, .. } => format!("{kind}({source})"),
                            _ => kind,
                        };
                        *t.errors.entry(kind).or_default() += 1;
                    }
                    Ok(view) => {
                        t.views += 1;
                        let s = view.stats();
                        let mut disturbed = (s.runs, s.cloned, s.fd_mapped) != undisturbed;
                        let bad_before = t.violations;
                        let base = view.as_ptr() as usize + PREFIX * p;
                        for j in 0..N {
                            match self.read(base + j * p, p) {
                                Some(b) if b == f1[j] => {}
                                Some(b) if b == f2[j] && f2_allowed(j) => disturbed = true,
                                Some(b) if zero_allowed(j) && b.iter().all(|&x| x == 0) => disturbed = true,
                                other => {
                                    disturbed = true;
                                    t.violations += 1;
                                    if t.first_violation.is_none() {
                                        let what = match &other {
                                            None => "unreadable (would SIGBUS)".to_string(),
                                            Some(b) if b == &f2[j] => "F2's page, never mapped there".to_string(),
                                            Some(b) if (0..32).any(|k| *b == self.file_page(&self.f2, k)) => {
                                                let k = (0..32).find(|&k| *b == self.file_page(&self.f2, k)).unwrap();
                                                format!("F2's page {k}, never mapped there")
                                            }
                                            Some(b) if b.iter().all(|&x| x == 0) => "zeroes".to_string(),
                                            Some(_) => "foreign bytes".to_string(),
                                        };
                                        t.first_violation =
                                            Some(format!("page {j} of X in the view: {what} (stats {s:?})"));
                                    }
                                }
                            }
                        }
                        // The stable part is right too.
                        let prefix = self.read(view.as_ptr() as usize, PREFIX * p).expect("the prefix reads");
                        for i in 0..PREFIX {
                            assert_eq!(prefix[i * p], kit::pattern(73, 2 * i * p), "prefix page {i}");
                        }
                        t.disturbed += usize::from(disturbed);
                        t.bad_views += usize::from(t.violations > bad_before);
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            // Joined, not just finished: its stack goes back to glibc's cache before the
            // next race starts a thread, so the process's VMA count stays put.
            racer.join().unwrap();
        });
        t.changes = changes.load(Ordering::Relaxed);
        self.restore_all();
        t
    }
}
