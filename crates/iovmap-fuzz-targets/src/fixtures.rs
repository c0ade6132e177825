//! The `view` target's world: real kernel objects laid out in one arena of address space
//! whose every VMA the model knows, so that any fuzzed segment (even one that runs from
//! one fixture into the next, or into a guard page) has an outcome the model predicts.
//!
//! ```text
//! guard | A: memfd a, pages 0..64 (24..32 read-only: 3 VMAs) | B: memfd b, 32 pages | guard
//!       | A': memfd a again, pages 48..80 | guard | S: shared anonymous, 16 pages | guard
//!       | R: perf ring (VM_PFNMAP), 3 pages | guard | Q: BPF array (VM_DONTEXPAND), 16 pages
//!       | guard | X: private anonymous, 4 pages | guard (to 2 MiB) | H: hugetlb memfd, 2 huge pages | guard
//! ```
//!
//! Guards are the arena's own PROT_NONE private reservation (`NotShareable`); page 1 of
//! the address space stands for unmapped memory. Registered, in every map call's fresh
//! `Remapper`: A and A' (the same file: runs may hop between them by file offset), R
//! (whole ring only), Q as a vfio-style region with a hole at pages 6..8, and H. B and S
//! are clone-only. R, Q or H are left out (and said so once) where the kernel or the
//! privileges do not allow them.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use iovmap::Remapper;
use iovmap::plan::{FileId, RegionSpan, Vma};
use iovmap::vfio::{VFIO_REGION_INFO_FLAG_MMAP, VfioRegionInfo};
use iovmap_testkit::{self as kit, BpfArray, GuestRam, PerfRing};

/// What a fixture is, which decides what the kernel does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The arena's PROT_NONE private reservation between fixtures.
    Guard,
    /// A memfd mapping (A, A', B).
    Memfd,
    /// Shared anonymous memory.
    SharedAnon,
    /// The perf ring: clone refused (EFAULT), fd maps only the whole ring at offset 0.
    Perf,
    /// The BPF array: clone refused (EFAULT), fd maps any page.
    Bpf,
    /// Private anonymous memory.
    Private,
    /// Hugetlb memfd: clone refused (EINVAL), fd maps huge-aligned.
    Huge,
}

impl Kind {
    /// Whether the kernel refuses to clone it.
    pub fn refuses_clone(self) -> bool {
        matches!(self, Kind::Perf | Kind::Bpf | Kind::Huge)
    }

    /// Whether a view may write into it to check that it aliases the source (perf data
    /// pages SIGBUS on a user write; the control page belongs to the kernel).
    pub fn writable(self) -> bool {
        matches!(self, Kind::Memfd | Kind::SharedAnon | Kind::Bpf | Kind::Huge)
    }
}

/// One fixture of the arena.
#[derive(Clone, Copy, Debug)]
pub struct Fixture {
    /// A, A', B, S, R, Q, X or H.
    pub name: &'static str,
    /// What it is.
    pub kind: Kind,
    /// First byte.
    pub start: usize,
    /// Bytes.
    pub len: usize,
}

/// A registration made into every fresh remapper.
#[derive(Clone, Debug)]
enum Registration {
    Plain { fixture: usize, fd: usize, offset: u64 },
    Vfio { fixture: usize, fd: usize, info: VfioRegionInfo },
}

/// The world of the `view` target, built once per process.
pub struct World {
    /// The arena: `[base, base + len)`.
    pub base: usize,
    /// Its length.
    pub len: usize,
    /// The fixtures, in address order.
    pub fixtures: Vec<Fixture>,
    /// Every VMA of the arena, in address order, as the kernel reports them.
    pub vmas: Vec<Vma>,
    /// The fixture kind of each VMA.
    pub kinds: Vec<Kind>,
    /// The registered regions every fresh remapper holds, as the planner sees them.
    pub spans: Vec<RegionSpan>,
    /// For each span, the fixture kind it registers.
    pub span_kinds: Vec<Kind>,
    registrations: Vec<Registration>,
    files: Vec<File>,
    _ring: Option<PerfRing>,
    _bpf: Option<BpfArray>,
    _huge: Option<GuestRam>,
    /// What could not be had on this machine.
    pub missing: Vec<String>,
}

// SAFETY: the world is built once and never changed; the raw addresses it holds are only
// read. The kernel objects it owns may be used from any thread.
unsafe impl Sync for World {}
// SAFETY: as above.
unsafe impl Send for World {}

/// The base page of this kernel (16 KiB on arm64-16k): the world is laid out in pages.
fn p() -> usize {
    kit::page()
}
const HUGE: usize = kit::HUGE_2M;

fn map_fixed(at: usize, len: usize, prot: i32, flags: i32, fd: Option<BorrowedFd<'_>>, offset: u64) {
    let raw = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: `at` lies in the arena this module reserved and owns; MAP_FIXED replaces
    // only the arena's own reservation there.
    let p =
        unsafe { libc::mmap(at as *mut libc::c_void, len, prot, flags | libc::MAP_FIXED, raw, offset as libc::off_t) };
    assert_eq!(p as usize, at, "mmap into the arena at {at:#x}: {}", std::io::Error::last_os_error());
}

fn fill_file(f: &File, len: usize, seed: u64) {
    let bytes: Vec<u8> = (0..len).map(|i| kit::pattern(seed, i)).collect();
    f.set_len(len as u64).unwrap();
    f.write_all_at(&bytes, 0).unwrap();
}

fn file_id(fd: BorrowedFd<'_>) -> FileId {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat into a properly sized buffer.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) }, 0);
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    FileId { dev: st.st_dev, ino: st.st_ino }
}

/// A VMA of the arena as /proc/self/maps shows it.
struct KernelVma {
    start: usize,
    end: usize,
    prot: i32,
    shared: bool,
    /// File offset of `start`.
    offset: u64,
    file: FileId,
}

/// The VMAs of `[start, end)`, read from /proc/self/maps with a reader of this file's own:
/// the model is not built with the parser it fuzzes.
fn kernel_vmas(start: usize, end: usize) -> Vec<KernelVma> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(off), Some(dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        if e <= start || s >= end {
            continue;
        }
        let p = perms.as_bytes();
        let prot = (if p[0] == b'r' { libc::PROT_READ } else { 0 })
            | (if p[1] == b'w' { libc::PROT_WRITE } else { 0 })
            | (if p[2] == b'x' { libc::PROT_EXEC } else { 0 });
        let (major, minor) = dev.split_once(':').unwrap();
        let file = FileId::new(
            u32::from_str_radix(major, 16).unwrap(),
            u32::from_str_radix(minor, 16).unwrap(),
            ino.parse().unwrap(),
        );
        let offset = u64::from_str_radix(off, 16).unwrap() + (s.max(start) - s) as u64;
        out.push(KernelVma { start: s.max(start), end: e.min(end), prot, shared: p[3] == b's', offset, file });
    }
    out
}

impl World {
    /// Builds the arena. Panics if the kernel lays it out otherwise than planned.
    pub fn new() -> World {
        let mut missing = Vec::new();
        let ring = PerfRing::new(2).map_err(|e| missing.push(format!("perf ring: {e}"))).ok();
        let bpf = BpfArray::new(16).map_err(|e| missing.push(format!("BPF array: {e}"))).ok();
        let huge = GuestRam::huge(2 * HUGE).map_err(|e| missing.push(format!("hugetlb: {e}"))).ok();

        let a = kit::memfd("fuzz-view-a", 0).unwrap();
        fill_file(&a, 80 * p(), 1);
        let b = kit::memfd("fuzz-view-b", 0).unwrap();
        fill_file(&b, 32 * p(), 2);
        if let Some(h) = &huge {
            h.fill(3);
        }
        if let Some(q) = &bpf {
            // SAFETY: the array's own writable mapping, not shared yet.
            unsafe { kit::fill(q.map.ptr(), q.map.len(), 4, 0) };
        }
        if let Some(r) = &ring {
            // The control page from offset 512 on is the user's (the kernel leaves it alone).
            // SAFETY: page 0 of the ring is writable.
            unsafe { kit::fill(r.map.ptr().add(512), p() - 512, 5, 512) };
        }

        // Lay out the arena.
        let mut layout: Vec<(&'static str, Kind, usize)> =
            vec![("A", Kind::Memfd, 64 * p()), ("B", Kind::Memfd, 32 * p())];
        layout.push(("guard", Kind::Guard, p()));
        layout.push(("A'", Kind::Memfd, 32 * p()));
        layout.push(("guard", Kind::Guard, p()));
        layout.push(("S", Kind::SharedAnon, 16 * p()));
        if ring.is_some() {
            layout.push(("guard", Kind::Guard, p()));
            layout.push(("R", Kind::Perf, 3 * p()));
        }
        if bpf.is_some() {
            layout.push(("guard", Kind::Guard, p()));
            layout.push(("Q", Kind::Bpf, 16 * p()));
        }
        layout.push(("guard", Kind::Guard, p()));
        layout.push(("X", Kind::Private, 4 * p()));
        layout.push(("guard", Kind::Guard, p()));
        let body: usize = layout.iter().map(|l| l.2).sum();
        let len = (p() + body).next_multiple_of(HUGE) + 2 * HUGE + p();
        // SAFETY: a fresh PROT_NONE reservation where the kernel chooses.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        // Start one page below a 2 MiB boundary so that H can be aligned at its end.
        let base = (raw as usize).next_multiple_of(HUGE);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let mut fixtures = Vec::new();
        let mut at = base + p(); // a guard first
        let mut files = vec![a, b];
        for &(name, kind, n) in &layout {
            let fd = match name {
                "A" | "A'" => Some(files[0].as_fd()),
                "B" => Some(files[1].as_fd()),
                "R" => ring.as_ref().map(|r| r.fd()),
                "Q" => bpf.as_ref().map(|q| q.fd()),
                _ => None,
            };
            let offset = if name == "A'" { 48 * p() as u64 } else { 0 };
            match kind {
                Kind::Guard => {}
                Kind::SharedAnon => map_fixed(at, n, rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS, None, 0),
                Kind::Private => map_fixed(at, n, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0),
                _ => map_fixed(at, n, rw, libc::MAP_SHARED, fd, offset),
            }
            if kind != Kind::Guard {
                fixtures.push(Fixture { name, kind, start: at, len: n });
            }
            at += n;
        }
        if let Some(h) = &huge {
            let start = at.next_multiple_of(HUGE);
            map_fixed(start, 2 * HUGE, rw, libc::MAP_SHARED, Some(h.fd()), 0);
            fixtures.push(Fixture { name: "H", kind: Kind::Huge, start, len: 2 * HUGE });
        }
        // The arena ends with a guard after everything; trim what lies beyond `len`.
        let end = base + len;
        // SAFETY: the head and tail of the reservation made above, unused.
        unsafe {
            if base > raw as usize {
                libc::munmap(raw, base - raw as usize);
            }
            libc::munmap(end as *mut libc::c_void, raw as usize + len + HUGE - end);
        }
        let s = fixtures.iter().find(|f| f.name == "S").unwrap();
        // SAFETY: S was just mapped read-write.
        unsafe { kit::fill(s.start as *mut u8, s.len, 6, 0) };
        let a = fixtures.iter().find(|f| f.name == "A").unwrap();
        // Split A into three VMAs: its pages 24..32 read-only.
        // SAFETY: pages of A, which this module mapped.
        assert_eq!(unsafe { libc::mprotect((a.start + 24 * p()) as *mut libc::c_void, 8 * p(), libc::PROT_READ) }, 0);

        // The model's table: what the kernel reports, each VMA given its fixture's kind
        // and page size, checked against the plan above.
        let kind_at = |addr: usize| {
            fixtures.iter().find(|f| f.start <= addr && addr < f.start + f.len).map_or(Kind::Guard, |f| f.kind)
        };
        let mut vmas = Vec::new();
        let mut kinds = Vec::new();
        for KernelVma { start: s, end: e, prot, shared, offset, file } in kernel_vmas(base, end) {
            let kind = kind_at(s);
            assert!(
                fixtures.iter().all(|f| f.start >= e || f.start + f.len <= s || (f.start <= s && e <= f.start + f.len)),
                "a VMA [{s:#x}, {e:#x}) straddles a fixture boundary"
            );
            assert_eq!(shared, !matches!(kind, Kind::Guard | Kind::Private), "[{s:#x}, {e:#x}) {kind:?}");
            let page_size = if kind == Kind::Huge { HUGE } else { p() };
            vmas.push(Vma { start: s, end: e, prot, shared, page_size, offset, file });
            kinds.push(kind);
        }
        assert_eq!((vmas.first().unwrap().start, vmas.last().unwrap().end), (base, end), "the arena has holes");
        assert!(vmas.windows(2).all(|w| w[0].end == w[1].start), "the arena has holes");
        // One VMA per fixture, two more for A's read-only middle, one per stretch of guard.
        let mut guards = usize::from(fixtures[0].start > base)
            + usize::from(end > fixtures.last().map_or(base, |f| f.start + f.len));
        guards += fixtures.windows(2).filter(|w| w[1].start > w[0].start + w[0].len).count();
        assert_eq!(vmas.len(), fixtures.len() + 2 + guards, "arena VMAs: {vmas:#x?}");

        // What every fresh remapper registers.
        let mut registrations = vec![
            Registration::Plain { fixture: 0, fd: 0, offset: 0 },
            Registration::Plain { fixture: 2, fd: 0, offset: 48 * p() as u64 },
        ];
        let idx = |name: &str| fixtures.iter().position(|f| f.name == name);
        let ring_fd = ring.as_ref().map(|r| {
            files.push(File::from(kit::dup(r.fd()).unwrap()));
            files.len() - 1
        });
        if let (Some(fixture), Some(fd)) = (idx("R"), ring_fd) {
            registrations.push(Registration::Plain { fixture, fd, offset: 0 });
        }
        let bpf_fd = bpf.as_ref().map(|q| {
            files.push(File::from(kit::dup(q.fd()).unwrap()));
            files.len() - 1
        });
        if let (Some(fixture), Some(fd)) = (idx("Q"), bpf_fd) {
            let info = VfioRegionInfo {
                index: 0,
                flags: VFIO_REGION_INFO_FLAG_MMAP,
                size: 16 * p() as u64,
                offset: 0,
                sparse_areas: Some(vec![(0, 6 * p() as u64), (8 * p() as u64, 8 * p() as u64)]),
            };
            registrations.push(Registration::Vfio { fixture, fd, info });
        }
        if let (Some(fixture), Some(h)) = (idx("H"), &huge) {
            files.push(File::from(kit::dup(h.fd()).unwrap()));
            registrations.push(Registration::Plain { fixture, fd: files.len() - 1, offset: 0 });
        }
        let mut w = World {
            base,
            len,
            fixtures,
            vmas,
            kinds,
            spans: Vec::new(),
            span_kinds: Vec::new(),
            registrations,
            files,
            _ring: ring,
            _bpf: bpf,
            _huge: huge,
            missing,
        };
        let (spans, span_kinds) = w.expected_spans();
        w.spans = spans;
        w.span_kinds = span_kinds;
        // The remapper agrees on what is registered.
        let r = w.remapper();
        let mappable: Vec<(usize, usize, u64)> =
            w.spans.iter().filter(|s| s.mappable).map(|s| (s.start, s.end - s.start, s.offset)).collect();
        assert_eq!(r.regions().map(|g| (g.addr as usize, g.len, g.offset)).collect::<Vec<_>>(), mappable);
        w
    }

    /// The spans a fresh remapper holds, as `register` and `register_vfio_region_info`
    /// make them (vfio holes carry the file and offset of the area before them).
    fn expected_spans(&self) -> (Vec<RegionSpan>, Vec<Kind>) {
        let mut spans = Vec::new();
        let mut kinds = Vec::new();
        for reg in &self.registrations {
            match reg {
                Registration::Plain { fixture, fd, offset } => {
                    let f = self.fixtures[*fixture];
                    let page_size = if f.kind == Kind::Huge { HUGE } else { p() };
                    let file = file_id(self.files[*fd].as_fd());
                    spans.push(self.seen(RegionSpan {
                        start: f.start,
                        end: f.start + f.len,
                        offset: *offset,
                        file,
                        page_size,
                        ..RegionSpan::default()
                    }));
                    kinds.push(f.kind);
                }
                Registration::Vfio { fixture, fd, info } => {
                    let f = self.fixtures[*fixture];
                    let file = file_id(self.files[*fd].as_fd());
                    let mut cursor = 0u64;
                    let mut last: Option<RegionSpan> = None;
                    for &(off, len) in info.sparse_areas.as_deref().unwrap() {
                        let span = self.seen(RegionSpan {
                            start: f.start + off as usize,
                            end: f.start + (off + len) as usize,
                            offset: info.offset + off,
                            file,
                            page_size: p(),
                            ..RegionSpan::default()
                        });
                        if off > cursor {
                            spans.push(RegionSpan {
                                start: f.start + cursor as usize,
                                end: span.start,
                                mappable: false,
                                ..span
                            });
                            kinds.push(f.kind);
                        }
                        spans.push(span);
                        kinds.push(f.kind);
                        cursor = off + len;
                        last = Some(span);
                    }
                    assert_eq!(cursor, info.size, "no trailing hole in this layout: {last:?}");
                }
            }
        }
        let mut both: Vec<(RegionSpan, Kind)> = spans.into_iter().zip(kinds).collect();
        both.sort_by_key(|(s, _)| s.start);
        both.into_iter().unzip()
    }

    /// `span` with what the kernel reports mapped at its start, as registration records it.
    fn seen(&self, span: RegionSpan) -> RegionSpan {
        let v = self.vmas.iter().find(|v| v.start <= span.start && span.start < v.end).expect("a registered VMA");
        RegionSpan { mapped_file: v.file, mapped_offset: v.offset + (span.start - v.start) as u64, ..span }
    }

    /// A remapper with everything registered.
    pub fn remapper(&self) -> Remapper {
        let mut r = Remapper::new();
        for reg in &self.registrations {
            match reg {
                Registration::Plain { fixture, fd, offset } => {
                    let f = self.fixtures[*fixture];
                    r.register(f.start as *const u8, f.len, self.files[*fd].as_fd(), *offset).unwrap();
                }
                Registration::Vfio { fixture, fd, info } => {
                    let f = self.fixtures[*fixture];
                    r.register_vfio_region_info(self.files[*fd].as_fd(), info, f.start as *const u8).unwrap();
                }
            }
        }
        r
    }

    /// The fixture containing `addr`.
    pub fn fixture_at(&self, addr: usize) -> Option<&Fixture> {
        self.fixtures.iter().find(|f| f.start <= addr && addr < f.start + f.len)
    }

    /// The kind of the VMA containing `addr` (guards included), if it is in the arena.
    pub fn kind_at(&self, addr: usize) -> Option<Kind> {
        self.vmas.iter().position(|v| v.start <= addr && addr < v.end).map(|i| self.kinds[i])
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}
