//! The vm-memory adapter against real guest memory: a `GuestMemoryMmap` of memfd regions
//! (one of them on 2 MiB hugetlb pages where huge pages can be had), with a hole.

use std::sync::atomic::Ordering;

use iovmap::{Error, MapOptions, Remapper};
use iovmap_testkit::{self as kit, skip};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, VolatileSlice};

const MIB: usize = 1 << 20;

/// Guest RAM: [0, 16M) memfd, hole, [32M, 48M) memfd, [48M, 56M) hugetlb memfd (or memfd
/// when no huge pages can be reserved). Filled with a pattern of the guest address.
fn guest(huge: bool) -> GuestMemoryMmap {
    let file = |len: usize, huge: bool| {
        let flags = if huge { libc::MFD_HUGETLB | libc::MFD_HUGE_2MB } else { 0 };
        let f = kit::memfd("guest", flags).unwrap();
        f.set_len(len as u64).unwrap();
        Some(FileOffset::new(f, 0))
    };
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
        (GuestAddress(0), 16 * MIB, file(16 * MIB, false)),
        (GuestAddress(32 * MIB as u64), 16 * MIB, file(16 * MIB, false)),
        (GuestAddress(48 * MIB as u64), 8 * MIB, file(8 * MIB, huge)),
    ])
    .unwrap();
    for (start, len) in [(0, 16 * MIB), (32 * MIB, 24 * MIB)] {
        let bytes: Vec<u8> = (start..start + len).map(|a| kit::pattern(1, a)).collect();
        mem.write_slice(&bytes, GuestAddress(start as u64)).unwrap();
    }
    mem
}

fn huge_available() -> bool {
    kit::free_huge_pages() >= 4
}

/// The view's bytes equal guest memory at the ranges, read both through the
/// VolatileSlice and through vm-memory.
#[track_caller]
fn assert_matches(slice: &VolatileSlice<'_>, mem: &GuestMemoryMmap, ranges: &[(GuestAddress, usize)]) {
    let mut at = 0;
    for &(gpa, len) in ranges {
        let mut want = vec![0u8; len];
        mem.read_slice(&mut want, gpa).unwrap();
        let mut got = vec![0u8; len];
        slice.read_slice(&mut got, at).unwrap();
        assert!(got == want, "bytes of the range at {gpa:?} differ");
        at += len;
    }
    assert_eq!(at, slice.len());
}

#[test]
fn guest_scatter_lists_map_across_region_boundaries() {
    let huge = huge_available();
    if !huge {
        eprintln!("SKIP part: no free huge pages, the third region is a plain memfd");
    }
    let mem = guest(huge);
    let remapper = Remapper::from_guest_memory(&mem).unwrap();
    assert_eq!(remapper.regions().count(), 3);
    let p = kit::page();
    // The crossing entry comes first so that its hugetlb half lands 2 MiB-aligned in the
    // view (2 MiB of region 1 before it); anything else before it would be Unaligned.
    let ranges = [
        (GuestAddress((46 * MIB) as u64), 4 * MIB), // region 1 into region 2: split
        (GuestAddress(5 * p as u64), 3 * p),        // region 0
        (GuestAddress((32 * MIB + p) as u64), p),   // region 1
        (GuestAddress((16 * MIB - p) as u64), p),   // last page of region 0
    ];
    let view = remapper.map_guest(&mem, &ranges, MapOptions::new()).unwrap();
    let s = view.stats();
    assert_eq!(s.segments, 5, "the crossing entry became two segments");
    assert_eq!(s.runs, 5);
    assert_eq!(s.fd_mapped, if huge { 1 } else { 0 }, "the hugetlb piece comes from its file");
    let slice = view.as_volatile_slice();
    assert_matches(&slice, &mem, &ranges);

    // Writes through the view reach guest memory, and the other way round.
    slice.store(0x5au8, 2 * MIB + 7, Ordering::Relaxed).unwrap(); // GPA 48M + 7 (region 2)
    assert_eq!(mem.read_obj::<u8>(GuestAddress((48 * MIB + 7) as u64)).unwrap(), 0x5a);
    mem.write_obj(0xa5u8, GuestAddress(5 * p as u64 + 11)).unwrap();
    assert_eq!(slice.load::<u8>(4 * MIB + 11, Ordering::Relaxed).unwrap(), 0xa5);

    // The same list with a page in front of the crossing entry cannot keep the hugetlb
    // piece aligned: refused, naming the crossing entry (index 1 of this list).
    let shifted = [(GuestAddress(0), p), ranges[0]];
    match remapper.map_guest(&mem, &shifted, MapOptions::new()) {
        Err(Error::Unaligned { index: 1, .. }) if huge => {}
        Ok(_) if !huge => {} // all 4 KiB pages: nothing to misalign
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_guest_addresses_name_the_entry() {
    let mem = guest(false);
    let remapper = Remapper::from_guest_memory(&mem).unwrap();
    let p = kit::page();
    let ok = (GuestAddress(0), p);
    let cases: [(&str, (GuestAddress, usize)); 4] = [
        ("in the hole", (GuestAddress((20 * MIB) as u64), p)),
        ("runs into the hole", (GuestAddress((16 * MIB - p) as u64), 2 * p)),
        ("past the end", (GuestAddress((56 * MIB) as u64), p)),
        ("wraps", (GuestAddress(u64::MAX - 10), 100)),
    ];
    for (what, bad) in cases {
        let e = remapper.map_guest(&mem, &[ok, ok, bad], MapOptions::new()).unwrap_err();
        assert!(matches!(e, Error::NotInGuestMemory { index: 2 }), "{what}: {e:?}");
        assert!(e.to_string().contains("entry 2"), "{e}");
    }
}

#[test]
fn host_level_errors_name_the_guest_entry_not_the_host_segment() {
    let mem = guest(false);
    let remapper = Remapper::from_guest_memory(&mem).unwrap();
    let p = kit::page();
    // Entry 0 is split in two host segments (regions 1 and 2), so entry 2 is host segment 3.
    let ranges = [
        (GuestAddress((48 * MIB - p) as u64), 2 * p),
        (GuestAddress(0), p),
        (GuestAddress(0x3000 + 100), p), // starts mid-page after other runs
    ];
    let e = remapper.map_guest(&mem, &ranges, MapOptions::new()).unwrap_err();
    assert!(matches!(e, Error::Unaligned { index: 2, .. }), "{e:?}");
}

#[test]
fn anonymous_private_guest_memory_is_not_shareable() {
    // GuestMemoryMmap::from_ranges maps private anonymous memory: nothing can alias it.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let remapper = Remapper::from_guest_memory(&mem).unwrap();
    assert_eq!(remapper.regions().count(), 0, "no file, nothing to register");
    let e = remapper.map_guest(&mem, &[(GuestAddress(0x1000), 0x1000)], MapOptions::new()).unwrap_err();
    assert!(matches!(e, Error::NotShareable { index: 0 }), "{e:?}");
}

#[test]
fn hugetlb_guest_ram_is_huge_aligned_in_the_view() {
    if !huge_available() {
        skip!("no free 2 MiB huge pages (as root: echo 64 > /proc/sys/vm/nr_hugepages)");
    }
    let mem = guest(true);
    let remapper = Remapper::from_guest_memory(&mem).unwrap();
    let ranges = [(GuestAddress((50 * MIB) as u64), 2 * MIB), (GuestAddress((48 * MIB) as u64), MIB)];
    let view = remapper.map_guest(&mem, &ranges, MapOptions::new()).unwrap();
    assert_eq!(view.as_ptr() as usize % (2 * MIB), 0);
    assert_eq!((view.stats().runs, view.stats().fd_mapped), (2, 2));
    assert_matches(&view.as_volatile_slice(), &mem, &ranges);
}
