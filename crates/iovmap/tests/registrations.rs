//! A registration is never used for memory it does not describe, and memory the kernel
//! will not clone for a reason of its own (mseal) is served by its registered fd.
//!
//! A VMM may replace the memory under a registration without unregistering it: memory
//! hot-unplug then hot-plug at the same host address, a RAMBlock remapped. The registered
//! fd would then show the old file while the address shows another: every map checks the
//! VMAs against what registration saw and refuses (`StaleRegion`).

use std::os::fd::AsRawFd;

use iovmap::{Error, MapOptions, Remapper};
use iovmap_testkit::{self as kit, GuestRam, Mapping, skip};

fn page() -> usize {
    kit::page()
}

/// Maps `len` bytes of `fd` from `offset` over `at` (MAP_FIXED), as a VMM re-plugging
/// memory at the same address would.
///
/// # Safety
/// `[at, at + len)` must be a mapping of the test's own that nothing else uses.
unsafe fn replace(at: *mut u8, len: usize, fd: Option<i32>, offset: i64) {
    let (flags, fd) = match fd {
        Some(fd) => (libc::MAP_SHARED | libc::MAP_FIXED, fd),
        None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1),
    };
    // SAFETY: forwarded to the caller's contract.
    let p = unsafe { libc::mmap(at.cast(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset) };
    assert_eq!(p, at.cast(), "MAP_FIXED over our own fixture: {}", std::io::Error::last_os_error());
}

/// The three ways memory under a registration gets replaced, on RAM of `page_size`
/// pages: another file of the same kind, the same file at another offset, shared
/// anonymous memory. Each is refused, naming the segment and the registration.
fn each_replacement_is_refused(make: impl Fn() -> GuestRam, what: &str) {
    let ps = make().page_size();
    for replacement in ["another file", "the same file at another offset", "shared anonymous memory"] {
        let ram = make();
        let other = make();
        ram.fill(1);
        let mut r = Remapper::new();
        let id = r.register(ram.ptr(), ps, ram.fd(), 0).unwrap();
        let list = [ram.iov(0, ps)];
        let before = r.map(&list).unwrap();
        assert_eq!(before.stats().runs, 1, "{what}");
        // SAFETY: the first page of our own fixture, which nothing else uses.
        unsafe {
            match replacement {
                "another file" => replace(ram.ptr(), ps, Some(other.fd().as_raw_fd()), 0),
                "the same file at another offset" => replace(ram.ptr(), ps, Some(ram.fd().as_raw_fd()), ps as i64),
                _ => replace(ram.ptr(), ps, None, 0),
            }
        }
        let e = r.map(&list).unwrap_err();
        assert!(
            matches!(e, Error::StaleRegion { index: 0, at, region } if at == ram.ptr() as usize && region == id),
            "{what}, {replacement}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("segment 0") && text.contains("unregister"), "{text}");
        // The view built before still shows the old memory; unregistering and registering
        // the new mapping makes the list mappable again (where the kernel allows).
        r.unregister(id).unwrap();
        drop(before);
    }
}

#[test]
fn memory_replaced_under_a_memfd_registration_is_refused() {
    each_replacement_is_refused(|| GuestRam::new(4 * page()).unwrap(), "memfd");
}

#[test]
fn memory_replaced_under_a_hugetlb_registration_is_refused() {
    if let Err(e) = GuestRam::huge(6 * kit::HUGE_2M) {
        skip!("{e}");
    }
    each_replacement_is_refused(|| GuestRam::huge(2 * kit::HUGE_2M).unwrap(), "hugetlbfs");
}

#[test]
fn a_registration_whose_memory_is_re_registered_maps_the_new_file() {
    let ram = GuestRam::new(4 * page()).unwrap();
    let other = GuestRam::new(4 * page()).unwrap();
    other.fill(9);
    let mut r = Remapper::new();
    let id = r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    // What a VMM must do: unregister, replace, register the new mapping.
    r.unregister(id).unwrap();
    // SAFETY: our own fixture, unused elsewhere.
    unsafe { replace(ram.ptr(), ram.len(), Some(other.fd().as_raw_fd()), 0) };
    r.register(ram.ptr(), ram.len(), other.fd(), 0).unwrap();
    let view = r.map(&[ram.iov(page(), page())]).unwrap();
    // SAFETY: a live view of one page.
    assert_eq!(unsafe { view.as_ptr().add(5).read_volatile() }, kit::pattern(9, page() + 5));
}

/// Whether this kernel clones a sealed mapping (6.18 refuses with EPERM; kernels between
/// 6.10 and 6.16 are measured by the guest matrix).
fn kernel_clones_sealed(src: *const u8, len: usize) -> Result<(), i32> {
    // SAFETY: without MREMAP_FIXED the kernel chooses a free destination and old_size 0
    // leaves the source alone; the clone, if made, is unmapped at once.
    let p = unsafe { libc::mremap(src as *mut libc::c_void, 0, len, libc::MREMAP_MAYMOVE) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: the clone just made, ours alone.
    unsafe { libc::munmap(p, len) };
    Ok(())
}

#[test]
fn a_sealed_mapping_is_served_by_its_registered_fd() {
    // Sealed mappings can never be unmapped: these fixtures live as long as the process.
    let ram = std::mem::ManuallyDrop::new(GuestRam::new(4 * page()).unwrap());
    ram.fill(3);
    if let Err(e) = kit::mseal(ram.ptr(), ram.len()) {
        skip!("{e}");
    }
    let list = [ram.iov(page(), 2 * page())];
    let clones = kernel_clones_sealed(ram.ptr(), page());
    eprintln!("this kernel's clone of a sealed mapping: {clones:?} (Err: errno)");
    match clones {
        Err(errno) => {
            assert_eq!(errno, libc::EPERM, "a sealed mapping refuses the clone with EPERM");
            // Unregistered: nothing else can place it, and the error says why.
            let e = iovmap::map(&list).unwrap_err();
            assert!(matches!(e, Error::Sealed { index: 0 }), "{e:?}");
            assert!(e.to_string().contains("mseal") && e.to_string().contains("register"), "{e}");
        }
        Ok(()) => {
            let view = iovmap::map(&list).unwrap();
            assert_eq!((view.stats().cloned, view.stats().fd_mapped), (1, 0));
        }
    }
    // Registered: the file is mapped instead (mapping a file does not touch the seal),
    // and a refusal is remembered: the next view is one mmap.
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    for attempt in ["first", "second"] {
        let view = r.map_with(&list, MapOptions::new().populate()).unwrap();
        let s = view.stats();
        let want = match (clones, attempt) {
            // Cloned: a hole kernel learnt at registration that it clones, others try.
            (Ok(()), _) => (1, 1, 0, 1),
            // A hole kernel learnt the refusal at registration; others at the first clone.
            (Err(_), "first") if !iovmap::kernel_punches_holes() => (1, 0, 1, 2),
            (Err(_), _) => (1, 0, 1, 1),
        };
        assert_eq!((s.runs, s.cloned, s.fd_mapped, s.syscalls), want, "{attempt}");
        for off in [0, page(), 2 * page() - 1] {
            // SAFETY: in the live two-page view.
            let got = unsafe { view.as_ptr().add(off).read_volatile() };
            assert_eq!(got, kit::pattern(3, page() + off), "{attempt}, byte {off}");
        }
        // Writes through the view reach the sealed mapping's memory.
        // SAFETY: a read-write view, in bounds.
        unsafe { view.as_mut_ptr().unwrap().add(7).write_volatile(0x5a) };
        assert_eq!(ram.read(page() + 7), 0x5a);
    }
}

#[test]
fn a_sealed_read_only_mapping_is_still_not_granted_writes() {
    let ram = std::mem::ManuallyDrop::new(GuestRam::new(2 * page()).unwrap());
    let ro = std::mem::ManuallyDrop::new(
        Mapping::new(2 * page(), libc::PROT_READ, libc::MAP_SHARED, Some(ram.fd()), 0).unwrap(),
    );
    if let Err(e) = kit::mseal(ro.ptr(), ro.len()) {
        skip!("{e}");
    }
    let mut r = Remapper::new();
    r.register(ro.ptr(), ro.len(), ram.fd(), 0).unwrap();
    let e = r.map(&[ro.iov(0, page())]).unwrap_err();
    assert!(matches!(e, Error::ExceedsSource { index: 0, .. }), "{e:?}");
    let view = r.map_with(&[ro.iov(0, page())], MapOptions::new().read_only()).unwrap();
    assert_eq!(view.stats().fd_mapped, 1);
}
