//! vfio region registration end to end, through the same code path `register_vfio_region`
//! uses (`register_vfio_region_info`), on device-like memory this host has: a perf_event
//! ring (VM_PFNMAP, like a BAR) as a whole region, and a BPF mmapable array
//! (VM_DONTEXPAND, mappable at any offset) as a sparse BAR with an MSI-X-like hole and a
//! non-zero region offset. A real vfio-pci device is tested in the guest VM
//! (crates/iovmap-vmtest).

use std::os::fd::AsFd;

use iovmap::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VfioRegionInfo,
};
use iovmap::{Error, KernelBuiltError, Remapper};
use iovmap_testkit::{self as kit, BpfArray, GuestRam, Mapping, PerfRing, skip};

const MMAP_RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;

fn page() -> usize {
    kit::page()
}

#[test]
fn a_pfnmap_region_registered_as_a_vfio_bar_falls_back_to_the_fd() {
    let ring = match PerfRing::new(4) {
        Ok(r) => r,
        Err(e) => skip!("{e}"),
    };
    let ram = GuestRam::new(4 * page()).unwrap();
    ram.fill(2);
    let info = VfioRegionInfo { index: 2, flags: MMAP_RW, size: ring.map.len() as u64, offset: 0, sparse_areas: None };
    let mut r = Remapper::new();
    let id = r.register_vfio_region_info(ring.fd(), &info, ring.map.ptr()).unwrap();
    let list = [ram.iov(0, page()), ring.map.iov(0, ring.map.len()), ram.iov(3 * page(), page())];
    let view = r.map(&list).unwrap();
    let s = view.stats();
    // Two clones and one fd map, plus: a refused clone on kernels that keep the
    // destination, or a clone probe of the RAM on kernels that punch holes (where the
    // ring learned its refusal at registration).
    assert_eq!((s.runs, s.cloned, s.fd_mapped, s.syscalls), (3, 2, 1, 4));
    // SAFETY: page 0 of the ring is writable; the view is live.
    unsafe {
        view.as_mut_ptr().unwrap().add(page() + 800).write_volatile(0x3c);
        assert_eq!(ring.map.ptr().add(800).read_volatile(), 0x3c);
    }
    drop(view);
    r.unregister(id).unwrap();
    assert_eq!(r.regions().count(), 0);
}

#[test]
fn a_sparse_bar_registers_its_areas_and_refuses_its_hole() {
    let arr = match BpfArray::new(20) {
        Ok(a) => a,
        Err(e) => skip!("{e}"),
    };
    // SAFETY: the array mapping is writable and only this test uses it.
    unsafe { kit::fill(arr.map.ptr(), arr.map.len(), 3, 0) };
    let p = page();
    // The "BAR" is the array from fd offset 4 pages on, 16 pages long, mapped by the VMM
    // at `bar` (the whole BAR here: the hole is mapped but must not be used).
    let bar = Mapping::new(16 * p, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(arr.fd()), 4 * p as u64)
        .unwrap();
    let info = VfioRegionInfo {
        index: 0,
        flags: MMAP_RW,
        size: 16 * p as u64,
        offset: 4 * p as u64,
        sparse_areas: Some(vec![(0, 4 * p as u64), (8 * p as u64, 8 * p as u64)]), // hole: pages 4..8
    };
    let mut r = Remapper::new();
    let id = r.register_vfio_region_info(arr.fd(), &info, bar.ptr()).unwrap();
    let areas: Vec<_> = r.regions().map(|g| (g.addr as usize - bar.ptr() as usize, g.len, g.offset)).collect();
    assert_eq!(areas, [(0, 4 * p, 4 * p as u64), (8 * p, 8 * p, 12 * p as u64)]);

    let list = [bar.iov(10 * p, 2 * p), bar.iov(p, p)];
    let view = r.map(&list).unwrap();
    assert_eq!((view.stats().runs, view.stats().fd_mapped), (2, 2));
    for (at, array_offset) in [(0, 14 * p), (2 * p, 5 * p)] {
        // SAFETY: both ranges are live for a page.
        let diff = unsafe { kit::first_difference(view.as_ptr().add(at), arr.map.ptr().add(array_offset), p) };
        assert_eq!(diff, None, "view offset {at:#x} should show array offset {array_offset:#x}");
    }

    // A segment in the hole (an MSI-X table, say) is refused, naming it.
    let e = r.map(&[bar.iov(0, p), bar.iov(5 * p, p)]).unwrap_err();
    assert!(matches!(e, Error::DeviceHole { index: 1 }), "{e:?}");
    assert!(e.to_string().contains("MSI-X"), "{e}");
    // So is one that only touches it.
    let e = r.map(&[bar.iov(3 * p, 2 * p)]).unwrap_err();
    assert!(matches!(e, Error::DeviceHole { index: 0 }), "{e:?}");

    // Nothing can be registered over the hole, and unregistering the BAR removes it all.
    let other = GuestRam::new(p).unwrap();
    let e = r.register_vfio_region_info(other.fd(), &VfioRegionInfo { size: p as u64, ..info.clone() }, bar.ptr());
    assert!(matches!(e, Err(Error::InvalidRegion { .. })));
    r.unregister(id).unwrap();
    assert_eq!(r.regions().count(), 0);
    assert!(r.map(&[bar.iov(5 * p, p)]).is_err(), "the hole is gone, the BPF mapping refuses the clone");
}

#[test]
fn a_region_without_the_mmap_flag_or_with_an_unmapped_area_registers_nothing() {
    let ram = GuestRam::new(8 * page()).unwrap();
    let mut r = Remapper::new();
    let info = VfioRegionInfo {
        index: 0,
        flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
        size: 8 * page() as u64,
        offset: 0,
        sparse_areas: None,
    };
    let e = r.register_vfio_region_info(ram.fd(), &info, ram.ptr()).unwrap_err();
    assert!(e.to_string().contains("VFIO_REGION_INFO_FLAG_MMAP"), "{e}");
    // The second area lies past the end of the 8-page memfd: the first area is valid, but
    // nothing may stay registered.
    let info = VfioRegionInfo {
        flags: MMAP_RW,
        size: 16 * page() as u64,
        sparse_areas: Some(vec![(0, 4 * page() as u64), (12 * page() as u64, 4 * page() as u64)]),
        ..info
    };
    let e = r.register_vfio_region_info(ram.fd(), &info, ram.ptr()).unwrap_err();
    assert!(matches!(e, Error::InvalidRegion { .. }), "{e:?}");
    assert!(e.to_string().contains("vfio region 0"), "{e}");
    assert_eq!(r.regions().count(), 0);
    // A plain register of the first area still works: the table was left clean.
    r.register(ram.ptr(), 4 * page(), ram.fd().as_fd(), 0).unwrap();
}

#[test]
fn dma_bufs_of_bar_runs_are_vfio_pci_exports() {
    let ring = match PerfRing::new(4) {
        Ok(r) => r,
        Err(e) => skip!("{e}"),
    };
    let info = VfioRegionInfo { index: 2, flags: MMAP_RW, size: ring.map.len() as u64, offset: 0, sparse_areas: None };
    let mut r = Remapper::new();
    r.register_vfio_region_info(ring.fd(), &info, ring.map.ptr()).unwrap();
    // A perf event fd has no VFIO_DEVICE_FEATURE: the export is refused (ENOTTY), naming
    // the first BAR segment, as on a kernel before 6.19 (the guests of the kernel matrix
    // export a real BAR: crates/iovmap-vmtest).
    let ram = GuestRam::new(2 * page()).unwrap();
    let list = [ring.map.iov(0, page()), ring.map.iov(2 * page(), page())];
    let e = r.dmabufs(&list).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KernelBuilt { index: 0, reason: KernelBuiltError::BarExportRefused { errno: libc::ENOTTY } }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("VFIO_DEVICE_FEATURE_DMA_BUF"), "{e}");
    // Memory that is neither a registered memfd nor a vfio region names its segment.
    let e = r.dmabufs(&[list[0], ram.iov(0, page())]).unwrap_err();
    assert!(matches!(e, Error::KernelBuilt { index: 1, reason: KernelBuiltError::NotRegistered }), "{e:?}");
    // A perf ring registered plainly is device memory but no vfio region: not exportable.
    let mut plain = Remapper::new();
    plain.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
    let e = plain.dmabufs(&list).unwrap_err();
    assert!(matches!(e, Error::KernelBuilt { index: 0, reason: KernelBuiltError::NotMemfd }), "{e:?}");
}

#[test]
fn one_mmap_of_a_region_registers_with_its_index_and_offsets() {
    // QEMU mmaps each area of a vfio region on its own: a BPF array (mappable at any
    // offset, refuses the clone) stands in for region 2's device fd, mapped from two
    // pages into the region, which starts at offset 0 of the fd.
    let array = match BpfArray::new(8) {
        Ok(a) => a,
        Err(e) => skip!("{e}"),
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let area = Mapping::new(4 * page(), rw, libc::MAP_SHARED, Some(array.fd()), 2 * page() as u64).unwrap();
    // SAFETY: the array's mapping, in bounds; the area maps its pages 2-5.
    unsafe { array.map.ptr().add(3 * page() + 7).write_volatile(0x5a) };
    let ram = GuestRam::new(2 * page()).unwrap();
    let mut r = Remapper::new();
    let id = r.register_vfio_mmap(array.fd(), 2, 0, 2 * page() as u64, area.ptr(), area.len()).unwrap();
    let g = r.regions().next().unwrap();
    assert_eq!((g.id, g.offset, g.len), (id, 2 * page() as u64, 4 * page()));
    // Region page 3 (the area's page 1), then RAM: the BAR run is fd-mapped at its offset.
    let view = r.map(&[area.iov(page(), page()), ram.iov(0, page())]).unwrap();
    assert_eq!((view.stats().runs, view.stats().fd_mapped), (2, 1));
    assert_eq!(unsafe { view.as_ptr().add(7).read_volatile() }, 0x5a);
    drop(view);
    // Its runs are vfio BAR runs: exported through the device fd (refused here, ENOTTY:
    // a BPF map is no vfio device), naming the segment.
    let e = r.dmabufs(&[area.iov(0, 2 * page())]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KernelBuilt { index: 0, reason: KernelBuiltError::BarExportRefused { errno: libc::ENOTTY } }
        ),
        "{e:?}"
    );
    // A second registration over it overlaps; an offset that overflows is refused.
    let e = r.register_vfio_mmap(array.fd(), 2, 0, 2 * page() as u64, area.ptr(), page()).unwrap_err();
    assert!(matches!(e, Error::InvalidRegion { kind: iovmap::RegionError::Overlap { .. }, .. }), "{e:?}");
    r.unregister(id).unwrap();
    let e = r.register_vfio_mmap(array.fd(), 2, u64::MAX, page() as u64, area.ptr(), page()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                kind: iovmap::RegionError::OffsetOverflow,
                context: iovmap::RegionContext::Vfio { index: 2 },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(r.regions().count(), 0);
}
