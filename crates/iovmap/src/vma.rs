//! VMAs: what the planner needs to know about each mapping of the address space, and
//! how iovmap learns it.
//!
//! The model ([`Vma`], [`VmaSource`]) and the `/proc/self/maps` line parser are pure.
//! [`ProcessVmas`] is the source used in production: it asks the kernel one address at
//! a time with the `PROCMAP_QUERY` ioctl (Linux 6.11+, ~0.35 µs per query) and, on
//! older kernels, parses `/proc/self/maps` once per map call. It keeps nothing else: the
//! planner remembers the VMAs it was told (each is looked up at most once per call).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::regions::FileId;
use crate::sys;

/// One mapping (VMA) of the address space, as far as planning a view cares.
///
/// ```
/// use iovmap::plan::Vma;
/// let v = Vma { start: 0x1000, end: 0x3000, prot: libc::PROT_READ, shared: true, page_size: 0x1000, ..Default::default() };
/// assert!(v.contains(0x2fff) && !v.contains(0x3000));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vma {
    /// First address of the mapping.
    pub start: usize,
    /// One past its last address.
    pub end: usize,
    /// Its protection, as `PROT_*` bits.
    pub prot: i32,
    /// Whether it is a shared mapping (MAP_SHARED): only those can be aliased.
    pub shared: bool,
    /// The page size of the mapping: the base page, or the huge page size of hugetlbfs.
    /// Sources that cannot tell (the `/proc/self/maps` text) report the base page.
    pub page_size: usize,
    /// Offset in its file of the mapping's first byte.
    pub offset: u64,
    /// The file it maps (device as `major << 32 | minor`, inode; zero for none): with
    /// `offset`, what a clone of it must show.
    pub file: FileId,
}

impl Vma {
    /// Whether `addr` lies in the mapping.
    ///
    /// ```
    /// # use iovmap::plan::Vma;
    /// let v = Vma { start: 0x1000, end: 0x2000, page_size: 0x1000, ..Vma::default() };
    /// assert!(v.contains(0x1000) && !v.contains(0xfff));
    /// ```
    #[inline]
    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Answers "which VMA covers this address?" for the planner.
///
/// The production source asks the kernel; tests and fuzzers give a table (a slice of
/// [`Vma`] is one) or their own implementation.
///
/// ```
/// use iovmap::plan::{Vma, VmaSource};
/// struct OneBigMapping;
/// impl VmaSource for OneBigMapping {
///     fn vma_at(&mut self, addr: usize) -> std::io::Result<Option<Vma>> {
///         let v = Vma { start: 0, end: 1 << 40, prot: libc::PROT_READ, shared: true, page_size: 4096, ..Default::default() };
///         Ok(v.contains(addr).then_some(v))
///     }
/// }
/// assert!(OneBigMapping.vma_at(1 << 20)?.is_some());
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait VmaSource {
    /// The VMA that covers `addr`, or `None` when nothing is mapped there.
    fn vma_at(&mut self, addr: usize) -> io::Result<Option<Vma>>;
}

/// A fixed table of VMAs: the planner's input in tests and fuzzing.
impl VmaSource for [Vma] {
    fn vma_at(&mut self, addr: usize) -> io::Result<Option<Vma>> {
        Ok(self.iter().find(|v| v.contains(addr)).copied())
    }
}

/// Parses one line of `/proc/<pid>/maps`:
/// `start-end perms offset dev inode [path]`, addresses in hex, perms like `rw-s`.
/// Returns `None` for anything that is not such a line (or an empty or inverted range).
/// `page_size` is what to report as the mapping's page size (the text does not say).
///
/// ```
/// let v = iovmap::maps::parse_maps_line(b"7f00a000-7f00c000 rw-s 00000000 00:01 2052 /memfd:ram", 4096).unwrap();
/// assert_eq!((v.start, v.end, v.shared), (0x7f00a000, 0x7f00c000, true));
/// assert_eq!(iovmap::maps::parse_maps_line(b"not a maps line", 4096), None);
/// ```
pub fn parse_maps_line(line: &[u8], page_size: usize) -> Option<Vma> {
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = parse_hex(fields.next()?)? as u64;
    let dev = fields.next()?;
    let colon = dev.iter().position(|&b| b == b':')?;
    let (major, minor) = (parse_hex(&dev[..colon])?, parse_hex(&dev[colon + 1..])?);
    let ino = parse_dec(fields.next()?)?;
    if major > u32::MAX as usize || minor > u32::MAX as usize {
        return None;
    }
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = parse_hex(&range[..dash])?;
    let end = parse_hex(&range[dash + 1..])?;
    if start >= end || perms.len() != 4 {
        return None;
    }
    let flag = |i: usize, c: u8| -> Option<bool> {
        match perms[i] {
            b'-' => Some(false),
            x if x == c => Some(true),
            _ => None,
        }
    };
    let prot = prot_of(flag(0, b'r')?, flag(1, b'w')?, flag(2, b'x')?);
    let shared = match perms[3] {
        b's' => true,
        b'p' => false,
        _ => return None,
    };
    let file = FileId::new(major as u32, minor as u32, ino);
    Some(Vma { start, end, prot, shared, page_size, offset, file })
}

/// Formats a [`Vma`] as a `/proc/<pid>/maps` line (without the path), the inverse of
/// [`parse_maps_line`] for what it keeps.
///
/// ```
/// use iovmap::maps::{format_maps_line, parse_maps_line};
/// let v = parse_maps_line(b"1000-3000 r--p 0 0:0 0", 4096).unwrap();
/// assert_eq!(format_maps_line(&v), "1000-3000 r--p 00000000 00:00 0");
/// ```
#[cfg(any(test, feature = "unstable-internals"))]
pub fn format_maps_line(vma: &Vma) -> String {
    format!(
        "{:x}-{:x} {}{}{}{} {:08x} {:02x}:{:02x} {}",
        vma.start,
        vma.end,
        if vma.prot & libc::PROT_READ != 0 { 'r' } else { '-' },
        if vma.prot & libc::PROT_WRITE != 0 { 'w' } else { '-' },
        if vma.prot & libc::PROT_EXEC != 0 { 'x' } else { '-' },
        if vma.shared { 's' } else { 'p' },
        vma.offset,
        vma.file.dev >> 32,
        vma.file.dev & 0xffff_ffff,
        vma.file.ino,
    )
}

/// `PROT_*` bits from readable, writable, executable.
#[inline]
pub(crate) fn prot_of(read: bool, write: bool, exec: bool) -> i32 {
    (if read { libc::PROT_READ } else { 0 })
        | (if write { libc::PROT_WRITE } else { 0 })
        | (if exec { libc::PROT_EXEC } else { 0 })
}

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn parse_hex(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 2 * std::mem::size_of::<usize>() {
        return None;
    }
    s.iter().try_fold(0usize, |acc, &b| {
        let d = (b as char).to_digit(16)?;
        Some((acc << 4) | d as usize)
    })
}

/// Parses every line of a `/proc/<pid>/maps` text, skipping lines it cannot read.
///
/// ```
/// let text = std::fs::read("/proc/self/maps").unwrap();
/// let vmas = iovmap::maps::parse_maps(&text, iovmap::page_size());
/// assert!(vmas.windows(2).all(|w| w[0].end <= w[1].start)); // sorted, disjoint
/// ```
pub fn parse_maps(text: &[u8], page_size: usize) -> Vec<Vma> {
    text.split(|&b| b == b'\n').filter_map(|l| parse_maps_line(l, page_size)).collect()
}

/// Counts the VMAs of the calling process (lines of `/proc/self/maps`).
pub(crate) fn count_process_vmas() -> io::Result<usize> {
    let mut buf = Vec::new();
    sys::read_maps_to_count(&mut buf)?;
    Ok(buf.iter().filter(|&&b| b == b'\n').count())
}

const QUERY_UNKNOWN: u8 = 0;
const QUERY_WORKS: u8 = 1;
const QUERY_MISSING: u8 = 2;

/// Whether this kernel answers PROCMAP_QUERY; learned on first use.
static QUERY_SUPPORT: AtomicU8 = AtomicU8::new(QUERY_UNKNOWN);

/// An open `/proc/self/maps` for PROCMAP_QUERY: after a fork the child's copy still
/// describes the parent, so it is reopened in a child. Queries are serialised (they are
/// rare: one per VMA per map call).
static MAPS_FD: Mutex<Option<MapsFd>> = Mutex::new(None);

struct MapsFd {
    fd: OwnedFd,
    /// Who opened it: how a child tells that it is not its own.
    opener: Opener,
}

/// How a process tells that the maps fd it holds was opened by itself, not by the parent
/// it was forked from.
enum Opener {
    /// A page of iovmap's, wiped in a fork's child (MADV_WIPEONFORK, Linux 4.14+), holds 1
    /// in the process that opened the fd: one load a query, no syscall.
    Witness(sys::WipeOnFork),
    /// Where the kernel refuses MADV_WIPEONFORK: the opener's pid (one getpid a query).
    Pid(libc::pid_t),
}

impl Opener {
    fn new() -> Self {
        match sys::WipeOnFork::new() {
            Ok(page) => Opener::Witness(page),
            Err(e) => {
                log::debug!("iovmap: no MADV_WIPEONFORK ({e}): forks are told by the pid");
                Opener::Pid(sys::getpid())
            }
        }
    }

    /// Whether the calling process is the one that opened the fd.
    fn is_us(&self) -> bool {
        match self {
            Opener::Witness(page) => page.is_set(),
            Opener::Pid(pid) => *pid == sys::getpid(),
        }
    }
}

/// Runs `f` with this process's open /proc/self/maps (opened, or reopened after a fork,
/// as needed), holding the lock for all of `f`.
fn with_maps_fd<T>(f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
    let mut guard = MAPS_FD.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|m| !m.opener.is_us()) {
        let fd = sys::open_read(c"/proc/self/maps")?;
        // A child keeps its (wiped) page: set it again, now the fd is the child's.
        let opener = match guard.take().map(|m| m.opener) {
            Some(Opener::Witness(page)) => Opener::Witness(page),
            _ => Opener::new(),
        };
        if let Opener::Witness(page) = &opener {
            page.set();
        }
        *guard = Some(MapsFd { fd, opener });
    }
    let maps = guard.as_ref().expect("opened above");
    f(maps.fd.as_fd())
}

/// The VMAs covering each of `addrs`, as the kernel says now (nothing cached): one
/// PROCMAP_QUERY each, the lock taken once per 256 (other threads' lookups wait at most
/// that long), or, on kernels without PROCMAP_QUERY, one read of /proc/self/maps for all.
pub(crate) fn vmas_now(addrs: &[usize]) -> io::Result<Vec<Option<Vma>>> {
    if QUERY_SUPPORT.load(Ordering::Relaxed) == QUERY_WORKS {
        let mut out = Vec::with_capacity(addrs.len());
        for chunk in addrs.chunks(256) {
            with_maps_fd(|fd| {
                for &a in chunk {
                    out.push(sys::procmap_query(fd, a)?);
                }
                Ok(())
            })?;
        }
        return Ok(out);
    }
    let mut table = ProcessVmas::new();
    addrs.iter().map(|&a| table.vma_at(a)).collect()
}

/// The VMAs of the calling process, looked up as the planner asks: one PROCMAP_QUERY per
/// address, or, on kernels without it, one parse of /proc/self/maps per source.
pub(crate) struct ProcessVmas {
    /// On kernels without PROCMAP_QUERY: the whole /proc/self/maps, sorted.
    table: Option<Vec<Vma>>,
}

impl ProcessVmas {
    pub(crate) fn new() -> Self {
        ProcessVmas { table: None }
    }

    fn lookup_in_maps_text(&mut self, addr: usize) -> io::Result<Option<Vma>> {
        if self.table.is_none() {
            let mut text = Vec::new();
            sys::read_maps(&mut text)?;
            self.table = Some(parse_maps(&text, sys::page_size()));
        }
        let table = self.table.as_deref().unwrap_or_default();
        let i = table.partition_point(|v| v.start <= addr);
        Ok(i.checked_sub(1).map(|i| table[i]).filter(|v| v.contains(addr)))
    }
}

impl VmaSource for ProcessVmas {
    fn vma_at(&mut self, addr: usize) -> io::Result<Option<Vma>> {
        match QUERY_SUPPORT.load(Ordering::Relaxed) {
            QUERY_MISSING => self.lookup_in_maps_text(addr),
            QUERY_WORKS => with_maps_fd(|fd| sys::procmap_query(fd, addr)),
            _ => match with_maps_fd(|fd| sys::procmap_query(fd, addr)) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                    log::debug!("PROCMAP_QUERY unavailable ({e}): reading /proc/self/maps instead");
                    QUERY_SUPPORT.store(QUERY_MISSING, Ordering::Relaxed);
                    self.lookup_in_maps_text(addr)
                }
                r => {
                    if r.is_ok() {
                        QUERY_SUPPORT.store(QUERY_WORKS, Ordering::Relaxed);
                    }
                    r
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_shared_memfd_line() {
        let l = b"7f2089066000-7f20b9da6000 rw-s 00000000 00:01 2052   /memfd:guest-ram (deleted)";
        let v = parse_maps_line(l, 4096).unwrap();
        assert_eq!(v.start, 0x7f2089066000);
        assert_eq!(v.end, 0x7f20b9da6000);
        assert_eq!(v.prot, libc::PROT_READ | libc::PROT_WRITE);
        assert!(v.shared);
    }

    #[test]
    fn parses_private_and_none() {
        let v = parse_maps_line(b"1000-3000 ---p 00000000 00:00 0", 4096).unwrap();
        assert_eq!((v.prot, v.shared), (0, false));
        let v = parse_maps_line(b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]", 4096).unwrap();
        assert_eq!(v.prot, libc::PROT_EXEC);
    }

    #[test]
    fn rejects_malformed_lines() {
        for l in [
            &b""[..],
            b"1000",
            b"1000-",
            b"-1000 rw-s",
            b"3000-1000 rw-s 0 0:0 0",
            b"1000-1000 rw-s 0 0:0 0",
            b"1000-2000 rwzs 0 0:0 0",
            b"1000-2000 rw-q 0 0:0 0",
            b"1000-2000 rw-",
            b"g000-2000 rw-s 0",
            b"10000000000000000-10000000000000001 rw-s 0",
        ] {
            assert_eq!(parse_maps_line(l, 4096), None, "{}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn format_round_trips() {
        let v = Vma {
            start: 0x1000,
            end: 0x5000,
            prot: libc::PROT_READ,
            shared: true,
            page_size: 4096,
            ..Default::default()
        };
        assert_eq!(parse_maps_line(format_maps_line(&v).as_bytes(), 4096), Some(v));
    }

    #[test]
    fn the_kernel_and_the_text_agree_on_a_shared_mapping() {
        let len = 3 * sys::page_size();
        // SAFETY: fresh shared anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize + sys::page_size();
        let mut src = ProcessVmas::new();
        let via_source = src.vma_at(addr).unwrap().unwrap();
        let mut table = ProcessVmas::new();
        let via_text = table.lookup_in_maps_text(addr).unwrap().unwrap();
        assert_eq!(via_source, via_text);
        assert_eq!((via_source.start, via_source.end), (p as usize, p as usize + len));
        assert!(via_source.shared);
        // SAFETY: the mapping created above.
        unsafe { libc::munmap(p, len) };
        // Nothing mapped: page 1, below vm.mmap_min_addr. (Not `addr`: another test's
        // mapping may land there as soon as it is free, as seen in the 7.2 guest.)
        assert_eq!(ProcessVmas::new().vma_at(sys::page_size()).unwrap(), None);
    }
}
