//! The hole-safety stress test: does building views ever damage a mapping iovmap does
//! not own?
//!
//! On Linux before 6.17 a refused `mremap(src, 0, len, MREMAP_FIXED | MREMAP_MAYMOVE,
//! dst)` unmaps `dst` before it fails. Between that and iovmap's next step (the fd
//! fallback with MAP_FIXED, or the rollback that unmaps the reservation), another thread's
//! `mmap(NULL)` may land in the hole, and iovmap would then overwrite or unmap it.
//!
//! [`run`] makes that as likely as a busy VMM would: loop threads map, fill, check and
//! unmap small private mappings (1-4 pages) as fast as they can, keeping a few alive,
//! while builder threads build, check and drop views. Everything that is not iovmap's is
//! watched:
//!
//! - **sentinels**: mappings made before the run, each filled with its own pattern and
//!   checked at the end;
//! - **the loop threads' mappings**: filled when made, checked when unmapped, now and then
//!   while alive, and at the end; filled and checked with `process_vm_writev`/`readv` on
//!   this process, so a mapping that was unmapped (or replaced by a device mapping)
//!   under its owner is reported instead of faulting;
//! - **intrusions**: a builder looks, while its view is alive, whether any live loop-thread
//!   mapping lies inside the view's range (two live mappings cannot overlap: one of them
//!   was clobbered).
//!
//! The builder checks its view's bytes itself (see [`Outcome`]). A SIGSEGV or SIGBUS
//! during the run (a view's page unmapped by a thread that thought it was its own) prints
//! a `VMTEST: FAIL` line and exits, when [`Config::catch_faults`] is set.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::layout::Rng;
use crate::mem::{self, page};
use crate::pattern;

/// How to stress.
#[derive(Clone, Debug)]
pub struct Config {
    /// Loop threads doing mmap/fill/check/munmap.
    pub threads: usize,
    /// Threads building views (each calls the build function in a loop).
    pub builders: usize,
    /// How long the builders run.
    pub duration: Duration,
    /// Sentinel mappings made before the run.
    pub sentinels: usize,
    /// Mappings each loop thread keeps alive.
    pub live_per_thread: usize,
    /// Seed of the builders' and threads' generators.
    pub seed: u64,
    /// Install SIGSEGV/SIGBUS handlers that print a verdict line and exit (the guest).
    pub catch_faults: bool,
    /// Self-test of the detection: every this many mappings, a loop thread damages one of
    /// its own live mappings (replaces it, or unmaps it) after filling it, as iovmap would
    /// if it clobbered it; the run must then report it. `None` in real runs.
    pub plant_every: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threads: 4,
            builders: 2,
            duration: Duration::from_secs(3),
            sentinels: 300,
            live_per_thread: 8,
            seed: 0x5eed,
            catch_faults: false,
            plant_every: None,
        }
    }
}

/// What one call of the build function gave.
#[derive(Debug)]
pub enum Outcome {
    /// A view was built, its bytes and stats were right, and it was dropped.
    Built,
    /// The map call failed in a way the scenario expects (e.g. `NoFallback` for an
    /// unregistered BAR); the string names the error kind.
    Expected(String),
    /// Anything else: wrong bytes, wrong stats, an error the scenario does not allow, a
    /// foreign mapping inside the view.
    Failed(String),
}

/// One loop-thread mapping, published for the builders' intrusion check.
#[derive(Default)]
struct Slot {
    addr: AtomicUsize,
    len: AtomicUsize,
}

/// Lets a builder ask which live loop-thread mappings lie inside its view.
pub struct Scanner<'a> {
    slots: &'a [Slot],
}

impl Scanner<'_> {
    /// The live loop-thread mappings `(addr, len)` that intersect `range`.
    pub fn foreign_inside(&self, range: std::ops::Range<usize>) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        for s in self.slots {
            let a = s.addr.load(Ordering::Acquire);
            let len = s.len.load(Ordering::Acquire);
            // The slot may be republished meanwhile: trust it only if the address held.
            if a == 0 || s.addr.load(Ordering::Acquire) != a {
                continue;
            }
            if a < range.end && range.start < a + len {
                found.push((a, len));
            }
        }
        found
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Views built, checked and dropped.
    pub built: usize,
    /// Expected errors, by kind.
    pub expected: BTreeMap<String, usize>,
    /// Unexpected outcomes (first few), and how many there were.
    pub failures: Vec<String>,
    /// Number of unexpected outcomes.
    pub failure_count: usize,
    /// Mappings the loop threads made.
    pub thread_maps: u64,
    /// Loop-thread mappings found damaged (first few).
    pub clobbered: Vec<String>,
    /// Number of damaged loop-thread mappings.
    pub clobbered_count: usize,
    /// Sentinels found damaged.
    pub sentinels_bad: Vec<String>,
    /// Sentinels checked.
    pub sentinels: usize,
    /// How long the builders ran.
    pub elapsed: Duration,
}

impl Report {
    /// Nothing foreign was damaged and every view was right.
    pub fn ok(&self) -> bool {
        self.failure_count == 0 && self.clobbered_count == 0 && self.sentinels_bad.is_empty()
    }

    /// One line: counts of everything.
    pub fn summary(&self) -> String {
        let expected: Vec<_> = self.expected.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        format!(
            "{} views built and checked in {:.1} s ({:.0}/s), expected errors: [{}], unexpected: {}, loop-thread \
             mappings: {} made, {} damaged; sentinels: {} checked, {} damaged",
            self.built,
            self.elapsed.as_secs_f64(),
            (self.built + self.expected.values().sum::<usize>()) as f64 / self.elapsed.as_secs_f64().max(1e-9),
            expected.join(", "),
            self.failure_count,
            self.thread_maps,
            self.clobbered_count,
            self.sentinels,
            self.sentinels_bad.len(),
        )
    }
}

const KEEP: usize = 8;

fn keep(list: &mut Vec<String>, count: &mut usize, what: String) {
    *count += 1;
    if list.len() < KEEP {
        list.push(what);
    }
}

/// Checks that `len` bytes at `addr` still hold pattern `seed`, without touching them.
///
/// # Errors
/// `unmapped ...` when the range (or part of it) cannot be read (unmapped, or replaced by
/// a device mapping); `overwritten ...` when a byte differs.
pub fn check_mapping(addr: usize, len: usize, seed: u64) -> Result<(), String> {
    let mut buf = vec![0u8; len];
    if let Err(e) = mem::read_own(addr, &mut buf) {
        return Err(format!("unmapped or replaced by a device mapping ({e})"));
    }
    // SAFETY: `buf` is readable for `len` bytes.
    match unsafe { pattern::find_mismatch(buf.as_ptr(), len, seed, 0) } {
        None => Ok(()),
        Some((i, got, want)) => Err(format!("overwritten: byte {i:#x} is {got:#04x}, want {want:#04x}")),
    }
}

fn map_anon(len: usize) -> Result<usize, std::io::Error> {
    // SAFETY: NULL hint without MAP_FIXED: the kernel picks free space, replacing nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED { Err(std::io::Error::last_os_error()) } else { Ok(p as usize) }
}

struct Live {
    addr: usize,
    len: usize,
    seed: u64,
    slot: usize,
}

#[derive(Default)]
struct ThreadResult {
    maps: u64,
    clobbered: Vec<String>,
    clobbered_count: usize,
}

/// One loop thread: map, fill, keep a few, check, unmap. A damaged mapping is reported
/// and left alone (it may be part of a view now, or someone else's).
fn loop_thread(t: usize, cfg: &Config, stop: &AtomicBool, slots: &[Slot]) -> ThreadResult {
    let p = page();
    let mut rng = Rng::new(cfg.seed ^ ((t as u64 + 1) << 32));
    let mut live: VecDeque<Live> = VecDeque::new();
    let mut out = ThreadResult::default();
    let mut free: Vec<usize> = (0..slots.len()).collect();
    let report = |out: &mut ThreadResult, m: &Live, what: String| {
        let msg = format!("thread {t}: its mapping {:#x}+{:#x} {what}", m.addr, m.len);
        keep(&mut out.clobbered, &mut out.clobbered_count, msg);
    };
    while !stop.load(Ordering::Relaxed) {
        let len = (1 + rng.below(4)) * p;
        let addr = match map_anon(len) {
            Ok(a) => a,
            Err(e) => {
                keep(&mut out.clobbered, &mut out.clobbered_count, format!("thread {t}: mmap failed: {e}"));
                break;
            }
        };
        out.maps += 1;
        let slot = free.pop().expect("a slot per live mapping, plus one");
        slots[slot].len.store(len, Ordering::Release);
        slots[slot].addr.store(addr, Ordering::Release);
        let m = Live { addr, len, seed: ((t as u64 + 1) << 40) | out.maps, slot };
        // SAFETY: the mapping was just made by this thread; if something replaced or
        // unmapped it meanwhile, the write fails instead of landing elsewhere.
        if let Err(e) = unsafe { mem::write_own(addr, &pattern::bytes(m.seed, 0, len)) } {
            report(&mut out, &m, format!("was unmapped or replaced before it could be filled ({e})"));
            slots[slot].addr.store(0, Ordering::Release);
            free.push(slot);
            continue;
        }
        if cfg.plant_every.is_some_and(|n| out.maps % n == 0) {
            plant(&m, out.maps);
        }
        live.push_back(m);
        if live.len() > cfg.live_per_thread {
            let old = live.pop_front().expect("not empty");
            let verdict = check_mapping(old.addr, old.len, old.seed);
            slots[old.slot].addr.store(0, Ordering::Release);
            free.push(old.slot);
            match verdict {
                // SAFETY: our own mapping, intact, unpublished above: nobody else uses it.
                Ok(()) => unsafe {
                    libc::munmap(old.addr as *mut _, old.len);
                },
                Err(what) => report(&mut out, &old, what),
            }
        }
        if out.maps % 8 == 0 && !live.is_empty() {
            let i = rng.below(live.len());
            if let Err(what) = check_mapping(live[i].addr, live[i].len, live[i].seed) {
                let m = live.remove(i).expect("index in range");
                slots[m.slot].addr.store(0, Ordering::Release);
                free.push(m.slot);
                report(&mut out, &m, what);
            }
        }
    }
    for m in live {
        slots[m.slot].addr.store(0, Ordering::Release);
        match check_mapping(m.addr, m.len, m.seed) {
            // SAFETY: our own mapping, intact and unpublished.
            Ok(()) => unsafe {
                libc::munmap(m.addr as *mut _, m.len);
            },
            Err(what) => report(&mut out, &m, what),
        }
    }
    out
}

/// The self-test's damage to a thread's own mapping: replace it with fresh zero pages,
/// or unmap it, as a clobbering map call would.
fn plant(m: &Live, n: u64) {
    if n % 2 == 0 {
        // SAFETY: the range is this thread's own mapping, which nothing else uses.
        unsafe {
            libc::mmap(
                m.addr as *mut _,
                m.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
    } else {
        // SAFETY: as above. It stays in the live list: its check must report it.
        unsafe { libc::munmap(m.addr as *mut _, m.len) };
    }
}

/// Runs the stress: sentinels, loop threads, and `cfg.builders` threads calling `build`
/// until `cfg.duration` has passed; then checks everything.
pub fn run<F>(cfg: &Config, build: F) -> Report
where
    F: Fn(&mut Rng, &Scanner<'_>) -> Outcome + Sync,
{
    let p = page();
    let guard = cfg.catch_faults.then(FaultGuard::install);
    // Sentinels first, so they are older than every reservation.
    let mut sentinels = Vec::new();
    let mut report = Report::default();
    for i in 0..cfg.sentinels {
        let len = (1 + i % 3) * p;
        match map_anon(len) {
            Ok(addr) => {
                let seed = 0x5e47_0000_0000 | i as u64;
                // SAFETY: the mapping just made, writable, not referenced anywhere.
                unsafe { pattern::fill(addr as *mut u8, len, seed, 0) };
                sentinels.push((addr, len, seed));
            }
            Err(e) => report.sentinels_bad.push(format!("cannot make sentinel {i}: {e}")),
        }
    }
    let slots: Vec<Slot> = (0..cfg.threads * (cfg.live_per_thread + 2)).map(|_| Slot::default()).collect();
    let stop_threads = AtomicBool::new(false);
    let results = Mutex::new((Vec::new(), report));
    let start = Instant::now();
    let scanner = Scanner { slots: &slots };
    std::thread::scope(|s| {
        let per = cfg.live_per_thread + 2;
        let workers: Vec<_> = (0..cfg.threads)
            .map(|t| {
                let (slots, stop) = (&slots[t * per..(t + 1) * per], &stop_threads);
                s.spawn(move || loop_thread(t, cfg, stop, slots))
            })
            .collect();
        let builders: Vec<_> = (0..cfg.builders.max(1))
            .map(|b| {
                let (scanner, build, results) = (&scanner, &build, &results);
                s.spawn(move || {
                    let mut rng = Rng::new(cfg.seed ^ (b as u64 + 1));
                    let deadline = start + cfg.duration;
                    while Instant::now() < deadline {
                        let outcome = build(&mut rng, scanner);
                        let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                        let rep = &mut r.1;
                        match outcome {
                            Outcome::Built => rep.built += 1,
                            Outcome::Expected(kind) => *rep.expected.entry(kind).or_default() += 1,
                            Outcome::Failed(why) => keep(&mut rep.failures, &mut rep.failure_count, why),
                        }
                    }
                })
            })
            .collect();
        for b in builders {
            if b.join().is_err() {
                let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                let rep = &mut r.1;
                keep(&mut rep.failures, &mut rep.failure_count, "a builder thread panicked".into());
            }
        }
        results.lock().unwrap_or_else(|e| e.into_inner()).1.elapsed = start.elapsed();
        stop_threads.store(true, Ordering::Relaxed);
        for w in workers {
            let res = w.join().unwrap_or_else(|_| ThreadResult {
                clobbered: vec!["a loop thread panicked".into()],
                clobbered_count: 1,
                ..ThreadResult::default()
            });
            results.lock().unwrap_or_else(|e| e.into_inner()).0.push(res);
        }
    });
    let (threads, mut report) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    for t in threads {
        report.thread_maps += t.maps;
        for c in t.clobbered {
            keep(&mut report.clobbered, &mut 0, c);
        }
        report.clobbered_count += t.clobbered_count;
    }
    for (i, (addr, len, seed)) in sentinels.into_iter().enumerate() {
        report.sentinels += 1;
        match check_mapping(addr, len, seed) {
            // SAFETY: our own sentinel, intact.
            Ok(()) => unsafe {
                libc::munmap(addr as *mut _, len);
            },
            Err(what) => report.sentinels_bad.push(format!("sentinel {i} at {addr:#x}+{len:#x}: {what}")),
        }
    }
    drop(guard);
    report
}

/// SIGSEGV/SIGBUS handlers that say what happened before the process dies.
struct FaultGuard {
    old: [libc::sigaction; 2],
}

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];

impl FaultGuard {
    fn install() -> Self {
        // SAFETY: zeroed sigaction structs are valid (no handler, empty mask) and are
        // filled in below; `on_fault` is async-signal-safe (write and _exit only).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_fault as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: [libc::sigaction; 2] = std::mem::zeroed();
            for (i, sig) in SIGNALS.iter().enumerate() {
                libc::sigaction(*sig, &new, &mut old[i]);
            }
            FaultGuard { old }
        }
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        for (i, sig) in SIGNALS.iter().enumerate() {
            // SAFETY: restores the handlers saved by `install`.
            unsafe { libc::sigaction(*sig, &self.old[i], std::ptr::null_mut()) };
        }
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut buf = [0u8; 320];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"\nVMTEST: FAIL stress: ");
    put(if sig == libc::SIGBUS { b"SIGBUS" } else { b"SIGSEGV" });
    put(b" at 0x");
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut hex = [b'0'; 16];
    for (i, h) in hex.iter_mut().enumerate() {
        *h = b"0123456789abcdef"[(addr >> (60 - 4 * i)) & 0xf];
    }
    put(&hex);
    put(b": memory this process relied on was unmapped or replaced under it (a view's page unmapped by a thread \
          that took it for its own, or a foreign mapping clobbered by a map call)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` holds `n` bytes.
    unsafe {
        libc::write(1, buf.as_ptr().cast(), n);
        libc::_exit(3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::SharedRam;

    #[test]
    fn a_mapping_check_tells_intact_overwritten_and_unmapped_apart() {
        let p = page();
        let a = map_anon(2 * p).unwrap();
        // SAFETY: ours.
        unsafe { mem::write_own(a, &pattern::bytes(1, 0, 2 * p)) }.unwrap();
        assert_eq!(check_mapping(a, 2 * p, 1), Ok(()));
        // SAFETY: ours.
        unsafe { (a as *mut u8).add(p + 3).write(0) };
        let e = check_mapping(a, 2 * p, 1).unwrap_err();
        assert!(e.starts_with(&format!("overwritten: byte {:#x}", p + 3)), "{e}");
        // SAFETY: ours.
        unsafe { libc::munmap(a as *mut _, 2 * p) };
        assert!(check_mapping(a, 2 * p, 1).unwrap_err().starts_with("unmapped"));
    }

    #[test]
    fn the_scanner_sees_a_published_mapping_inside_a_range() {
        let slots: Vec<Slot> = (0..3).map(|_| Slot::default()).collect();
        slots[1].len.store(0x2000, Ordering::Release);
        slots[1].addr.store(0x10_3000, Ordering::Release);
        let s = Scanner { slots: &slots };
        assert_eq!(s.foreign_inside(0x10_0000..0x10_4000), vec![(0x10_3000, 0x2000)]);
        assert!(s.foreign_inside(0x10_5000..0x10_8000).is_empty());
    }

    /// Views of shared RAM (which this kernel clones) while the loop threads run: every
    /// view right, nothing damaged. No refused clone here, so this checks the harness
    /// itself reports no false alarm; the guest runs it on a real BAR.
    fn ram_views(ram: &SharedRam) -> impl Fn(&mut Rng, &Scanner<'_>) -> Outcome + Sync + '_ {
        let p = page();
        move |rng, scanner| {
            let pages = ram.len() / p;
            let picks: Vec<usize> = (0..3).map(|_| rng.below(pages)).collect();
            let iov: Vec<libc::iovec> = picks
                .iter()
                .map(|&i| libc::iovec { iov_base: ram.ptr().wrapping_add(i * p).cast(), iov_len: p })
                .collect();
            let view = match iovmap::map(&iov) {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(e.to_string()),
            };
            for (k, &i) in picks.iter().enumerate() {
                // SAFETY: the view and the RAM are live and readable for these pages.
                if let Some(m) = unsafe { pattern::find_mismatch(view.as_ptr().add(k * p), p, 77, (i * p) as u64) } {
                    return Outcome::Failed(format!("view page {k}: {m:?}"));
                }
            }
            let inside = scanner.foreign_inside(view.mapped_range());
            if !inside.is_empty() {
                return Outcome::Failed(format!("foreign mappings inside the view: {inside:x?}"));
            }
            Outcome::Built
        }
    }

    fn short() -> Config {
        Config { threads: 2, builders: 1, duration: Duration::from_millis(300), sentinels: 20, ..Config::default() }
    }

    #[test]
    fn a_clean_run_reports_nothing_damaged() {
        let ram = SharedRam::new(64 * page()).unwrap();
        // SAFETY: the RAM mapping is ours and writable.
        unsafe { pattern::fill(ram.ptr(), ram.len(), 77, 0) };
        let r = run(&short(), ram_views(&ram));
        assert!(r.ok(), "{}: {:?} {:?} {:?}", r.summary(), r.failures, r.clobbered, r.sentinels_bad);
        assert!(r.built > 0 && r.thread_maps > 0 && r.sentinels == 20, "{}", r.summary());
    }

    #[test]
    fn planted_damage_is_reported() {
        let ram = SharedRam::new(64 * page()).unwrap();
        // SAFETY: as above.
        unsafe { pattern::fill(ram.ptr(), ram.len(), 77, 0) };
        let r = run(&Config { plant_every: Some(5), ..short() }, ram_views(&ram));
        assert!(!r.ok());
        assert!(r.clobbered_count > 0, "{}", r.summary());
        let kinds = r.clobbered.join("\n");
        assert!(kinds.contains("overwritten") || kinds.contains("unmapped"), "{kinds}");
    }
}
