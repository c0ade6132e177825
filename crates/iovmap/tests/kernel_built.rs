//! Kernel-built views: runs of registered, sealed memfds placed through udmabuf, and
//! dma-bufs out.
//!
//! What registration records and the errors that name why udmabuf cannot take a run hold
//! on every kernel; the rest needs /dev/udmabuf (CONFIG_UDMABUF), which this project's host
//! kernel lacks: there those tests say why they skip, and the newest rows of the guest
//! matrix (crates/iovmap-vmtest/matrix.sh) run them.

use std::os::fd::{AsFd, AsRawFd};

use iovmap::{Error, KernelBuiltError, MapOptions, Placement, Remapper, View};
use iovmap_testkit::{self as kit, GuestRam, Mapping, skip};

fn page() -> usize {
    kit::page()
}

/// Every other page of `ram`, shuffled: the scattered list a guest framebuffer is.
fn scattered(ram: &GuestRam, n: usize, seed: u64) -> Vec<libc::iovec> {
    let mut pages: Vec<usize> = (0..n).map(|i| 2 * i).collect();
    kit::workloads::Rng::new(seed).shuffle(&mut pages);
    pages.iter().map(|&p| ram.iov(p * page(), page())).collect()
}

/// Byte `k` of the view is byte `k` of the list, and a write through the view reaches it.
fn assert_aliases(view: &View, list: &[libc::iovec]) {
    let mut at = 0;
    for (i, iov) in list.iter().enumerate() {
        let src = iov.iov_base as *mut u8;
        for off in [0, iov.iov_len / 2, iov.iov_len - 1] {
            // SAFETY: in bounds of a live view and of a live source mapping.
            let (v, s) = unsafe { (view.as_ptr().add(at + off).read_volatile(), src.add(off).read_volatile()) };
            assert_eq!(v, s, "segment {i}, byte {off}");
        }
        if let Some(w) = view.as_mut_ptr() {
            // SAFETY: a read-write view, in bounds; the source is the test's own RAM.
            unsafe {
                w.add(at).write_volatile(0xa5 ^ i as u8);
                assert_eq!(src.read_volatile(), 0xa5 ^ i as u8, "a write through the view reaches segment {i}");
                src.write_volatile(0x5a ^ i as u8);
                assert_eq!(view.as_ptr().add(at).read_volatile(), 0x5a ^ i as u8, "and the other way round");
            }
        }
        at += iov.iov_len;
    }
}

#[test]
fn registration_records_what_udmabuf_would_take_and_errors_say_why() {
    let kernel_built = MapOptions::new().kernel_built();
    let why = |r: &Remapper, list: &[libc::iovec], opts: MapOptions| match r.map_with(list, opts) {
        Err(Error::KernelBuilt { index: 0, reason }) => Some(reason),
        Err(e) => panic!("{e:?}"),
        Ok(v) => {
            assert_eq!(v.stats().kernel_built, v.stats().runs, "a kernel-built view is kernel-built throughout");
            None
        }
    };
    // Not registered at all.
    let anon = Mapping::anon_shared(4 * page()).unwrap();
    assert_eq!(why(&Remapper::new(), &[anon.iov(0, page())], kernel_built), Some(KernelBuiltError::NotRegistered));
    // A memfd made without MFD_ALLOW_SEALING, registered: no F_SEAL_SHRINK.
    let plain = GuestRam::new(4 * page()).unwrap();
    let mut r = Remapper::new();
    r.register(plain.ptr(), plain.len(), plain.fd(), 0).unwrap();
    let e = r.map_with(&[plain.iov(0, page())], kernel_built).unwrap_err();
    assert!(matches!(e, Error::KernelBuilt { index: 0, reason: KernelBuiltError::NotSealed }), "{e:?}");
    assert!(e.to_string().contains("F_SEAL_SHRINK") && e.to_string().contains("MFD_ALLOW_SEALING"), "{e}");
    // A tmpfs file opened by path is born sealed against new seals: never a udmabuf source
    // (the same advice as for an unsealed memfd: make guest RAM a sealed memfd).
    match tmpfs_dir() {
        Some(dir) => {
            let shm = tempfile_in(dir, 4 * page());
            let by_path =
                Mapping::new(4 * page(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(shm.as_fd()), 0)
                    .unwrap();
            let mut r = Remapper::new();
            r.register(by_path.ptr(), by_path.len(), shm.as_fd(), 0).unwrap();
            assert_eq!(why(&r, &[by_path.iov(0, page())], kernel_built), Some(KernelBuiltError::NotSealed));
        }
        None => eprintln!("SKIP part: neither /dev/shm nor /tmp is a tmpfs here: no tmpfs file opened by path"),
    }
    // A device-like fd (a BPF array, as root) is no memfd at all.
    match kit::BpfArray::new(4) {
        Ok(bpf) => {
            let mut r = Remapper::new();
            r.register(bpf.map.ptr(), bpf.map.len(), bpf.fd(), 0).unwrap();
            assert_eq!(why(&r, &[bpf.map.iov(0, page())], kernel_built), Some(KernelBuiltError::NotMemfd));
        }
        Err(e) => eprintln!("SKIP part: {e}"),
    }
    // A write-sealed memfd (read-only views only, even so).
    let sealed = kit::memfd("write-sealed", libc::MFD_ALLOW_SEALING).unwrap();
    sealed.set_len(4 * page() as u64).unwrap();
    // SAFETY: fcntl on a live fd.
    assert_eq!(
        unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE) },
        0
    );
    match Mapping::new(4 * page(), libc::PROT_READ, libc::MAP_SHARED, Some(sealed.as_fd()), 0) {
        Ok(ro) => {
            let mut r = Remapper::new();
            r.register(ro.ptr(), ro.len(), sealed.as_fd(), 0).unwrap();
            assert_eq!(why(&r, &[ro.iov(0, page())], kernel_built.read_only()), Some(KernelBuiltError::WriteSealed));
        }
        // Before 6.7 a write-sealed memfd cannot be mapped shared at all, not even
        // read-only (the mapping keeps VM_MAYWRITE): there is nothing to view.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("SKIP part: this kernel refuses a read-only shared mapping of a write-sealed memfd (EPERM)")
        }
        Err(e) => panic!("mmap of the write-sealed memfd: {e}"),
    }
    // Sealed as QEMU seals guest RAM: udmabuf takes it where there is one.
    let good = GuestRam::sealed(4 * page()).unwrap();
    let mut r = Remapper::new();
    r.register(good.ptr(), good.len(), good.fd(), 0).unwrap();
    let got = why(&r, &[good.iov(0, page())], kernel_built);
    match kit::udmabuf() {
        Ok(()) => assert_eq!(got, None),
        Err(e) => {
            assert_eq!(got, Some(KernelBuiltError::NoDevice), "{e}");
            let text = Error::KernelBuilt { index: 0, reason: KernelBuiltError::NoDevice }.to_string();
            assert!(text.contains("/dev/udmabuf") && text.contains("CONFIG_UDMABUF"), "{text}");
        }
    }
}

/// A tmpfs mount to make files in: /dev/shm, or /tmp where that is one (the guests of the
/// kernel matrix mount only /tmp).
fn tmpfs_dir() -> Option<&'static str> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    ["/dev/shm", "/tmp"].into_iter().find(|dir| {
        let path = std::ffi::CString::new(*dir).unwrap();
        // SAFETY: statfs is plain data; all zeroes is a valid value, overwritten below.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs fills the struct it is given; the path is a valid C string.
        let ok = unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0;
        ok && st.f_type as i64 == TMPFS_MAGIC
    })
}

/// A file of `len` bytes on the filesystem at `dir`, unlinked: a tmpfs file opened by
/// path, as QEMU's memory-backend-file makes one.
fn tempfile_in(dir: &str, len: usize) -> std::fs::File {
    let path = format!("{dir}/iovmap-kernel-built-{}-{:?}", std::process::id(), std::thread::current().id());
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f.set_len(len as u64).unwrap();
    f
}

#[test]
fn automatic_placement_falls_back_to_remapping_without_udmabuf() {
    if kit::udmabuf().is_ok() {
        skip!("this kernel has /dev/udmabuf: automatic placement uses it (kernel_built_views_alias_both_ways)");
    }
    let ram = GuestRam::sealed(64 * page()).unwrap();
    ram.fill(1);
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    let list = scattered(&ram, 16, 2);
    let view = r.map(&list).unwrap();
    let s = *view.stats();
    assert_eq!((s.runs, s.cloned, s.kernel_built, s.dmabufs), (16, 16, 0, 0), "{s:?}");
    assert_eq!(s.kernel_built_declined, Some(KernelBuiltError::NoDevice), "the stats say why");
    assert!(view.dmabufs().is_empty());
    assert_aliases(&view, &list);
    // Remap only never asks: nothing declined.
    let view = r.map_with(&list, MapOptions::new().remap_only()).unwrap();
    assert_eq!(view.stats().kernel_built_declined, None);
    // The no-CPU-mapping call fails naming the segment and the reason.
    let e = r.dmabufs(&list).unwrap_err();
    assert!(matches!(e, Error::KernelBuilt { index: 0, reason: KernelBuiltError::NoDevice }), "{e:?}");
}

/// Skips unless this kernel has /dev/udmabuf.
macro_rules! need_udmabuf {
    () => {
        if let Err(e) = kit::udmabuf() {
            skip!("{e}");
        }
    };
}

#[test]
fn kernel_built_views_alias_both_ways() {
    need_udmabuf!();
    let ram = GuestRam::sealed(256 * page()).unwrap();
    ram.fill(3);
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    let list = scattered(&ram, 64, 4);
    for placement in [Placement::Automatic, Placement::KernelBuilt] {
        let view = r.map_with(&list, MapOptions::new().with_placement(placement)).unwrap();
        let s = *view.stats();
        assert_eq!(
            (s.runs, s.kernel_built, s.cloned, s.dmabufs, s.syscalls),
            (64, 64, 0, 1, 2),
            "{placement:?}: {s:?}"
        );
        assert_eq!(s.kernel_built_declined, None);
        assert_aliases(&view, &list);
        // One dma-buf for the whole view, which shows the same bytes mapped on its own.
        let [buf] = view.dmabufs() else { panic!("{:?}", view.dmabufs()) };
        assert_eq!((buf.offset(), buf.len()), (0, 64 * page()));
        let own = Mapping::new(buf.len(), libc::PROT_READ, libc::MAP_SHARED, Some(buf.fd()), 0).unwrap();
        for (i, iov) in list.iter().enumerate() {
            // SAFETY: in bounds of the buffer's own mapping and of the source.
            let (a, b) =
                unsafe { (own.ptr().add(i * page() + 9).read_volatile(), (iov.iov_base as *const u8).add(9).read()) };
            assert_eq!(a, b, "page {i} of the dma-buf");
        }
        // The dma-buf takes CPU access syncs, as importers use them.
        for flags in [DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW, DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW] {
            let sync = flags;
            // SAFETY: DMA_BUF_IOCTL_SYNC reads one u64 of flags.
            let rc = unsafe { libc::ioctl(buf.fd().as_raw_fd(), DMA_BUF_IOCTL_SYNC, &sync as *const u64) };
            assert_eq!(rc, 0, "DMA_BUF_IOCTL_SYNC {flags:#x}: {}", std::io::Error::last_os_error());
        }
    }
    // Read-only: a write through it faults, and nothing reaches the source.
    let view = r.map_with(&list, MapOptions::new().read_only()).unwrap();
    assert_eq!(view.stats().kernel_built, 64);
    assert!(view.as_mut_ptr().is_none());
    let before = ram.read(list[5].iov_base as usize - ram.ptr() as usize);
    assert_eq!(kit::write_signal(view.as_ptr().wrapping_add(5 * page())), Some(libc::SIGSEGV));
    assert_eq!(ram.read(list[5].iov_base as usize - ram.ptr() as usize), before);
    // Populate skips kernel-built runs (the kernel refuses to prefault pfn mappings).
    let view = r.map_with(&list, MapOptions::new().populate()).unwrap();
    assert_eq!(view.stats().kernel_built, 64);
    assert_aliases(&view, &list);
}

const DMA_BUF_SYNC_RW: u64 = 3;
const DMA_BUF_SYNC_START: u64 = 0;
const DMA_BUF_SYNC_END: u64 = 4;
/// `_IOW('b', 0, struct dma_buf_sync)`.
const DMA_BUF_IOCTL_SYNC: libc::c_ulong = 0x4008_6200;

#[test]
fn lists_over_the_limits_take_several_buffers() {
    need_udmabuf!();
    // list_limit entries per buffer (1,024 by default).
    let ram = GuestRam::sealed(2400 * page()).unwrap();
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    let list = scattered(&ram, 1100, 5);
    let view = r.map_with(&list, MapOptions::new().kernel_built()).unwrap();
    let s = *view.stats();
    assert_eq!((s.kernel_built, s.dmabufs), (1100, 2), "{s:?}");
    let bufs = view.dmabufs();
    assert_eq!((bufs[0].offset(), bufs[1].offset(), bufs[0].len() + bufs[1].len()), (0, bufs[0].len(), 1100 * page()));
    assert_aliases(&view, &list);
    // size_limit_mb per buffer (64 MiB): one run longer than that is cut in two.
    let big = GuestRam::sealed((80 << 20) + page()).unwrap();
    let mut r = Remapper::new();
    r.register(big.ptr(), big.len(), big.fd(), 0).unwrap();
    let list = [big.iov(page(), 80 << 20)];
    let view = r.map_with(&list, MapOptions::new().kernel_built()).unwrap();
    assert_eq!((view.stats().runs, view.stats().dmabufs), (1, 2));
    assert_aliases(&view, &list);
}

#[test]
fn kernel_built_clone_and_fd_runs_mix_in_one_view() {
    need_udmabuf!();
    let sealed = GuestRam::sealed(64 * page()).unwrap();
    let plain = GuestRam::new(16 * page()).unwrap();
    sealed.fill(6);
    plain.fill(7);
    let mut r = Remapper::new();
    r.register(sealed.ptr(), sealed.len(), sealed.fd(), 0).unwrap();
    // A device-like mapping the kernel will not clone, registered: a BPF array if root.
    let bpf = kit::BpfArray::new(8).ok();
    if let Some(b) = &bpf {
        r.register(b.map.ptr(), b.map.len(), b.fd(), 0).unwrap();
    } else {
        eprintln!("SKIP part: no BPF array (needs root): no fd-mapped run in the mix");
    }
    let mut list = scattered(&sealed, 8, 7); // kernel-built
    list.push(plain.iov(3 * page(), 2 * page())); // cloned
    if let Some(b) = &bpf {
        list.push(b.map.iov(2 * page(), page())); // fd-mapped
    }
    list.extend(
        scattered(&sealed, 8, 8).into_iter().map(|v| kit::iov((v.iov_base as *const u8).wrapping_add(page()), page())),
    );
    let view = r.map(&list).unwrap();
    let s = *view.stats();
    assert_eq!((s.kernel_built, s.cloned, s.fd_mapped, s.dmabufs), (16, 1, usize::from(bpf.is_some()), 2), "{s:?}");
    assert_aliases(&view, &list);
}

#[test]
fn a_kernel_built_view_outlives_its_registration() {
    need_udmabuf!();
    let ram = GuestRam::sealed(32 * page()).unwrap();
    ram.fill(8);
    let mut r = Remapper::new();
    let id = r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    let list = scattered(&ram, 8, 9);
    let view = r.map_with(&list, MapOptions::new().kernel_built()).unwrap();
    r.unregister(id).unwrap();
    drop(r);
    assert_aliases(&view, &list);
}

#[test]
fn huge_page_pieces_are_mappable_only_through_udmabuf() {
    let ram = match GuestRam::huge_sealed(4 * kit::HUGE_2M) {
        Ok(ram) => ram,
        Err(e) => skip!("{e}"),
    };
    ram.fill(9);
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    // Two 4 KiB pieces of two huge pages: no clone (hugetlb) and no fd map (whole huge
    // pages only) can place them.
    let list = [ram.iov(3 * kit::HUGE_2M + 5 * page(), page()), ram.iov(kit::HUGE_2M + 9 * page(), page())];
    let remap = r.map_with(&list, MapOptions::new().remap_only()).unwrap_err();
    assert!(matches!(remap, Error::Unaligned { index: 0, page_size } if page_size == kit::HUGE_2M), "{remap:?}");
    // The message names the huge page size and the way out.
    let text = remap.to_string();
    assert!(text.contains("(2 MiB)") && text.contains("MapOptions::kernel_built()"), "{text}");
    match kit::udmabuf() {
        Err(why) => {
            eprintln!("no udmabuf here ({why}): automatic gives the remap error, kernel-built says why");
            assert!(matches!(r.map(&list), Err(Error::Unaligned { index: 0, .. })));
            let e = r.map_with(&list, MapOptions::new().kernel_built()).unwrap_err();
            assert!(matches!(e, Error::KernelBuilt { reason: KernelBuiltError::NoDevice, .. }), "{e:?}");
        }
        Ok(()) => match r.map(&list) {
            Ok(view) => {
                assert_eq!((view.stats().kernel_built, view.stats().dmabufs), (2, 1));
                assert_aliases(&view, &list);
            }
            // An older kernel's udmabuf may take hugetlb memfds only in whole huge pages.
            Err(Error::KernelBuilt { reason: KernelBuiltError::Refused { errno }, index }) => {
                eprintln!("this kernel's udmabuf refuses 4 KiB pieces of huge pages (errno {errno}, segment {index})");
            }
            Err(e) => panic!("{e:?}"),
        },
    }
}

#[test]
fn dmabufs_without_a_cpu_mapping() {
    need_udmabuf!();
    let ram = GuestRam::sealed(64 * page()).unwrap();
    ram.fill(10);
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    let mut list = scattered(&ram, 16, 11);
    list[0] = kit::iov((list[0].iov_base as *const u8).wrapping_add(100), page() - 100); // starts mid-page
    let bufs = r.dmabufs(&list).unwrap();
    assert_eq!((bufs.buffers().len(), bufs.lead(), bufs.len()), (1, 100, 16 * page() - 100));
    let buf = &bufs.buffers()[0];
    let own = Mapping::new(buf.len(), libc::PROT_READ, libc::MAP_SHARED, Some(buf.fd()), 0).unwrap();
    // SAFETY: in bounds of the buffer's mapping and of the first segment.
    let (a, b) = unsafe { (own.ptr().add(bufs.lead()).read_volatile(), (list[0].iov_base as *const u8).read()) };
    assert_eq!(a, b);
    // Handed over: the fd is the caller's.
    let fds: Vec<std::os::fd::OwnedFd> = bufs.into_buffers().into_iter().map(iovmap::DmaBuf::into_fd).collect();
    assert_eq!(fds.len(), 1);
    // Unregistered memory is named.
    let anon = Mapping::anon_shared(page()).unwrap();
    let e = r.dmabufs(&[ram.iov(0, page()), anon.iov(0, page())]).unwrap_err();
    assert!(matches!(e, Error::KernelBuilt { index: 1, reason: KernelBuiltError::NotRegistered }), "{e:?}");
}
