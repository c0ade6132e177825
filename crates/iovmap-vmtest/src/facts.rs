//! What this kernel offers iovmap, measured (never inferred from the version: distributions
//! backport): the facts each row of the kernel matrix reports (issue 11).
//!
//! ```text
//! FACT kernel: 6.1.0-41-amd64 x86_64
//! FACT page: 4K
//! FACT holes: yes <how it was seen>
//! FACT procmap_query: no <how it was seen>
//! ...
//! FACTS: DONE | FACTS: MISMATCH <which>
//! ```
//!
//! Each fact is `yes` or `no` with what was seen. `holes` is measured twice, directly
//! and through iovmap (what its own probe decided, as the syscall count of a view shows);
//! the two must agree, or the report ends with `FACTS: MISMATCH`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use iovmap::Remapper;
use iovmap_testkit::{GuestRam, Mapping, has_procmap_query, memfd};

use crate::device;
use crate::mem::{self, page};

/// One measured fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Its name in the report (`holes`, `procmap_query`, `populate`, `udmabuf`,
    /// `vfio_bar`, `vfio_dmabuf`, `mseal`).
    pub name: &'static str,
    /// Whether the kernel has it.
    pub yes: bool,
    /// What was seen, or why not.
    pub detail: String,
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FACT {}: {} {}", self.name, if self.yes { "yes" } else { "no" }, self.detail)
    }
}

fn fact(name: &'static str, yes: bool, detail: impl Into<String>) -> Fact {
    Fact { name, yes, detail: detail.into() }
}

/// The page size as the matrix names it: `4K`, `16K`, `64K`.
///
/// ```
/// assert_eq!(iovmap_vmtest::facts::page_name(16384), "16K");
/// ```
pub fn page_name(size: usize) -> String {
    format!("{}K", size >> 10)
}

/// Every fact, in report order; `ivshmem` is the PCI address of the device whose BAR2
/// the `vfio_bar` fact tries, if there is one.
pub fn measure(ivshmem: Option<&str>) -> Vec<Fact> {
    vec![holes(), procmap_query(), populate(), udmabuf(), vfio_bar(ivshmem), vfio_dmabuf(ivshmem), mseal()]
}

/// Prints the report and returns whether the measurements agree with each other.
pub fn report(ivshmem: Option<&str>) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("FACT kernel: {} {}", release.trim(), std::env::consts::ARCH);
    println!("FACT page: {}", page_name(page()));
    let facts = measure(ivshmem);
    for f in &facts {
        println!("{f}");
    }
    let mismatches: Vec<&str> = facts.iter().filter(|f| f.detail.contains("MISMATCH")).map(|f| f.name).collect();
    if mismatches.is_empty() {
        println!("FACTS: DONE");
        true
    } else {
        println!("FACTS: MISMATCH {}", mismatches.join(" "));
        false
    }
}

/// Whether a refused `mremap(src, 0, len, MREMAP_FIXED | MREMAP_MAYMOVE, dst)` has unmapped
/// `dst` (Linux before 6.17), seen with a private source (refused with EINVAL), and what
/// iovmap decided: on such kernels a view of unregistered memfd RAM costs one more
/// syscall, the clone probe (docs/vfio.md, "What a view costs").
pub fn holes() -> Fact {
    let direct = match refused_clone_unmaps_dst() {
        Ok(d) => d,
        Err(e) => return fact("holes", false, format!("cannot measure: {e}")),
    };
    let (direct_holes, how) = direct;
    let iovmap_says = iovmap_counts_a_probe();
    let agree = match &iovmap_says {
        Ok(probe) => {
            if *probe == direct_holes {
                format!("iovmap agrees (a 2-run memfd view costs {} syscalls)", 2 + usize::from(*probe))
            } else {
                format!(
                    "MISMATCH: iovmap decided the kernel {} (a 2-run memfd view costs {} syscalls)",
                    if *probe { "punches holes" } else { "keeps dst" },
                    2 + usize::from(*probe)
                )
            }
        }
        Err(e) => format!("iovmap's view unknown: {e}"),
    };
    fact("holes", direct_holes, format!("({how}; {agree})"))
}

fn refused_clone_unmaps_dst() -> io::Result<(bool, String)> {
    let p = page();
    let src = Mapping::anon_private(p)?;
    // SAFETY: a fresh PROT_NONE reservation, replacing nothing.
    let res = unsafe {
        libc::mmap(std::ptr::null_mut(), 3 * p, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if res == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let dst = res as usize + p;
    // SAFETY: `dst` is the middle page of our own reservation: whatever the kernel does
    // there (refuse, or unmap then refuse), it does to our range.
    let r = unsafe {
        libc::mremap(src.ptr().cast(), 0, p, libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE, dst as *mut libc::c_void)
    };
    let err = io::Error::last_os_error();
    let hole = r == libc::MAP_FAILED && mem::has_unmapped_page(dst, p);
    // SAFETY: the outer pages are ours; the middle one too unless the kernel unmapped it,
    // in which case another thread may have mapped something there since (a test
    // process has threads): it is left alone.
    unsafe {
        libc::munmap(res, p);
        libc::munmap((dst + p) as *mut libc::c_void, p);
        if !hole {
            libc::munmap(dst as *mut libc::c_void, p);
        }
    }
    if r != libc::MAP_FAILED {
        return Err(io::Error::other("the kernel cloned private memory"));
    }
    let how = format!(
        "mremap(private, 0, page, MREMAP_FIXED|MREMAP_MAYMOVE, dst) = {}; dst afterwards {}",
        errno_name(err.raw_os_error()),
        if hole { "unmapped" } else { "still reserved" }
    );
    Ok((hole, how))
}

/// Whether iovmap spends a clone probe on a view of unregistered memfd RAM: two runs, so
/// that the view needs a reservation (a one-run view is placed where the kernel chooses,
/// with nothing to punch a hole in, and never probes).
fn iovmap_counts_a_probe() -> Result<bool, String> {
    let ram = GuestRam::new(3 * page()).map_err(|e| format!("memfd: {e}"))?;
    let view =
        Remapper::new().map(&[ram.iov(2 * page(), page()), ram.iov(0, page())]).map_err(|e| format!("map: {e}"))?;
    match view.stats().syscalls {
        2 => Ok(false),
        3 => Ok(true),
        n => Err(format!("a 2-run memfd view cost {n} syscalls")),
    }
}

/// Whether `ioctl(PROCMAP_QUERY)` answers on `/proc/self/maps` (Linux 6.11+); iovmap falls
/// back to reading `/proc/self/maps` where it does not.
pub fn procmap_query() -> Fact {
    let yes = has_procmap_query();
    fact("procmap_query", yes, if yes { "(ioctl(PROCMAP_QUERY) answers)" } else { "(ioctl(PROCMAP_QUERY) = ENOTTY)" })
}

/// Whether `madvise(MADV_POPULATE_READ)` works on shared memfd RAM (Linux 5.14+), and what
/// iovmap's `populate` does here.
pub fn populate() -> Fact {
    let ram = match GuestRam::new(2 * page()) {
        Ok(r) => r,
        Err(e) => return fact("populate", false, format!("cannot measure: memfd: {e}")),
    };
    // SAFETY: prefaulting our own mapping changes no contents.
    let r = unsafe { libc::madvise(ram.ptr().cast(), 2 * page(), libc::MADV_POPULATE_READ) };
    let err = io::Error::last_os_error();
    let opts = iovmap::MapOptions::new().populate();
    let lib = match Remapper::new().map_with(&[ram.iov(0, 2 * page())], opts) {
        Ok(_) => "iovmap's populate: Ok".to_owned(),
        Err(e) => format!("iovmap's populate: Err({e})"),
    };
    if r == 0 {
        fact("populate", true, format!("(madvise(MADV_POPULATE_READ) = 0; {lib})"))
    } else {
        fact("populate", false, format!("(madvise(MADV_POPULATE_READ) = {}; {lib})", errno_name(err.raw_os_error())))
    }
}

/// `_IOW('u', 0x42, struct udmabuf_create)`.
const UDMABUF_CREATE: libc::c_ulong = 0x4018_7542;

#[repr(C)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}

/// Whether `/dev/udmabuf` makes a dma-buf of a sealed memfd whose mmap shows the memfd's
/// bytes (CONFIG_UDMABUF).
pub fn udmabuf() -> Fact {
    match udmabuf_works() {
        Ok(how) => fact("udmabuf", true, format!("({how})")),
        Err(why) => fact("udmabuf", false, format!("({why})")),
    }
}

fn udmabuf_works() -> Result<String, String> {
    let dev = std::fs::File::open("/dev/udmabuf").map_err(|e| format!("/dev/udmabuf: {e}"))?;
    let p = page();
    let file = memfd("iovmap-udmabuf-fact", libc::MFD_ALLOW_SEALING).map_err(|e| format!("memfd: {e}"))?;
    file.set_len(p as u64).map_err(|e| format!("ftruncate: {e}"))?;
    // SAFETY: fcntl on our own memfd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
        return Err(format!("F_SEAL_SHRINK: {}", io::Error::last_os_error()));
    }
    let ram = Mapping::new(p, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(file.as_fd()), 0)
        .map_err(|e| format!("mmap of the memfd: {e}"))?;
    // SAFETY: the first byte of our own writable mapping.
    unsafe { ram.ptr().add(7).write_volatile(0x5a) };
    let mut create = UdmabufCreate { memfd: file.as_raw_fd() as u32, flags: 0, offset: 0, size: p as u64 };
    // SAFETY: a valid struct udmabuf_create for the size the ioctl number says.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE, &mut create as *mut UdmabufCreate) };
    if fd < 0 {
        return Err(format!("UDMABUF_CREATE: {}", io::Error::last_os_error()));
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let buf = unsafe { OwnedFd::from_raw_fd(fd) };
    let view = Mapping::new(p, libc::PROT_READ, libc::MAP_SHARED, Some(buf.as_fd()), 0)
        .map_err(|e| format!("mmap of the dma-buf: {e}"))?;
    // SAFETY: inside the dma-buf mapping just made, readable.
    let seen = unsafe { view.ptr().add(7).read_volatile() };
    if seen == 0x5a {
        Ok("UDMABUF_CREATE of a sealed memfd page; its mmap shows the memfd's bytes".into())
    } else {
        Err(format!("the dma-buf mmap shows {seen:#x}, the memfd holds 0x5a"))
    }
}

/// Whether the ivshmem device's BAR2 reaches this program through vfio-pci as device
/// memory (`pf io`), mmapped from the device fd.
pub fn vfio_bar(ivshmem: Option<&str>) -> Fact {
    let Some(bdf) = ivshmem else { return fact("vfio_bar", false, "(no ivshmem device in this guest)") };
    let sys = format!("/sys/bus/pci/devices/{bdf}");
    if std::fs::read_link(format!("{sys}/iommu_group")).is_err() {
        return fact("vfio_bar", false, format!("({bdf} has no IOMMU group: no IOMMU translates for it)"));
    }
    let driver = std::fs::read_link(format!("{sys}/driver"))
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into());
    if driver != "vfio-pci" {
        return fact("vfio_bar", false, format!("({bdf} is bound to {driver}, not vfio-pci)"));
    }
    let dev = match device::Device::open(bdf) {
        Ok(d) => d,
        Err(e) => return fact("vfio_bar", false, format!("({e})")),
    };
    let bar = match dev.map_region(2) {
        Ok(b) => b,
        Err(e) => return fact("vfio_bar", false, format!("({e})")),
    };
    let flags = mem::vm_flags(bar.ptr() as usize).unwrap_or_default();
    let has = |f: &str| flags.split(' ').any(|x| x == f);
    let yes = has("pf") && has("io");
    fact("vfio_bar", yes, format!("({bdf} BAR2: {:#x} bytes mmapped from the device fd, VmFlags {flags})", bar.len()))
}

/// `VFIO_DEVICE_FEATURE`: `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
const VFIO_DEVICE_FEATURE: libc::c_ulong = 0x3b75;
const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;
/// `VFIO_DEVICE_FEATURE_DMA_BUF` (Linux 6.19+): a dma-buf of ranges of a region.
const VFIO_DEVICE_FEATURE_DMA_BUF: u32 = 11;

/// `struct vfio_device_feature` carrying a `struct vfio_device_feature_dma_buf` with one
/// `struct vfio_region_dma_range`.
#[repr(C)]
struct DmaBufFeature {
    argsz: u32,
    flags: u32,
    region_index: u32,
    open_flags: u32,
    dma_buf_flags: u32,
    nr_ranges: u32,
    offset: u64,
    length: u64,
}

/// Whether vfio-pci exports the ivshmem BAR2 as a dma-buf (`VFIO_DEVICE_FEATURE_DMA_BUF`),
/// and whether that dma-buf can be mmapped (what a kernel-built view of a BAR run would
/// need): the probe, the export of BAR2's first page, an mmap of the dma-buf.
pub fn vfio_dmabuf(ivshmem: Option<&str>) -> Fact {
    let Some(bdf) = ivshmem else { return fact("vfio_dmabuf", false, "(no ivshmem device in this guest)") };
    match device::Device::open(bdf) {
        Ok(dev) => vfio_dmabuf_of(dev.device.as_raw_fd()),
        Err(e) => fact("vfio_dmabuf", false, format!("({e})")),
    }
}

/// [`vfio_dmabuf`] on an open vfio-pci device fd whose region 2 is the ivshmem BAR (the
/// guest program asks it of the device it holds).
pub fn vfio_dmabuf_of(fd: std::os::fd::RawFd) -> Fact {
    let mut req = DmaBufFeature {
        argsz: std::mem::size_of::<DmaBufFeature>() as u32,
        flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
        region_index: 2,
        open_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        dma_buf_flags: 0,
        nr_ranges: 1,
        offset: 0,
        length: page() as u64,
    };
    let call = |req: &mut DmaBufFeature| {
        // SAFETY: VFIO_DEVICE_FEATURE reads `argsz` bytes of a struct of that size (and,
        // for GET of DMA_BUF, the one range it announces); it writes nothing back.
        let r = unsafe { libc::ioctl(fd, VFIO_DEVICE_FEATURE, req as *mut DmaBufFeature) };
        if r < 0 { Err(errno_name(io::Error::last_os_error().raw_os_error())) } else { Ok(r) }
    };
    if let Err(e) = call(&mut req) {
        return fact("vfio_dmabuf", false, format!("(probe of VFIO_DEVICE_FEATURE_DMA_BUF = {e})"));
    }
    req.flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF;
    let buf = match call(&mut req) {
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(e) => return fact("vfio_dmabuf", false, format!("(probe = 0; export of BAR2's first page = {e})")),
    };
    let mmap = match Mapping::new(page(), libc::PROT_READ, libc::MAP_SHARED, Some(buf.as_fd()), 0) {
        Ok(_) => "its mmap succeeds".to_owned(),
        Err(e) => format!("its mmap = {}", errno_name(e.raw_os_error())),
    };
    fact("vfio_dmabuf", true, format!("(probe = 0; BAR2's first page exported as a dma-buf; {mmap})"))
}

/// `mseal(2)`'s syscall number (the same on x86_64 and arm64).
const SYS_MSEAL: libc::c_long = 462;

/// Whether `mseal(2)` seals a mapping (Linux 6.10+), and what a clone of a sealed shared
/// mapping then gets.
pub fn mseal() -> Fact {
    let ram = match GuestRam::new(page()) {
        Ok(r) => r,
        Err(e) => return fact("mseal", false, format!("cannot measure: memfd: {e}")),
    };
    // SAFETY: seals our own mapping; it can then never be unmapped, so `ram` is forgotten
    // below (one page stays mapped until the process exits) and its drop never tries.
    let r = unsafe { libc::syscall(SYS_MSEAL, ram.ptr(), page(), 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return fact("mseal", false, format!("(mseal = {})", errno_name(e.raw_os_error())));
    }
    let p = page();
    let clone = match Mapping::new(3 * p, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0) {
        Ok(res) => {
            let dst = res.ptr().wrapping_add(p);
            // SAFETY: `dst` is inside our own reservation.
            let c = unsafe {
                libc::mremap(
                    ram.ptr().cast(),
                    0,
                    p,
                    libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                    dst.cast::<libc::c_void>(),
                )
            };
            if c == libc::MAP_FAILED {
                format!(
                    "a clone of the sealed memfd mapping = {}",
                    errno_name(io::Error::last_os_error().raw_os_error())
                )
            } else {
                "a clone of the sealed memfd mapping succeeds".to_owned()
            }
        }
        Err(e) => format!("no reservation: {e}"),
    };
    std::mem::forget(ram);
    fact("mseal", true, format!("(mseal = 0; {clone})"))
}

/// The name of an errno (the few these measurements meet), or its number.
fn errno_name(e: Option<i32>) -> String {
    match e {
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EFAULT) => "EFAULT".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::ENOTTY) => "ENOTTY".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        Some(libc::ENODEV) => "ENODEV".into(),
        Some(libc::EBUSY) => "EBUSY".into(),
        Some(n) => format!("errno {n}"),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's kernel (6.18 here, and any kernel CI runs on) answers every fact; what
    /// each says depends on the kernel, so this checks that each measured something and
    /// that the two measurements of `holes` agree.
    #[test]
    fn every_fact_is_measured_and_holes_agree() {
        let facts = measure(None);
        let names: Vec<_> = facts.iter().map(|f| f.name).collect();
        assert_eq!(names, ["holes", "procmap_query", "populate", "udmabuf", "vfio_bar", "vfio_dmabuf", "mseal"]);
        for f in &facts {
            assert!(!f.detail.contains("cannot measure") && !f.detail.contains("MISMATCH"), "{f}");
        }
        assert!(!facts[4].yes && !facts[5].yes, "no device given: {} / {}", facts[4], facts[5]);
    }

    #[test]
    fn procmap_query_and_populate_match_the_testkit_and_madvise() {
        assert_eq!(procmap_query().yes, has_procmap_query());
        let p = populate();
        assert!(p.detail.contains(if p.yes { "iovmap's populate: Ok" } else { "MADV_POPULATE_READ) = EINVAL" }), "{p}");
    }
}
