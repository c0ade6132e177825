//! Process-wide counters for leak tests, and the lock that keeps such tests apart.

use std::sync::{Mutex, MutexGuard};

/// VMAs of this process (lines of /proc/self/maps).
pub fn count_vmas() -> usize {
    std::fs::read("/proc/self/maps").expect("read /proc/self/maps").iter().filter(|&&b| b == b'\n').count()
}

/// Open fds of this process (entries of /proc/self/fd, minus the one listing it).
pub fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd").count().saturating_sub(1)
}

/// The VmFlags line of /proc/self/smaps for the mapping containing `addr`.
pub fn vma_flags(addr: *const u8) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let a = addr as usize;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                    inside = s <= a && a < e;
                    continue;
                }
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_string());
            }
        }
    }
    None
}

/// The process's VMA and fd counts at one moment (and its /proc/self/maps then, to show
/// what changed when the counts do).
#[derive(Clone, Debug)]
pub struct Counts {
    /// VMAs.
    pub vmas: usize,
    /// Open fds.
    pub fds: usize,
    maps: String,
}

impl PartialEq for Counts {
    fn eq(&self, other: &Self) -> bool {
        (self.vmas, self.fds) == (other.vmas, other.fds)
    }
}

impl Eq for Counts {}

impl Counts {
    /// Counts now.
    pub fn now() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
        Counts { vmas: maps.lines().count(), fds: count_fds(), maps }
    }

    /// What changed since these counts were taken: `None` if the counts are the same,
    /// else the counts and the VMAs that appeared and disappeared.
    pub fn changes(&self) -> Option<String> {
        let now = Counts::now();
        if *self == now {
            return None;
        }
        let gone: Vec<&str> = self.maps.lines().filter(|l| !now.maps.lines().any(|m| m == *l)).collect();
        let new: Vec<&str> = now.maps.lines().filter(|l| !self.maps.lines().any(|m| m == *l)).collect();
        Some(format!(
            "VMA/fd counts changed (before {} VMAs {} fds, after {} VMAs {} fds)\n  VMAs gone: {gone:#?}\n  VMAs new: {new:#?}",
            self.vmas, self.fds, now.vmas, now.fds
        ))
    }

    /// Panics (with `what`) unless the counts are what they were, listing the VMAs that
    /// appeared and disappeared since.
    #[track_caller]
    pub fn assert_unchanged(&self, what: &str) {
        if let Some(changes) = self.changes() {
            panic!("{what}: {changes}");
        }
    }
}

static PROCESS: Mutex<()> = Mutex::new(());

/// Serialises tests that count process-wide VMAs or fds within one test binary: every
/// test in such a binary takes it, so no test maps or opens anything beside another's
/// count.
pub fn process_lock() -> MutexGuard<'static, ()> {
    PROCESS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this kernel answers the PROCMAP_QUERY ioctl (Linux 6.11+).
pub fn has_procmap_query() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(maps) = std::fs::File::open("/proc/self/maps") else { return false };
    // struct procmap_query asking about address 0 (unmapped: ENOENT when supported).
    let mut q = [0u64; 13];
    q[0] = 104;
    // SAFETY: a zeroed, correctly sized struct procmap_query.
    let r = unsafe { libc::ioctl(maps.as_raw_fd(), 0xC068_6611, q.as_mut_ptr()) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOTTY)
}

/// The `main` of a test binary that counts process-wide VMAs or fds (`harness = false`):
/// the libtest harness starts a thread per test, and a new thread's stack is a VMA that
/// lands in another test's count, so here every check runs in turn on the main thread.
///
/// glibc is pinned to one malloc arena first (contending threads make it add arenas,
/// two VMAs each, at any time on a loaded machine), then `warm_up` lets the process reach
/// its steady state (cached thread stacks, iovmap's PROCMAP_QUERY fd and kernel probe).
/// Arguments that do not start with `-` select the checks whose names contain them.
/// Prints `test <name> ... ok|FAILED` and a summary, and exits 1 if any check panicked.
pub fn run_counting_checks(binary: &str, checks: &[(&str, fn())], warm_up: impl FnOnce()) {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    // SAFETY: called from main before any other thread of the process starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    warm_up();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, check) in checks {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let ok = catch_unwind(AssertUnwindSafe(check)).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(*name);
        }
    }
    println!("\n{binary}: {ran} checks, {} failed", failed.len());
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
