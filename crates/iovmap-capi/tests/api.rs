//! The C API called from Rust against the real kernel: memfd RAM, perf rings (VM_PFNMAP),
//! private and unmapped memory, read-only backings. Every error path returns its code,
//! leaves `*out` NULL, and leaves the message and the index of the bad iovec for the
//! calling thread.

use std::ffi::{CStr, c_int, c_uint, c_void};
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;

use iovmap_capi::*;
use iovmap_testkit::{self as kit, GuestRam, Mapping, PerfRing, iov, skip};

fn page() -> usize {
    kit::page()
}

/// A remapper freed on drop.
struct Remapper(*mut IovmapRemapper);

// SAFETY: the C API lets any thread map with a remapper; the tests that share one never
// register or free it while others map.
unsafe impl Send for Remapper {}
// SAFETY: as above.
unsafe impl Sync for Remapper {}

/// A view freed on drop.
struct View(*mut IovmapView);

impl Remapper {
    fn new() -> Self {
        let r = iovmap_remapper_new();
        assert!(!r.is_null(), "iovmap_remapper_new: {}", last_message());
        Remapper(r)
    }

    fn register(&self, addr: *const u8, len: usize, fd: c_int, offset: u64) -> c_int {
        // SAFETY: a live remapper this thread alone uses while registering.
        unsafe { iovmap_register(self.0, addr.cast(), len, fd, offset) }
    }

    fn unregister(&self, addr: *const u8) -> c_int {
        // SAFETY: as above.
        unsafe { iovmap_unregister(self.0, addr.cast()) }
    }

    /// Maps `list`; on error checks that `*out` was set to NULL.
    fn map(&self, list: &[libc::iovec], flags: c_uint) -> Result<View, c_int> {
        let mut out = ptr::dangling_mut::<IovmapView>(); // must be overwritten either way
        let n = c_int::try_from(list.len()).unwrap();
        // SAFETY: a live remapper, `n` readable iovecs, a writable `out`.
        let rc = unsafe { iovmap_map(self.0, list.as_ptr(), n, flags, &mut out) };
        if rc == IOVMAP_OK.raw() {
            assert!(!out.is_null());
            assert_eq!(last_message(), "", "success clears the last error");
            assert_eq!(iovmap_last_error_index(), -1);
            Ok(View(out))
        } else {
            assert!(out.is_null(), "a failed iovmap_map must set *out to NULL");
            Err(rc)
        }
    }
}

impl Drop for Remapper {
    fn drop(&mut self) {
        // SAFETY: made by iovmap_remapper_new, freed once.
        unsafe { iovmap_remapper_free(self.0) }
    }
}

impl View {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: a live view.
        unsafe { iovmap_view_ptr(self.0) }.cast()
    }

    fn len(&self) -> usize {
        // SAFETY: a live view.
        unsafe { iovmap_view_len(self.0) }
    }

    fn stats(&self) -> (u64, u64, u64, u64, u64) {
        let mut s = IovmapStats::default();
        // SAFETY: a live view and a writable struct.
        assert_eq!(unsafe { iovmap_view_stats(self.0, &mut s) }, IOVMAP_OK.raw());
        (s.segments, s.runs, s.cloned, s.fd_mapped, s.syscalls)
    }

    fn read(&self, at: usize) -> u8 {
        assert!(at < self.len());
        // SAFETY: in bounds of a live view.
        unsafe { self.ptr().add(at).read_volatile() }
    }

    fn write(&self, at: usize, v: u8) {
        assert!(at < self.len());
        // SAFETY: in bounds of a live read-write view.
        unsafe { self.ptr().add(at).write_volatile(v) }
    }

    /// The view's bytes equal the sources' bytes, concatenated.
    #[track_caller]
    fn assert_matches(&self, list: &[libc::iovec]) {
        let mut at = 0;
        for (i, v) in list.iter().enumerate() {
            // SAFETY: the sources are live fixtures nothing writes meanwhile; the view
            // is live and `at + iov_len <= len()` (asserted below).
            let diff = unsafe { kit::first_difference(self.ptr().add(at), v.iov_base.cast(), v.iov_len) };
            assert_eq!(diff, None, "iovec {i} differs from the view at its byte {diff:?}");
            at += v.iov_len;
        }
        assert_eq!(at, self.len());
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: made by iovmap_map, freed once, not used afterwards.
        unsafe { iovmap_view_free(self.0) }
    }
}

fn last_message() -> String {
    // SAFETY: a valid C string until this thread's next call into iovmap.
    unsafe { CStr::from_ptr(iovmap_last_error_message()) }.to_str().unwrap().to_string()
}

/// `rc` is `code`, and the thread's last error has `index` and a message containing
/// every one of `says`.
#[track_caller]
fn assert_error(rc: c_int, code: IovmapCode, index: i64, says: &[&str]) {
    assert_eq!(IovmapCode::from_raw(rc), Some(code), "rc {rc}; message: {}", last_message());
    assert_eq!(iovmap_last_error_index(), index, "index; message: {}", last_message());
    let msg = last_message();
    for s in says {
        assert!(msg.contains(s), "message {msg:?} lacks {s:?}");
    }
}

#[test]
fn memfd_scatter_list_maps_and_aliases_both_ways() {
    let p = page();
    let ram = GuestRam::new(64 * p).unwrap();
    ram.fill(1);
    // Pages 9-11 as three iovecs (one run), 3, a zero-length entry, 20-21, 0.
    let list = [
        ram.iov(9 * p, p),
        ram.iov(10 * p, p),
        ram.iov(11 * p, p),
        ram.iov(3 * p, p),
        ram.iov(40 * p, 0),
        ram.iov(20 * p, 2 * p),
        ram.iov(0, p),
    ];
    let r = Remapper::new();
    // An error first: the success below must clear it.
    assert!(r.map(&list, 1 << 7).is_err());
    let view = r.map(&list, 0).unwrap();
    assert_eq!(view.stats(), (6, 4, 4, 0, 4));
    assert_eq!(view.len(), 7 * p);
    view.assert_matches(&list);
    view.write(10, 0xa1);
    assert_eq!(ram.read(9 * p + 10), 0xa1);
    ram.write(21 * p + 7, 0xa3);
    assert_eq!(view.read(5 * p + 7), 0xa3); // page 21 is the view's sixth
    drop(view);
    assert_eq!(ram.read(9 * p + 10), 0xa1, "freeing the view leaves the source alone");
}

#[test]
fn first_iovec_may_start_and_last_may_end_mid_page() {
    let p = page();
    let ram = GuestRam::new(8 * p).unwrap();
    ram.fill(2);
    let list = [ram.iov(p + 123, p - 123), ram.iov(5 * p, 77)];
    let view = Remapper::new().map(&list, 0).unwrap();
    assert_eq!(view.len(), p - 123 + 77);
    assert_eq!(view.ptr() as usize % p, 123);
    view.assert_matches(&list);
}

#[test]
fn perf_ring_is_mapped_through_its_registered_fd() {
    let ring = match PerfRing::new(2) {
        Ok(r) => r,
        Err(e) => skip!("no perf ring: {e}"),
    };
    let p = page();
    let ram = GuestRam::new(8 * p).unwrap();
    ram.fill(3);
    // Page 0 of the ring is writable, and the kernel leaves bytes 512..1024 alone.
    // SAFETY: in bounds of the ring's writable control page.
    unsafe { kit::fill(ring.map.ptr().add(512), 512, 4, 0) };
    let list = [ram.iov(2 * p, p), ring.map.iov(0, p), ring.map.iov(p, ring.map.len() - p), ram.iov(5 * p, p)];
    let r = Remapper::new();

    // Unregistered: the kernel refuses the clone and nothing stands in.
    assert_error(r.map(&list, 0).err().unwrap(), IOVMAP_E_NO_FALLBACK, 1, &["segment 1", "register"]);

    assert_eq!(r.register(ring.map.ptr(), ring.map.len(), ring.fd().as_raw_fd(), 0), IOVMAP_OK.raw());
    let view = r.map(&list, 0).unwrap();
    // Two clones, one refused clone, one fd map.
    assert_eq!(view.stats(), (4, 3, 2, 1, 4));
    view.assert_matches(&list);
    // Both ways through the control page.
    view.write(p + 600, 0x5a);
    // SAFETY: in bounds of the ring's control page.
    assert_eq!(unsafe { ring.map.ptr().add(600).read_volatile() }, 0x5a);
    // SAFETY: as above; writable.
    unsafe { ring.map.ptr().add(700).write_volatile(0x6b) };
    assert_eq!(view.read(p + 700), 0x6b);
    drop(view);

    // The refusal is remembered: the ring alone now costs one syscall.
    let view = r.map(&list[1..3], IOVMAP_MAP_POPULATE).unwrap();
    assert_eq!(view.stats(), (2, 1, 0, 1, 1));
    view.assert_matches(&list[1..3]);
    drop(view);

    assert_eq!(r.unregister(ring.map.ptr()), IOVMAP_OK.raw());
    assert_error(r.map(&list, 0).err().unwrap(), IOVMAP_E_NO_FALLBACK, 1, &[]);
    assert_error(r.unregister(ring.map.ptr()), IOVMAP_E_INVALID_REGION, -1, &["no region is registered"]);
}

#[test]
fn read_only_flag_gives_a_read_only_view() {
    let ram = GuestRam::new(4 * page()).unwrap();
    ram.fill(5);
    let list = [ram.iov(page(), 2 * page())];
    let view = Remapper::new().map(&list, IOVMAP_MAP_READ_ONLY).unwrap();
    view.assert_matches(&list);
    let flags = kit::vma_flags(view.ptr()).unwrap();
    assert!(flags.split(' ').any(|f| f == "rd") && !flags.split(' ').any(|f| f == "wr"), "VmFlags {flags}");
    let rw = Remapper::new().map(&list, 0).unwrap();
    let flags = kit::vma_flags(rw.ptr()).unwrap();
    assert!(flags.split(' ').any(|f| f == "wr"), "VmFlags {flags}");
}

/// Resident bytes of the mappings inside `range`, from /proc/self/smaps.
fn resident(range: std::ops::Range<usize>) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut kb = 0;
    for line in smaps.lines() {
        if let Some((s, e)) = line.split_once(' ').and_then(|(r, _)| r.split_once('-')) {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s >= range.start && e <= range.end;
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:").filter(|_| inside) {
            kb += v.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap();
        }
    }
    kb * 1024
}

#[test]
fn populate_flag_prefaults_the_view() {
    let ram = GuestRam::new(16 * page()).unwrap();
    ram.fill(6); // the memfd has its pages; a view's page tables do not until touched
    let list = [ram.iov(8 * page(), 8 * page())];
    let r = Remapper::new();
    let lazy = r.map(&list, 0).unwrap();
    let range = |v: &View| v.ptr() as usize..v.ptr() as usize + v.len();
    assert_eq!(resident(range(&lazy)), 0, "nothing faulted in yet");
    let eager = r.map(&list, IOVMAP_MAP_POPULATE).unwrap();
    assert_eq!(resident(range(&eager)), 8 * page());
    let eager_ro = r.map(&list, IOVMAP_MAP_POPULATE | IOVMAP_MAP_READ_ONLY).unwrap();
    assert_eq!(resident(range(&eager_ro)), 8 * page());
    eager_ro.assert_matches(&list);
}

#[test]
fn null_pointers_negative_counts_and_unknown_flags_are_errors() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let list = [ram.iov(0, page())];
    let r = Remapper::new();
    let bad = |rc: c_int, says: &str| assert_error(rc, IOVMAP_E_INVALID_ARGUMENT, -1, &[says]);
    let mut out = ptr::dangling_mut::<IovmapView>();

    // SAFETY: for this and each call below: every pointer passed is NULL, points to live
    // objects of the test, or (`out`, `stats`) is writable; iovmap checks before use.
    bad(unsafe { iovmap_map(ptr::null(), list.as_ptr(), 1, 0, &mut out) }, "iovmap_map: the remapper is NULL");
    assert!(out.is_null(), "*out is NULL after any failure");
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, list.as_ptr(), 1, 0, ptr::null_mut()) }, "iovmap_map: out is NULL");
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, ptr::null(), 3, 0, &mut out) }, "iov is NULL but iovcnt is 3");
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, list.as_ptr(), -1, 0, &mut out) }, "iovcnt is negative (-1)");
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, list.as_ptr(), c_int::MIN, 0, &mut out) }, "iovcnt is negative");
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, list.as_ptr(), 1, 1 << 5, &mut out) }, "unknown flags 0x20");
    bad(
        unsafe { iovmap_map(r.0, list.as_ptr(), 1, IOVMAP_MAP_REMAP_ONLY | IOVMAP_MAP_KERNEL_BUILT, &mut out) },
        "exclude each other",
    );
    // SAFETY: as above.
    bad(unsafe { iovmap_map(r.0, list.as_ptr(), 1, 0x8000_0001, &mut out) }, "unknown flags 0x80000000");
    // An iovec array at an odd address.
    let mut bytes = vec![0u8; 2 * size_of::<libc::iovec>()];
    let odd = bytes.as_mut_ptr().wrapping_add(1).cast::<libc::iovec>();
    // SAFETY: `odd` points into a live buffer; iovmap refuses it before reading it.
    bad(unsafe { iovmap_map(r.0, odd, 1, 0, &mut out) }, "iov is not aligned");
    assert!(out.is_null());

    let fd = ram.fd().as_raw_fd();
    // SAFETY: a NULL remapper is checked; the other arguments are live.
    bad(unsafe { iovmap_register(ptr::null_mut(), ram.ptr().cast(), ram.len(), fd, 0) }, "the remapper is NULL");
    bad(r.register(ram.ptr(), ram.len(), -1, 0), "fd -1 is negative");
    // An fd number no process can have open (a closed one could be reopened meanwhile by
    // another test's thread).
    bad(r.register(ram.ptr(), ram.len(), c_int::MAX, 0), &format!("fd {} is not open", c_int::MAX));
    // SAFETY: a NULL remapper is checked.
    bad(unsafe { iovmap_unregister(ptr::null_mut(), ram.ptr().cast()) }, "iovmap_unregister: the remapper is NULL");

    let mut stats = IovmapStats::default();
    // SAFETY: a NULL view is checked; `stats` is writable.
    bad(unsafe { iovmap_view_stats(ptr::null(), &mut stats) }, "iovmap_view_stats: the view is NULL");
    let view = r.map(&list, 0).unwrap();
    // SAFETY: a live view; a NULL `out` is checked.
    bad(unsafe { iovmap_view_stats(view.0, ptr::null_mut()) }, "iovmap_view_stats: out is NULL");

    // The accessors and destructors take NULL quietly.
    // SAFETY: NULL is allowed for each.
    unsafe {
        assert!(iovmap_view_ptr(ptr::null()).is_null());
        assert_eq!(iovmap_view_len(ptr::null()), 0);
        iovmap_view_free(ptr::null_mut());
        iovmap_remapper_free(ptr::null_mut());
    }
    assert_eq!(r.map(&list, 0).map(|v| v.len()), Ok(page()), "the remapper still works");
}

#[test]
fn empty_lists_are_refused() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let r = Remapper::new();
    let mut out = ptr::null_mut();
    // SAFETY: iovcnt 0 allows a NULL iov.
    let rc = unsafe { iovmap_map(r.0, ptr::null(), 0, 0, &mut out) };
    assert_error(rc, IOVMAP_E_EMPTY, -1, &["empty"]);
    let rc = r.map(&[ram.iov(0, 0), ram.iov(page(), 0)], 0).err().unwrap();
    assert_error(rc, IOVMAP_E_EMPTY, -1, &["every segment has length 0"]);
}

#[test]
fn private_memory_is_not_shareable() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let anon = Mapping::anon_private(4 * page()).unwrap();
    let (_file, private_file) = kit::file_private(4 * page()).unwrap();
    let r = Remapper::new();
    let rc = r.map(&[ram.iov(0, page()), ram.iov(page(), page()), anon.iov(0, page())], 0).err().unwrap();
    assert_error(rc, IOVMAP_E_NOT_SHAREABLE, 2, &["segment 2 lies in private memory", "memfd"]);
    let rc = r.map(&[private_file.iov(page(), page())], 0).err().unwrap();
    assert_error(rc, IOVMAP_E_NOT_SHAREABLE, 0, &["segment 0"]);
    // Registering it is refused too.
    let rc = r.register(anon.ptr(), anon.len(), ram.fd().as_raw_fd(), 0);
    assert_error(rc, IOVMAP_E_INVALID_REGION, -1, &["private mapping"]);
}

#[test]
fn unmapped_addresses_are_not_mapped() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let list = [ram.iov(0, page()), iov(kit::unmapped_address(), page())];
    let rc = Remapper::new().map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_NOT_MAPPED, 1, &["segment 1 covers an address that is not mapped"]);
}

#[test]
fn an_unaligned_interior_boundary_is_refused() {
    let p = page();
    let ram = GuestRam::new(8 * p).unwrap();
    // Iovec 1 starts mid-page and does not continue iovec 0.
    let list = [ram.iov(0, p), ram.iov(3 * p + 100, p)];
    let rc = Remapper::new().map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_UNALIGNED, 1, &["segment 1 meets its neighbour off a page boundary"]);
    // Iovec 0 ends mid-page before a jump.
    let list = [ram.iov(0, 100), ram.iov(3 * p, p)];
    let rc = Remapper::new().map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_UNALIGNED, 0, &["segment 0 meets"]);
}

#[test]
fn a_list_beyond_the_address_space_is_too_large() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let list = [ram.iov(0, page()), iov(ram.ptr().wrapping_add(page()), usize::MAX - 10)];
    let rc = Remapper::new().map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_TOO_LARGE, -1, &["larger than the address space"]);
}

#[test]
fn a_view_over_vm_max_map_count_is_refused() {
    let max: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap();
    let runs = max + 500;
    let ram = GuestRam::new(2 * runs * page()).unwrap(); // sparse: never touched
    let list: Vec<_> = (0..runs).map(|i| ram.iov(2 * i * page(), page())).collect();
    let rc = Remapper::new().map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_TOO_MANY_MAPPINGS, -1, &[&format!("needs {runs} mappings"), "vm.max_map_count"]);
}

#[test]
fn bad_registrations_are_invalid_regions() {
    let ram = GuestRam::new(8 * page()).unwrap();
    let fd = ram.fd().as_raw_fd();
    let r = Remapper::new();
    assert_eq!(r.register(ram.ptr(), 4 * page(), fd, 0), IOVMAP_OK.raw());
    let overlap = r.register(ram.ptr().wrapping_add(2 * page()), 4 * page(), fd, 2 * page() as u64);
    assert_error(overlap, IOVMAP_E_INVALID_REGION, -1, &["overlaps the region"]);
    let unaligned = r.register(ram.ptr().wrapping_add(4 * page()), 100, fd, 4 * page() as u64);
    assert_error(unaligned, IOVMAP_E_INVALID_REGION, -1, &["not aligned"]);
    let wrong_offset = r.register(ram.ptr().wrapping_add(4 * page()), 4 * page(), fd, 6 * page() as u64);
    assert_error(wrong_offset, IOVMAP_E_INVALID_REGION, -1, &["not at the registered"]);
    // A mapping longer than its file: 2 pages of file, 4 mapped.
    let short = kit::memfd("short", 0).unwrap();
    short.set_len(2 * page() as u64).unwrap();
    let past =
        Mapping::new(4 * page(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(short.as_fd()), 0).unwrap();
    let past_eof = r.register(past.ptr(), 4 * page(), short.as_raw_fd(), 0);
    assert_error(past_eof, IOVMAP_E_INVALID_REGION, -1, &["shorter than offset + len"]);
    let unmapped = r.register(kit::unmapped_address(), page(), fd, 0);
    assert_error(unmapped, IOVMAP_E_INVALID_REGION, -1, &["is not mapped"]);
    let nothing_there = r.unregister(ram.ptr().wrapping_add(page()));
    assert_error(nothing_there, IOVMAP_E_INVALID_REGION, -1, &["no region is registered"]);
    // The failures changed nothing: the next region still fits, and the first is there.
    assert_eq!(r.register(ram.ptr().wrapping_add(4 * page()), 4 * page(), fd, 4 * page() as u64), IOVMAP_OK.raw());
    assert_eq!(r.unregister(ram.ptr()), IOVMAP_OK.raw());
}

#[test]
fn a_writable_view_of_read_only_memory_is_not_writable() {
    let ram = GuestRam::new(4 * page()).unwrap();
    ram.fill(7);
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", ram.fd().as_raw_fd())).unwrap();
    let map = Mapping::new(4 * page(), libc::PROT_READ, libc::MAP_SHARED, Some(ro.as_fd()), 0).unwrap();
    let list = [ram.iov(0, page()), map.iov(2 * page(), page())];
    let r = Remapper::new();
    // The source is read-only: a read-write view would grant more. The message names the
    // C flags, not Rust items.
    let rc = r.map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_NOT_WRITABLE, 1, &["segment 1", "read-only", "IOVMAP_MAP_READ_ONLY"]);
    assert_error(rc, IOVMAP_E_NOT_WRITABLE, 1, &["IOVMAP_MAP_RAISE_SOURCE_PROTECTION"]);
    // Asked to raise it, the backing refuses: the fd is read-only.
    let rc = r.map(&list, IOVMAP_MAP_RAISE_SOURCE_PROTECTION).err().unwrap();
    assert_error(rc, IOVMAP_E_NOT_WRITABLE, 1, &["segment 1", "cannot be written", "IOVMAP_MAP_READ_ONLY"]);
    let view = r.map(&list, IOVMAP_MAP_READ_ONLY).unwrap();
    view.assert_matches(&list);
}

/// The kernel-built calls on what every kernel can check (NULLs, indices, reasons), and on
/// this one: with /dev/udmabuf, the dma-bufs themselves; without it, automatic placement's
/// fallback and the kernel-built error.
#[test]
fn kernel_built_views_and_dmabufs() {
    let ram = GuestRam::sealed(64 * page()).unwrap();
    ram.fill(4);
    let r = Remapper::new();
    assert_eq!(r.register(ram.ptr(), ram.len(), ram.fd().as_raw_fd(), 0), IOVMAP_OK.raw());
    let list: Vec<libc::iovec> = (0..16).map(|i| ram.iov(2 * i * page(), page())).collect();
    let mut out = IovmapDmabuf::default();
    let mut kb = IovmapKernelBuilt { runs: 9, dmabufs: 9, declined: IOVMAP_DECLINED_REFUSED, declined_errno: 9 };
    // NULLs and bad indices are argument errors.
    // SAFETY: for this and each call below, every pointer is NULL or live and writable.
    unsafe {
        assert_eq!(iovmap_view_dmabuf_count(ptr::null()), 0);
        assert_eq!(iovmap_view_dmabuf(ptr::null(), 0, &mut out), IOVMAP_E_INVALID_ARGUMENT.raw());
        assert_eq!(iovmap_view_kernel_built(ptr::null(), &mut kb), IOVMAP_E_INVALID_ARGUMENT.raw());
        assert_eq!(iovmap_dmabufs_count(ptr::null()), 0);
        assert_eq!(iovmap_dmabufs_take(ptr::null_mut(), 0), IOVMAP_E_INVALID_ARGUMENT.raw());
        iovmap_dmabufs_free(ptr::null_mut());
    }
    let view = r.map(&list, 0).unwrap();
    // SAFETY: a live view; `kb` writable.
    assert_eq!(unsafe { iovmap_view_kernel_built(view.0, &mut kb) }, IOVMAP_OK.raw());
    let mut l = ptr::null_mut();
    // SAFETY: live remapper and list; `l` writable.
    let rc = unsafe { iovmap_dmabufs_new(r.0, list.as_ptr(), list.len() as c_int, &mut l) };
    match kit::udmabuf() {
        Err(why) => {
            eprintln!("no udmabuf ({why}): automatic falls back, kernel-built says why");
            assert_eq!(
                kb,
                IovmapKernelBuilt {
                    runs: 0,
                    dmabufs: 0,
                    declined: IOVMAP_DECLINED_NO_DEVICE,
                    declined_errno: libc::ENOENT
                }
            );
            // SAFETY: a live view.
            assert_eq!(unsafe { iovmap_view_dmabuf_count(view.0) }, 0);
            let rc = r.map(&list, IOVMAP_MAP_KERNEL_BUILT).err().unwrap();
            assert_error(rc, IOVMAP_E_KERNEL_BUILT, 0, &["/dev/udmabuf does not exist"]);
            assert_error(rc_of(l, rc), IOVMAP_E_KERNEL_BUILT, 0, &["udmabuf"]);
        }
        Ok(()) => {
            assert_eq!(rc, IOVMAP_OK.raw(), "{}", last_message());
            assert_eq!((kb.runs, kb.dmabufs, kb.declined), (16, 1, IOVMAP_DECLINED_NONE));
            // SAFETY: a live view and list; `out` writable.
            unsafe {
                assert_eq!(iovmap_view_dmabuf_count(view.0), 1);
                assert_eq!(iovmap_view_dmabuf(view.0, 0, &mut out), IOVMAP_OK.raw());
                assert_eq!((out.offset, out.len), (0, 16 * page() as u64));
                assert!(out.fd >= 0);
                assert_eq!(iovmap_view_dmabuf(view.0, 1, &mut out), IOVMAP_E_INVALID_ARGUMENT.raw());
                assert_eq!(
                    (iovmap_dmabufs_count(l), iovmap_dmabufs_lead(l), iovmap_dmabufs_len(l)),
                    (1, 0, 16 * page())
                );
                assert_eq!(iovmap_dmabufs_get(l, 0, &mut out), IOVMAP_OK.raw());
                let fds = kit::count_fds();
                let fd = iovmap_dmabufs_take(l, 0);
                assert_eq!(fd, out.fd, "the taken fd is the one listed");
                assert_eq!(iovmap_dmabufs_take(l, 0), IOVMAP_E_INVALID_ARGUMENT.raw(), "taken once");
                assert_eq!(iovmap_dmabufs_get(l, 0, &mut out), IOVMAP_OK.raw());
                assert_eq!(out.fd, -1);
                iovmap_dmabufs_free(l);
                assert_eq!(kit::count_fds(), fds, "free closes none the caller took");
                libc::close(fd);
            }
        }
    }
}

/// The return code `iovmap_dmabufs_new` gave, with the list it must have left NULL.
fn rc_of(l: *mut IovmapDmabufs, rc: c_int) -> c_int {
    assert!(l.is_null(), "no list after a failure");
    rc
}

#[test]
fn a_sealed_mapping_needs_its_fd_registered() {
    // A sealed mapping can never be unmapped: the fixture lives as long as the process.
    let ram = std::mem::ManuallyDrop::new(GuestRam::new(2 * page()).unwrap());
    if let Err(e) = kit::mseal(ram.ptr(), ram.len()) {
        skip!("{e}");
    }
    let list = [ram.iov(0, page())];
    let r = Remapper::new();
    match r.map(&list, 0) {
        Err(rc) => assert_error(rc, IOVMAP_E_NO_FALLBACK, 0, &["sealed with mseal", "iovmap_register"]),
        // Kernels 6.10-6.16 may clone a sealed mapping: then there is nothing to refuse.
        Ok(view) => eprintln!("this kernel clones sealed mappings: {:?}", view.stats()),
    }
    assert_eq!(r.register(ram.ptr(), ram.len(), ram.fd().as_raw_fd(), 0), IOVMAP_OK.raw());
    r.map(&list, 0).unwrap().assert_matches(&list);
}

#[test]
fn a_registration_must_describe_the_memory_it_names() {
    let ram = GuestRam::new(8 * page()).unwrap();
    let other = GuestRam::new(8 * page()).unwrap();
    let (pipe, _w) = kit::pipe().unwrap();
    let r = Remapper::new();
    let rc = r.register(ram.ptr(), 4 * page(), pipe.as_raw_fd(), 0);
    assert_error(rc, IOVMAP_E_INVALID_REGION, -1, &["is not the fd's file", "pass the fd the range was mapped from"]);
    let rc = r.register(ram.ptr(), 4 * page(), other.fd().as_raw_fd(), 0);
    assert_error(rc, IOVMAP_E_INVALID_REGION, -1, &["is not the fd's file"]);
    let rc = r.register(ram.ptr(), 4 * page(), ram.fd().as_raw_fd(), page() as u64);
    assert_error(rc, IOVMAP_E_INVALID_REGION, -1, &["at offset 0x0, not at the registered"]);
    // Registered right, then replaced under the registration (the memory re-mapped
    // from another file without iovmap_unregister): the map refuses the stale segment.
    assert_eq!(r.register(ram.ptr(), 4 * page(), ram.fd().as_raw_fd(), 0), IOVMAP_OK.raw());
    let list = [ram.iov(0, page()), ram.iov(2 * page(), page())];
    drop(r.map(&list, 0).unwrap());
    // SAFETY: replaces pages 2-3 of our own fixture with a mapping of the other memfd.
    let p = unsafe {
        libc::mmap(
            ram.ptr().add(2 * page()).cast(),
            2 * page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            other.fd().as_raw_fd(),
            0,
        )
    };
    assert_eq!(p, ram.ptr().wrapping_add(2 * page()).cast());
    let rc = r.map(&list, 0).err().unwrap();
    assert_error(rc, IOVMAP_E_INVALID_REGION, 1, &["segment 1", "is not the file registered there", "unregister"]);
    assert_eq!(r.unregister(ram.ptr()), IOVMAP_OK.raw());
}

#[test]
fn other_kernel_failures_are_os_errors() {
    use iovmap_core::fault::{Faults, Operation};
    let ram = GuestRam::new(8 * page()).unwrap();
    let list = [ram.iov(0, page()), ram.iov(4 * page(), page())];
    let r = Remapper::new();
    // The second clone fails with EIO (injected: the kernel has no reason to).
    let faults = Faults::new().fail(Operation::Clone, 1, libc::EIO);
    let rc = r.map(&list, 0).err().unwrap();
    assert!(faults.fired());
    drop(faults);
    assert_error(rc, IOVMAP_E_OS, 1, &["mremap failed for segment 1", "Input/output error"]);
    // The reservation failing names no segment.
    let faults = Faults::new().fail(Operation::Reserve, 0, libc::EAGAIN);
    let rc = r.map(&list, 0).err().unwrap();
    drop(faults);
    assert_error(rc, IOVMAP_E_OS, -1, &["reservation"]);
}

#[test]
fn errors_are_per_thread() {
    let r = Remapper::new();
    // SAFETY: a live remapper; iovcnt 0 with a NULL iov.
    let rc = unsafe { iovmap_map(r.0, ptr::null(), 0, 0, &mut ptr::null_mut()) };
    assert_eq!(rc, IOVMAP_E_EMPTY.raw());
    let here = iovmap_last_error_message();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(last_message(), "", "a new thread has no error");
            assert_eq!(iovmap_last_error_index(), -1);
            let ram = GuestRam::new(page()).unwrap();
            let anon = Mapping::anon_private(page()).unwrap();
            let rc = r.map(&[ram.iov(0, page()), anon.iov(0, page())], 0).err().unwrap();
            assert_error(rc, IOVMAP_E_NOT_SHAREABLE, 1, &[]);
        });
    });
    assert_eq!(iovmap_last_error_message(), here, "the pointer stays valid: this thread made no call since");
    assert_error(rc, IOVMAP_E_EMPTY, -1, &["empty"]);
}

#[test]
fn one_remapper_maps_from_many_threads() {
    let p = page();
    let ram = GuestRam::new(64 * p).unwrap();
    ram.fill(8);
    let r = Remapper::new();
    assert_eq!(r.register(ram.ptr(), ram.len(), ram.fd().as_raw_fd(), 0), IOVMAP_OK.raw());
    std::thread::scope(|s| {
        for t in 0..4 {
            let (r, ram) = (&r, &ram);
            s.spawn(move || {
                for i in 0..50 {
                    let a = (t * 7 + i * 3) % 60;
                    let b = (a + 17) % 60;
                    let list = [ram.iov(a * p, 2 * p), ram.iov(b * p, p)];
                    let view = r.map(&list, if i % 2 == 0 { 0 } else { IOVMAP_MAP_READ_ONLY }).unwrap();
                    view.assert_matches(&list);
                }
            });
        }
    });
}

#[test]
fn views_outlive_their_remapper() {
    let ram = GuestRam::new(4 * page()).unwrap();
    ram.fill(9);
    let list = [ram.iov(2 * page(), page()), ram.iov(0, page())];
    let r = Remapper::new();
    let view = r.map(&list, 0).unwrap();
    drop(r);
    view.assert_matches(&list);
    view.write(5, 0x77);
    assert_eq!(ram.read(2 * page() + 5), 0x77);
}

#[test]
fn view_pointer_and_length_describe_the_view() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let list = [ram.iov(page() + 8, 24)];
    let view = Remapper::new().map(&list, 0).unwrap();
    assert_eq!(view.len(), 24);
    assert_ne!(view.ptr(), ram.ptr().wrapping_add(page() + 8), "a view is a new mapping, not the source");
    assert_eq!(view.ptr() as usize % page(), 8);
    let p: *mut c_void = view.ptr().cast();
    assert!(!p.is_null());
}

#[test]
fn userfaultfd_registrations_guard_every_view() {
    use iovmap_testkit::monitor::{self, Mode, Monitor, Watchdog};
    let _watchdog = Watchdog::new(60, "the C API's userfaultfd guard");
    let uffd = match monitor::open(Mode::Missing, 0) {
        Ok(u) => u,
        Err(why) => skip!("{why}"),
    };
    let ram = GuestRam::new(16 * page()).unwrap();
    // Argument errors first: nothing is registered.
    let (base, len) = (ram.ptr().cast::<c_void>(), ram.len());
    // SAFETY: `base` is only registered, never dereferenced, by these calls.
    unsafe {
        assert_error(
            iovmap_uffd_register(uffd.as_raw_fd(), base, len, 0, ptr::null_mut()),
            IOVMAP_E_INVALID_ARGUMENT,
            -1,
            &["IOVMAP_UFFD_MISSING"],
        );
        assert_error(
            iovmap_uffd_register(uffd.as_raw_fd(), base, len, 8, ptr::null_mut()),
            IOVMAP_E_INVALID_ARGUMENT,
            -1,
            &["modes 0x8"],
        );
        assert_error(
            iovmap_uffd_register(-1, base, len, IOVMAP_UFFD_MISSING, ptr::null_mut()),
            IOVMAP_E_INVALID_ARGUMENT,
            -1,
            &["negative"],
        );
        // The kernel's refusal (an unaligned range) is an OS error with its errno.
        assert_error(
            iovmap_uffd_register(uffd.as_raw_fd(), base.add(1), len - page(), IOVMAP_UFFD_MISSING, ptr::null_mut()),
            IOVMAP_E_OS,
            -1,
            &["UFFDIO_REGISTER", "Invalid argument"],
        );
    }
    assert_error(iovmap_uffd_declare_armed(base, 0, IOVMAP_UFFD_WP), IOVMAP_E_INVALID_ARGUMENT, -1, &["empty"]);
    assert_error(
        iovmap_uffd_declare_disarmed(usize::MAX as *const c_void, 2),
        IOVMAP_E_INVALID_ARGUMENT,
        -1,
        &["wraps"],
    );
    // MISSING through the C API: the view shows the monitor's page 9, placed first.
    let mut ioctls = 0u64;
    // SAFETY: a live userfaultfd and a writable u64.
    let rc = unsafe { iovmap_uffd_register(uffd.as_raw_fd(), base, len, IOVMAP_UFFD_MISSING, &mut ioctls) };
    assert_eq!(rc, IOVMAP_OK.raw(), "{}", last_message());
    assert_ne!(ioctls & (1 << 3), 0, "UFFDIO_COPY is allowed on the range: {ioctls:#x}");
    let monitor = Monitor::start(uffd, Mode::Missing, ram.ptr() as usize, len, page(), ram.fd());
    let r = Remapper::new();
    let view = r.map(&[iov(ram.ptr().wrapping_add(9 * page()), page())], IOVMAP_MAP_READ_ONLY).unwrap();
    assert_eq!(view.read(17), kit::pattern(Monitor::SEED, 9 * page() + 17));
    assert_eq!(monitor.log().faults, [9 * page()]);
    // The guard alone, for memory a VMM pins itself (QEMU's own udmabuf): pages 11-12.
    let list = [iov(ram.ptr().wrapping_add(11 * page()), 2 * page())];
    let mut resolved = 0u64;
    // SAFETY: one readable iovec and a writable u64.
    let rc = unsafe { iovmap_uffd_resolve(list.as_ptr(), 1, IOVMAP_MAP_READ_ONLY, &mut resolved) };
    assert_eq!((rc, resolved), (IOVMAP_OK.raw(), 2 * page() as u64), "{}", last_message());
    assert_eq!(monitor.log().faults, [9 * page(), 11 * page(), 12 * page()]);
    assert_eq!(ram.read(12 * page() + 3), kit::pattern(Monitor::SEED, 12 * page() + 3));
    // SAFETY: as above; NULL lists and unknown flags are argument errors.
    unsafe {
        assert_error(iovmap_uffd_resolve(ptr::null(), 1, 0, ptr::null_mut()), IOVMAP_E_INVALID_ARGUMENT, -1, &["NULL"]);
        assert_error(
            iovmap_uffd_resolve(list.as_ptr(), 1, IOVMAP_MAP_POPULATE, ptr::null_mut()),
            IOVMAP_E_INVALID_ARGUMENT,
            -1,
            &["flags"],
        );
    }
    assert!(monitor.place_the_rest().is_empty(), "EEXIST after the view");
    // SAFETY: the monitor's live userfaultfd.
    assert_eq!(unsafe { iovmap_uffd_unregister(monitor.fd().as_raw_fd(), base, len) }, IOVMAP_OK.raw());
    // WP, declared as a VMM that registers by itself does: read-write refused, read-only made.
    assert_eq!(iovmap_uffd_declare_armed(base, len, IOVMAP_UFFD_WP), IOVMAP_OK.raw());
    let other = GuestRam::new(page()).unwrap();
    let list = [other.iov(0, page()), iov(ram.ptr().wrapping_add(2 * page()), page())];
    let rc = r.map(&list, 0).map(drop).unwrap_err();
    assert_error(rc, IOVMAP_E_WRITE_PROTECTED, 1, &["segment 1", "IOVMAP_MAP_READ_ONLY", "iovmap_uffd_unregister"]);
    // SAFETY: the static string of a code.
    let name = unsafe { CStr::from_ptr(iovmap_strerror(rc)) }.to_str().unwrap();
    assert!(name.starts_with("IOVMAP_E_WRITE_PROTECTED"), "{name}");
    assert!(r.map(&list, IOVMAP_MAP_READ_ONLY).is_ok(), "{}", last_message());
    // SAFETY: two readable iovecs; NULL out.
    let rc = unsafe { iovmap_uffd_resolve(list.as_ptr(), 2, 0, ptr::null_mut()) };
    assert_error(rc, IOVMAP_E_WRITE_PROTECTED, 1, &["segment 1"]);
    // SAFETY: as above.
    assert_eq!(
        unsafe { iovmap_uffd_resolve(list.as_ptr(), 2, IOVMAP_MAP_READ_ONLY, ptr::null_mut()) },
        IOVMAP_OK.raw()
    );
    assert_eq!(iovmap_uffd_declare_disarmed(base, len), IOVMAP_OK.raw());
    assert!(r.map(&list, 0).is_ok(), "read-write once disarmed: {}", last_message());
}

#[test]
fn a_vfio_region_mmap_registers_and_its_runs_are_exported_or_refused() {
    let array = match iovmap_testkit::BpfArray::new(8) {
        Ok(a) => a,
        Err(e) => skip!("{e}"),
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let area = Mapping::new(4 * page(), rw, libc::MAP_SHARED, Some(array.fd()), 2 * page() as u64).unwrap();
    let r = Remapper::new();
    let (fd, addr) = (array.fd().as_raw_fd(), area.ptr().cast::<c_void>());
    // SAFETY: a live remapper only this thread uses; `addr` is only looked up.
    unsafe {
        assert_error(
            iovmap_register_vfio(r.0, addr, area.len(), -1, 2, 0, 0),
            IOVMAP_E_INVALID_ARGUMENT,
            -1,
            &["negative"],
        );
        assert_eq!(
            iovmap_register_vfio(r.0, addr, area.len(), fd, 2, 0, 2 * page() as u64),
            IOVMAP_OK.raw(),
            "{}",
            last_message()
        );
    }
    let view = r.map(&[area.iov(page(), page())], 0).unwrap();
    assert_eq!(view.stats().3, 1, "fd-mapped from the device fd");
    drop(view);
    // The export goes to the (stand-in) device: refused, ENOTTY, as before Linux 6.19.
    let list = [area.iov(0, page())];
    let mut out = ptr::null_mut();
    // SAFETY: a live remapper, one readable iovec, a writable out pointer.
    let rc = unsafe { iovmap_dmabufs_new(r.0, list.as_ptr(), 1, &mut out) };
    assert_error(rc, IOVMAP_E_KERNEL_BUILT, 0, &["VFIO_DEVICE_FEATURE_DMA_BUF"]);
    assert!(out.is_null());
    // SAFETY: as above.
    assert_eq!(unsafe { iovmap_unregister(r.0, addr) }, IOVMAP_OK.raw());
    // Who made a dma-buf: a BPF map is none, and the arguments are checked.
    let mut name = [0 as std::ffi::c_char; 32];
    // SAFETY: `name` has 32 writable bytes.
    unsafe {
        assert_error(iovmap_dmabuf_exporter(fd, name.as_mut_ptr(), name.len()), IOVMAP_E_OS, -1, &["not a dma-buf"]);
        assert_error(iovmap_dmabuf_exporter(fd, ptr::null_mut(), 8), IOVMAP_E_INVALID_ARGUMENT, -1, &["NULL"]);
    }
}
