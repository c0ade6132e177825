//! A vfio-pci device opened the way a VMM opens it with vfio-ioctls (a type1 container,
//! the device's group, the device fd), its regions, and its BARs mmapped from the device
//! fd at their region offsets.

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};

pub use iovmap::vfio::{VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

/// `VFIO_PCI_CONFIG_REGION_INDEX`: the PCI config space region (never mmappable).
pub const CONFIG_REGION: u32 = 7;

/// Normalises a PCI address: `00:02.0` becomes `0000:00:02.0`.
///
/// ```
/// use iovmap_vmtest::device::parse_bdf;
/// assert_eq!(parse_bdf("00:02.0").unwrap(), "0000:00:02.0");
/// assert_eq!(parse_bdf("0000:3b:00.1").unwrap(), "0000:3b:00.1");
/// assert!(parse_bdf("eth0").is_err());
/// ```
///
/// # Errors
/// A message saying what a PCI address looks like.
pub fn parse_bdf(s: &str) -> Result<String, String> {
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_owned() };
    let bad = || {
        format!(
            "{s:?} is not a PCI address: expected [domain:]bus:device.function in hex, e.g. 0000:00:02.0 (see lspci -D)"
        )
    };
    let (domain, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |t: &str, n: usize| t.len() == n && t.chars().all(|c| c.is_ascii_hexdigit());
    let dev_ok = hex(dev, 2) && u8::from_str_radix(dev, 16).is_ok_and(|d| d < 32);
    let func_ok = func.len() == 1 && func.chars().all(|c| ('0'..='7').contains(&c));
    if !(hex(domain, 4) && hex(bus, 2) && dev_ok && func_ok) {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

/// Checks that `bdf` can be opened through vfio on this machine, with a message that says
/// what to do when it cannot. Returns the device's sysfs path.
///
/// # Errors
/// No /dev/vfio/vfio, no such device, a device not bound to vfio-pci, no IOMMU group.
pub fn preflight(bdf: &str) -> Result<PathBuf, String> {
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err("/dev/vfio/vfio does not exist: this machine has no vfio (load it with `modprobe vfio-pci` on a \
                    host with an IOMMU enabled, e.g. intel_iommu=on), so no device can be passed through here"
            .into());
    }
    let sys = PathBuf::from("/sys/bus/pci/devices").join(bdf);
    if !sys.exists() {
        return Err(format!("no PCI device {bdf} on this machine (see lspci -D)"));
    }
    let driver = std::fs::read_link(sys.join("driver")).ok().and_then(|p| p.file_name().map(|n| n.to_owned()));
    match driver.as_ref().and_then(|d| d.to_str()) {
        Some("vfio-pci") => {}
        other => {
            return Err(format!(
                "{bdf} is bound to {}, not vfio-pci: as root, `echo vfio-pci > {sys}/driver_override; echo {bdf} > \
                 {sys}/driver/unbind; echo {bdf} > /sys/bus/pci/drivers_probe`",
                other.map_or("no driver".to_owned(), |d| format!("driver {d}")),
                sys = sys.display()
            ));
        }
    }
    if !sys.join("iommu_group").exists() {
        return Err(format!("{bdf} has no IOMMU group: enable the IOMMU (intel_iommu=on / amd_iommu=on)"));
    }
    Ok(sys)
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says about one region, as vfio-ioctls reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// The region index (0-5: BARs, 6: ROM, 7: config space).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: no such BAR).
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// The mmappable areas when the region has `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`: the MSI-X table in this BAR may be mmapped.
    pub msix_mappable: bool,
}

impl Region {
    /// Whether the region can be mmapped at all.
    pub fn mmap(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (VFIO_REGION_INFO_FLAG_READ, "READ"),
            (VFIO_REGION_INFO_FLAG_WRITE, "WRITE"),
            (VFIO_REGION_INFO_FLAG_MMAP, "MMAP"),
        ];
        let set: Vec<_> = names.iter().filter(|(b, _)| self.flags & b != 0).map(|(_, n)| *n).collect();
        write!(
            f,
            "region {}: size {:#x} offset {:#x} flags {:#x} [{}]",
            self.index,
            self.size,
            self.offset,
            self.flags,
            set.join(" ")
        )?;
        match &self.sparse {
            Some(areas) => {
                let a: Vec<_> = areas.iter().map(|(o, s)| format!("{o:#x}+{s:#x}")).collect();
                write!(f, " SPARSE_MMAP areas {}", a.join(", "))?;
            }
            None => write!(f, " no SPARSE_MMAP")?,
        }
        if self.msix_mappable {
            write!(f, " MSIX_MAPPABLE")?;
        }
        Ok(())
    }
}

/// An open vfio-pci device: the container and group vfio-ioctls made for it, and the device.
pub struct Device {
    /// The PCI address.
    pub bdf: String,
    /// The device, as a VMM holds it.
    pub device: VfioDevice,
    _container: Arc<VfioContainer>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("bdf", &self.bdf).field("fd", &self.device.as_raw_fd()).finish()
    }
}

impl Device {
    /// Opens `bdf` (already bound to vfio-pci) in a new type1 container, as a VMM does:
    /// `VfioContainer::new(None)` then `VfioDevice::new(sysfs path, container, false)`.
    ///
    /// # Errors
    /// What [`preflight`] finds, or what vfio-ioctls reports.
    pub fn open(bdf: &str) -> Result<Self, String> {
        let bdf = parse_bdf(bdf)?;
        let sys = preflight(&bdf)?;
        let container =
            Arc::new(VfioContainer::new(None).map_err(|e| format!("vfio container (/dev/vfio/vfio): {e}"))?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sys, ops, false).map_err(|e| {
            format!("vfio device {bdf}: {e} (is every device of its IOMMU group bound to vfio-pci or unbound?)")
        })?;
        Ok(Device { bdf, device, _container: container })
    }

    /// What the device says about region `index`.
    pub fn region(&self, index: u32) -> Region {
        let mut r = Region {
            index,
            flags: self.device.get_region_flags(index),
            size: self.device.get_region_size(index),
            offset: self.device.get_region_offset(index),
            ..Region::default()
        };
        for cap in self.device.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    r.sparse = Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                VfioRegionInfoCap::MsixMappable => r.msix_mappable = true,
                _ => {}
            }
        }
        r
    }

    /// Mmaps region `index` from the device fd as a VMM does: the whole region at its
    /// offset, or, with a sparse-mmap capability, each mmappable area at `base + area
    /// offset` inside a PROT_NONE reservation of the region's size.
    ///
    /// # Errors
    /// A region without the MMAP flag or of size 0, or the kernel's refusal.
    pub fn map_region(&self, index: u32) -> Result<BarMapping, String> {
        let r = self.region(index);
        if !r.mmap() || r.size == 0 {
            return Err(format!("{}: cannot be mmapped", r));
        }
        let len =
            usize::try_from(r.size).map_err(|_| "region too large".to_owned())?.next_multiple_of(crate::mem::page());
        let prot = libc::PROT_READ | if r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0 { libc::PROT_WRITE } else { 0 };
        // SAFETY: the device fd is owned by `self.device`, which outlives this call (each
        // mapping made here holds its own reference to the file).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.device.as_raw_fd()) };
        let Some(areas) = &r.sparse else {
            return BarMapping::new(len, prot, libc::MAP_SHARED, Some(fd), r.offset)
                .map_err(|e| format!("mmap of {r}: {e}"));
        };
        let mapping = BarMapping::new(
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
            0,
        )
        .map_err(|e| format!("reserving {len:#x} bytes for {r}: {e}"))?;
        for &(off, size) in areas {
            let at = mapping.ptr().wrapping_add(off as usize);
            // SAFETY: `[at, at + size)` lies inside the reservation just made (the kernel
            // keeps areas inside the region), which this function owns.
            let p = unsafe {
                libc::mmap(
                    at.cast(),
                    size as usize,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    (r.offset + off) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap of area {off:#x}+{size:#x} of {r}: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(mapping)
    }
}

/// A region mmapped from a device fd (the testkit's mapping: unmapped on drop).
pub type BarMapping = iovmap_testkit::Mapping;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_and_normalised() {
        assert_eq!(parse_bdf("0000:00:1F.7").unwrap(), "0000:00:1f.7");
        for bad in ["", "00:02", "00:02.8", "00:20.0", "0:00:02.0", "zz:02.0", "0000:00:02.0.1", "../../x"] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn without_vfio_the_preflight_says_why() {
        if Path::new("/dev/vfio/vfio").exists() {
            // A vfio host: a device that does not exist must still be refused clearly.
            let e = preflight("ffff:ff:1f.7").unwrap_err();
            assert!(e.contains("no PCI device"), "{e}");
        } else {
            let e = preflight("0000:00:02.0").unwrap_err();
            assert!(e.contains("/dev/vfio/vfio does not exist"), "{e}");
            let e = Device::open("0000:00:02.0").unwrap_err();
            assert!(e.contains("/dev/vfio/vfio"), "{e}");
        }
    }

    #[test]
    fn a_region_describes_itself() {
        let r = Region {
            index: 0,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x4000,
            offset: 0,
            sparse: Some(vec![(0, 0x2000), (0x3000, 0x1000)]),
            msix_mappable: false,
        };
        let s = r.to_string();
        assert!(s.contains("[READ MMAP]") && s.contains("SPARSE_MMAP areas 0x0+0x2000, 0x3000+0x1000"), "{s}");
        assert!(r.mmap());
    }
}
