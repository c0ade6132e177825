//! vfio regions: registering the BARs a VMM mmapped from a vfio device fd.
//!
//! What `VFIO_DEVICE_GET_REGION_INFO` says about a region decides what can be
//! registered: nothing unless it carries `VFIO_REGION_INFO_FLAG_MMAP`; with a sparse-mmap
//! capability, only its mmappable areas (the gaps, such as an MSI-X table, become holes
//! that a view refuses). That decision is the pure [`mappable_areas`];
//! [`Remapper::register_vfio_region_info`] applies it for any device fd, and
//! `Remapper::register_vfio_region` (feature `vfio`) reads the info from a
//! `vfio_ioctls::VfioDevice`.

use std::os::fd::{AsFd, BorrowedFd};

use crate::error::{Error, RegionContext, RegionError};
use crate::regions::{RegionId, RegionSpan, VfioRegion};
use crate::remapper::Remapper;
use crate::vma::ProcessVmas;

/// `VFIO_REGION_INFO_FLAG_READ`: the region can be read.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`: the region can be written.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`: the region can be mmapped.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// What `VFIO_DEVICE_GET_REGION_INFO` reports about one region of a device.
///
/// ```
/// use iovmap::vfio::{VfioRegionInfo, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ};
/// let bar2 = VfioRegionInfo {
///     index: 2,
///     flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
///     size: 16 << 20,
///     offset: 2 << 40, // vfio-pci puts region N at N << 40 in the device fd
///     sparse_areas: None,
/// };
/// assert_eq!(iovmap::vfio::mappable_areas(&bar2, iovmap::page_size()), Ok(vec![(0, 16 << 20)]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfioRegionInfo {
    /// The region index (`VFIO_PCI_BAR0_REGION_INDEX` is 0).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size of the region in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// The mmappable areas `(offset in region, size)` when the region has the
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` capability; `None` when the whole region is.
    pub sparse_areas: Option<Vec<(u64, u64)>>,
}

/// Why a vfio region cannot be registered as its `VFIO_DEVICE_GET_REGION_INFO` describes
/// it: what [`mappable_areas`] refuses.
///
/// ```
/// use iovmap::vfio::{mappable_areas, RegionInfoError, VfioRegionInfo};
/// let info = VfioRegionInfo { index: 1, flags: 0, size: 0x1000, offset: 1 << 40, sparse_areas: None };
/// assert_eq!(mappable_areas(&info, 4096), Err(RegionInfoError::NotMmappable { index: 1, flags: 0 }));
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionInfoError {
    /// The region lacks `VFIO_REGION_INFO_FLAG_MMAP`.
    #[error(
        "vfio region {index} cannot be mmapped (flags {flags:#x} lack VFIO_REGION_INFO_FLAG_MMAP): the VMM traps \
         its accesses, so it cannot be part of a view"
    )]
    NotMmappable {
        /// The region index.
        index: u32,
        /// Its flags.
        flags: u32,
    },
    /// The region's size is 0.
    #[error("vfio region {index} has size 0: nothing to register")]
    Empty {
        /// The region index.
        index: u32,
    },
    /// The sparse-mmap capability lists no area of non-zero size.
    #[error("vfio region {index} has a sparse-mmap capability with no mmappable area: nothing to register")]
    NoMmappableArea {
        /// The region index.
        index: u32,
    },
    /// A sparse area runs past the region's end.
    #[error(
        "vfio region {index}: mmappable area [{offset:#x}, +{size:#x}) runs past the region's size {region_size:#x}"
    )]
    AreaPastEnd {
        /// The region index.
        index: u32,
        /// The area's offset in the region.
        offset: u64,
        /// Its size.
        size: u64,
        /// The region's size.
        region_size: u64,
    },
    /// A sparse area is not page aligned.
    #[error(
        "vfio region {index}: mmappable area [{offset:#x}, +{size:#x}) is not page aligned (page size {page_size:#x})"
    )]
    AreaUnaligned {
        /// The region index.
        index: u32,
        /// The area's offset in the region.
        offset: u64,
        /// Its size.
        size: u64,
        /// The page size it must be aligned to.
        page_size: usize,
    },
    /// Two sparse areas overlap.
    #[error("vfio region {index}: mmappable areas overlap at {offset:#x}")]
    AreasOverlap {
        /// The region index.
        index: u32,
        /// Where the second one starts.
        offset: u64,
    },
    /// The region is larger than this process's address space.
    #[error("vfio region {index} ({size:#x} bytes) is larger than the address space")]
    TooLarge {
        /// The region index.
        index: u32,
        /// Its size.
        size: u64,
    },
}

/// The parts of a region that may be registered, as `(offset in region, size)`, sorted.
///
/// ```
/// use iovmap::vfio::{mappable_areas, RegionInfoError, VfioRegionInfo, VFIO_REGION_INFO_FLAG_MMAP};
/// // A 64 KiB BAR with an MSI-X table at 0x2000..0x3000 left out of the mmap.
/// let info = VfioRegionInfo {
///     index: 0,
///     flags: VFIO_REGION_INFO_FLAG_MMAP,
///     size: 0x10000,
///     offset: 0,
///     sparse_areas: Some(vec![(0x3000, 0xd000), (0, 0x2000)]),
/// };
/// assert_eq!(mappable_areas(&info, 4096), Ok(vec![(0, 0x2000), (0x3000, 0xd000)]));
/// let no_mmap = VfioRegionInfo { flags: 0, ..info };
/// assert!(matches!(mappable_areas(&no_mmap, 4096), Err(RegionInfoError::NotMmappable { index: 0, .. })));
/// ```
///
/// # Errors
/// A [`RegionInfoError`] when the region cannot be mmapped at all, or its areas are
/// malformed.
pub fn mappable_areas(info: &VfioRegionInfo, page_size: usize) -> Result<Vec<(u64, u64)>, RegionInfoError> {
    let index = info.index;
    if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(RegionInfoError::NotMmappable { index, flags: info.flags });
    }
    if info.size == 0 {
        return Err(RegionInfoError::Empty { index });
    }
    let page = page_size as u64;
    let mut areas: Vec<(u64, u64)> = match &info.sparse_areas {
        None => vec![(0, info.size)],
        Some(a) => a.iter().copied().filter(|&(_, size)| size > 0).collect(),
    };
    if areas.is_empty() {
        return Err(RegionInfoError::NoMmappableArea { index });
    }
    areas.sort_unstable();
    let mut end_of_previous = 0;
    for &(offset, size) in &areas {
        let Some(end) = offset.checked_add(size).filter(|&e| e <= info.size) else {
            return Err(RegionInfoError::AreaPastEnd { index, offset, size, region_size: info.size });
        };
        if offset % page != 0 || size % page != 0 {
            return Err(RegionInfoError::AreaUnaligned { index, offset, size, page_size });
        }
        if offset < end_of_previous {
            return Err(RegionInfoError::AreasOverlap { index, offset });
        }
        end_of_previous = end;
    }
    Ok(areas)
}

impl Remapper {
    /// Registers a vfio region that the VMM mmapped at `addr` from `device_fd` (the whole
    /// region, or its sparse areas each at `addr + area offset`): every mmappable area is
    /// registered with `device_fd` at `info.offset + area offset`, and the gaps between
    /// areas become holes that views refuse ([`Error::DeviceHole`]). One registration:
    /// [`Remapper::unregister`] with the id returned removes all of it.
    ///
    /// This is what `register_vfio_region` does with the info it reads from a
    /// `vfio_ioctls::VfioDevice`; VMMs with their own vfio code call it directly. What is
    /// verified is as for [`Remapper::register`]: the device fd's file must be the file
    /// mapped at each area; the offset the kernel reports for a BAR mapping is
    /// driver-defined, so it is recorded, not compared with the fd offset.
    ///
    /// ```no_run
    /// # fn f(device: std::fs::File, bar: *const u8) -> Result<(), iovmap::Error> {
    /// use iovmap::vfio::{VfioRegionInfo, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ};
    /// let info = VfioRegionInfo {
    ///     index: 2,
    ///     flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
    ///     size: 16 << 20,
    ///     offset: 2 << 40,
    ///     sparse_areas: None,
    /// };
    /// let mut remapper = iovmap::Remapper::new();
    /// let bar2 = remapper.register_vfio_region_info(&device, &info, bar)?;
    /// # let _ = bar2;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] (with context [`RegionContext::Vfio`]): the region cannot
    /// be mmapped ([`RegionError::Vfio`]), an area is not mapped at its address, overlaps
    /// a registered region... Nothing is registered then.
    pub fn register_vfio_region_info(
        &mut self,
        device_fd: impl AsFd,
        info: &VfioRegionInfo,
        addr: *const u8,
    ) -> Result<RegionId, Error> {
        let device_fd = device_fd.as_fd();
        let context = RegionContext::Vfio { index: info.index };
        let base = addr as usize;
        let whole = |kind: RegionError| Error::InvalidRegion {
            addr: base,
            len: usize::try_from(info.size).unwrap_or(usize::MAX),
            offset: info.offset,
            context,
            kind,
        };
        let page = crate::sys::page_size();
        let areas = mappable_areas(info, page).map_err(|e| whole(e.into()))?;
        let size = usize::try_from(info.size)
            .map_err(|_| whole(RegionInfoError::TooLarge { index: info.index, size: info.size }.into()))?;
        if base % page != 0 {
            return Err(whole(RegionError::Unaligned { page_size: page }));
        }
        if base.checked_add(size).is_none() {
            return Err(whole(RegionError::Wraps));
        }
        // Validate every area before anything is registered; the gaps become holes.
        let mut vmas = ProcessVmas::new();
        let anon = crate::remapper::anon_file_id();
        let mut spans: Vec<(RegionSpan, Option<BorrowedFd<'_>>)> = Vec::new();
        let mut cursor = 0u64;
        for &(offset, len) in &areas {
            let at = base + offset as usize;
            let fd_offset = info.offset.checked_add(offset).ok_or_else(|| whole(RegionError::OffsetOverflow))?;
            let span = self.check_region(at, len as usize, device_fd, fd_offset, &mut vmas, anon, context)?;
            if offset > cursor {
                spans.push((hole(base, cursor, offset, span), None));
            }
            cursor = offset + len;
            spans.push((span, Some(device_fd)));
        }
        if cursor < info.size {
            let last = spans.last().expect("at least one area").0;
            spans.push((hole(base, cursor, info.size, last), None));
        }
        self.commit(&spans, context, Some(VfioRegion { index: info.index, offset: info.offset }))
    }

    /// Registers one mmap of vfio region `index`: the `len` bytes at `addr`, which the VMM
    /// mapped from `device_fd` at `region_offset + offset_in_region` (`region_offset` is
    /// the region's offset in the device fd, as `VFIO_DEVICE_GET_REGION_INFO` reports
    /// it). For VMMs that mmap each area of a region on its own, at an address the kernel
    /// chooses (QEMU's `vfio_region_mmap`): one registration per mmap, unregistered with
    /// [`Remapper::unregister`] before the mmap goes. Runs there are fd-mapped where the
    /// clone is refused, and [`Remapper::dmabufs`] exports them through vfio-pci (Linux
    /// 6.19+), consecutive runs of one registration in one dma-buf.
    ///
    /// What is verified is as for [`Remapper::register`]: the device fd's file must be
    /// the file mapped at `addr`; the offset the kernel reports for a BAR mapping is
    /// driver-defined, so it is recorded, not compared with the fd offset.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let page = iovmap::page_size();
    /// # let memfd = unsafe { libc::memfd_create(c"stand-in".as_ptr(), libc::MFD_CLOEXEC) };
    /// # assert!(unsafe { libc::ftruncate(memfd, 8 * page as i64) } == 0);
    /// # let device = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(memfd) };
    /// // A memfd stands in for the device fd; region 2 starts at 4 pages in it, and the
    /// // VMM mapped the region's second and third pages.
    /// let (region_offset, in_region) = (4 * page as u64, page as u64);
    /// let bar = unsafe { libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
    ///     libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&device), (region_offset + in_region) as i64) };
    /// let mut remapper = iovmap::Remapper::new();
    /// let id = remapper.register_vfio_mmap(&device, 2, region_offset, in_region, bar.cast(), 2 * page)?;
    /// let r = remapper.regions().next().unwrap();
    /// assert_eq!((r.id, r.offset), (id, 5 * page as u64));
    /// # unsafe { libc::munmap(bar, 2 * page) };
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] (with context [`RegionContext::Vfio`]), as for
    /// [`Remapper::register`]: unaligned, not mapped, not the device's file, an overlap,
    /// an offset that overflows. Nothing is registered then.
    pub fn register_vfio_mmap(
        &mut self,
        device_fd: impl AsFd,
        index: u32,
        region_offset: u64,
        offset_in_region: u64,
        addr: *const u8,
        len: usize,
    ) -> Result<RegionId, Error> {
        let device_fd = device_fd.as_fd();
        let context = RegionContext::Vfio { index };
        let fd_offset = region_offset.checked_add(offset_in_region).ok_or(Error::InvalidRegion {
            addr: addr as usize,
            len,
            offset: region_offset,
            context,
            kind: RegionError::OffsetOverflow,
        })?;
        let anon = crate::remapper::anon_file_id();
        let span =
            self.check_region(addr as usize, len, device_fd, fd_offset, &mut ProcessVmas::new(), anon, context)?;
        self.commit(&[(span, Some(device_fd))], context, Some(VfioRegion { index, offset: region_offset }))
    }

    /// Registers BAR `index` of `device`, which the VMM has mmapped at `addr` (the whole
    /// region, or its sparse areas each at `addr + area offset`), honouring the region's
    /// flags and sparse-mmap capability. See [`Remapper::register_vfio_region_info`].
    ///
    /// ```no_run
    /// # fn f(device: &vfio_ioctls::VfioDevice, bar2: *const u8) -> Result<(), iovmap::Error> {
    /// let mut remapper = iovmap::Remapper::new();
    /// let id = remapper.register_vfio_region(device, 2, bar2)?;
    /// # let _ = id;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Remapper::register_vfio_region_info`].
    #[cfg(feature = "vfio")]
    pub fn register_vfio_region(
        &mut self,
        device: &vfio_ioctls::VfioDevice,
        index: u32,
        addr: *const u8,
    ) -> Result<RegionId, Error> {
        use std::os::fd::AsRawFd;
        let info = info_of(device, index);
        // SAFETY: `device` owns this fd and outlives the borrow, which ends with this call
        // (registration duplicates the fd).
        let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        self.register_vfio_region_info(fd, &info, addr)
    }
}

/// What a `VfioDevice` knows about region `index`.
#[cfg(feature = "vfio")]
fn info_of(device: &vfio_ioctls::VfioDevice, index: u32) -> VfioRegionInfo {
    let sparse_areas = device.get_region_caps(index).into_iter().find_map(|cap| match cap {
        vfio_ioctls::VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.iter().map(|a| (a.offset, a.size)).collect()),
        _ => None,
    });
    VfioRegionInfo {
        index,
        flags: device.get_region_flags(index),
        size: device.get_region_size(index),
        offset: device.get_region_offset(index),
        sparse_areas,
    }
}

/// The unmappable part `[from, to)` of a region mapped at `base`, next to area `near`.
fn hole(base: usize, from: u64, to: u64, near: RegionSpan) -> RegionSpan {
    RegionSpan { start: base + from as usize, end: base + to as usize, mappable: false, ..near }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMAP_RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;

    fn info(size: u64, sparse: Option<Vec<(u64, u64)>>) -> VfioRegionInfo {
        VfioRegionInfo { index: 0, flags: MMAP_RW, size, offset: 0, sparse_areas: sparse }
    }

    #[test]
    fn a_whole_region_is_one_area() {
        assert_eq!(mappable_areas(&info(0x100000, None), 4096), Ok(vec![(0, 0x100000)]));
    }

    #[test]
    fn without_the_mmap_flag_nothing_is_mappable() {
        let i =
            VfioRegionInfo { flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, ..info(0x1000, None) };
        let e = mappable_areas(&i, 4096).unwrap_err();
        assert_eq!(e, RegionInfoError::NotMmappable { index: 0, flags: i.flags });
        let text = e.to_string();
        assert!(text.contains("VFIO_REGION_INFO_FLAG_MMAP") && text.contains("region 0"), "{text}");
    }

    #[test]
    fn sparse_areas_are_sorted_and_empty_ones_dropped() {
        let i = info(0x10000, Some(vec![(0x8000, 0x8000), (0x1000, 0), (0, 0x2000)]));
        assert_eq!(mappable_areas(&i, 4096), Ok(vec![(0, 0x2000), (0x8000, 0x8000)]));
    }

    #[test]
    fn malformed_areas_are_refused() {
        for (sparse, says) in [
            (vec![], "no mmappable area"),
            (vec![(0, 0)], "no mmappable area"),
            (vec![(0xf000, 0x2000)], "past the region"),
            (vec![(u64::MAX - 10, 20)], "past the region"),
            (vec![(0x800, 0x1000)], "not page aligned"),
            (vec![(0, 0x1800)], "not page aligned"),
            (vec![(0, 0x4000), (0x2000, 0x4000)], "overlap"),
        ] {
            let e = mappable_areas(&info(0x10000, Some(sparse.clone())), 4096).unwrap_err().to_string();
            assert!(e.contains(says), "{sparse:x?}: {e}");
        }
        assert_eq!(mappable_areas(&info(0, None), 4096), Err(RegionInfoError::Empty { index: 0 }));
    }
}
