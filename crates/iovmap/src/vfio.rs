//! vfio regions: registering the BARs a VMM mmapped from a vfio device fd.
//!
//! What `VFIO_DEVICE_GET_REGION_INFO` says about a region decides what can be
//! registered: nothing unless it carries `VFIO_REGION_INFO_FLAG_MMAP`; with a sparse-mmap
//! capability, only its mmappable areas (the gaps, such as an MSI-X table, become holes
//! that a view refuses). That decision is the pure [`mappable_areas`];
//! [`Remapper::register_vfio_region_info`] applies it for any device fd, and
//! `Remapper::register_vfio_region` (feature `vfio`) reads the info from a
//! `vfio_ioctls::VfioDevice`.

use std::os::fd::BorrowedFd;

use crate::error::Error;
use crate::regions::{Region, RegionSpan};
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
/// assert_eq!(iovmap::vfio::mappable_areas(&bar2, 4096), Ok(vec![(0, 16 << 20)]));
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

/// The parts of a region that may be registered, as `(offset in region, size)`, sorted.
///
/// ```
/// use iovmap::vfio::{mappable_areas, VfioRegionInfo, VFIO_REGION_INFO_FLAG_MMAP};
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
/// assert!(mappable_areas(&no_mmap, 4096).unwrap_err().contains("VFIO_REGION_INFO_FLAG_MMAP"));
/// ```
///
/// # Errors
/// A reason, when the region cannot be mmapped at all, or its areas are malformed.
pub fn mappable_areas(info: &VfioRegionInfo, page_size: usize) -> Result<Vec<(u64, u64)>, String> {
    let n = info.index;
    if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(format!(
            "vfio region {n} cannot be mmapped (flags {:#x} lack VFIO_REGION_INFO_FLAG_MMAP): the VMM traps its \
             accesses, so it cannot be part of a view",
            info.flags
        ));
    }
    if info.size == 0 {
        return Err(format!("vfio region {n} has size 0"));
    }
    let page = page_size as u64;
    let mut areas: Vec<(u64, u64)> = match &info.sparse_areas {
        None => vec![(0, info.size)],
        Some(a) => a.iter().copied().filter(|&(_, size)| size > 0).collect(),
    };
    if areas.is_empty() {
        return Err(format!("vfio region {n} has a sparse-mmap capability with no mmappable area"));
    }
    areas.sort_unstable();
    let mut end_of_previous = 0;
    for &(offset, size) in &areas {
        let end = offset.checked_add(size).filter(|&e| e <= info.size);
        let Some(end) = end else {
            return Err(format!(
                "vfio region {n}: mmappable area [{offset:#x}, +{size:#x}) runs past the region's size {:#x}",
                info.size
            ));
        };
        if offset % page != 0 || size % page != 0 {
            return Err(format!("vfio region {n}: mmappable area [{offset:#x}, +{size:#x}) is not page aligned"));
        }
        if offset < end_of_previous {
            return Err(format!("vfio region {n}: mmappable areas overlap at {offset:#x}"));
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
    /// [`Remapper::unregister`]`(addr)` removes all of it.
    ///
    /// This is what `register_vfio_region` does with the info it reads from a
    /// `vfio_ioctls::VfioDevice`; VMMs with their own vfio code call it directly.
    ///
    /// ```no_run
    /// # use std::os::fd::AsFd;
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
    /// remapper.register_vfio_region_info(device.as_fd(), &info, bar)?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`]: the region cannot be mmapped, an area is not mapped at
    /// its address, overlaps a registered region... Nothing is registered then.
    pub fn register_vfio_region_info(
        &mut self,
        device_fd: BorrowedFd<'_>,
        info: &VfioRegionInfo,
        addr: *const u8,
    ) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidRegion { reason };
        let page = crate::sys::page_size();
        let areas = mappable_areas(info, page).map_err(invalid)?;
        let base = addr as usize;
        let size =
            usize::try_from(info.size).map_err(|_| invalid(format!("vfio region {} is too large", info.index)))?;
        if base % page != 0 || base.checked_add(size).is_none() {
            return Err(invalid(format!("vfio region {} mapped at {base:#x}: not page aligned or wraps", info.index)));
        }
        // Validate every area (and take its fd) before anything is inserted.
        let mut vmas = ProcessVmas::new();
        let anon = crate::remapper::anon_file_id();
        let mut spans = Vec::new();
        let mut cursor = 0u64;
        for &(offset, len) in &areas {
            let at = base + offset as usize;
            let fd_offset = info.offset.checked_add(offset).ok_or_else(|| invalid("fd offset overflows".into()))?;
            let span = self
                .check_region(at, len as usize, device_fd, fd_offset, &mut vmas, anon)
                .map_err(|e| in_region(e, info.index))?;
            if offset > cursor {
                spans.push(hole(base, cursor, offset, span));
            }
            cursor = offset + len;
            spans.push(span);
        }
        if cursor < info.size {
            let last = *spans.last().expect("at least one area");
            spans.push(hole(base, cursor, info.size, last));
        }
        for s in spans.iter().filter(|s| !s.mappable) {
            if let Some(other) = self.regions.overlapping(s.start, s.end) {
                return Err(invalid(format!(
                    "vfio region {}: its unmappable part [{:#x}, {:#x}) overlaps the region [{:#x}, {:#x}) registered \
                     earlier: unregister it first",
                    info.index, s.start, s.end, other.start, other.end
                )));
            }
        }
        let mut fds = Vec::new();
        for s in &spans {
            fds.push(if s.mappable {
                Some(
                    crate::sys::dup_cloexec(device_fd)
                        .map_err(|e| invalid(format!("cannot duplicate the device fd: {e}")))?,
                )
            } else {
                None
            });
        }
        let group = self.regions.new_group();
        for (span, fd) in spans.into_iter().zip(fds) {
            let region = Region::new(span, fd, group);
            crate::holes::learn_at_registration(&region);
            self.regions.insert(region);
        }
        Ok(())
    }

    /// Registers BAR `index` of `device`, which the VMM has mmapped at `addr` (the whole
    /// region, or its sparse areas each at `addr + area offset`), honouring the region's
    /// flags and sparse-mmap capability. See [`Remapper::register_vfio_region_info`].
    ///
    /// ```no_run
    /// # fn f(device: &vfio_ioctls::VfioDevice, bar2: *const u8) -> Result<(), iovmap::Error> {
    /// let mut remapper = iovmap::Remapper::new();
    /// remapper.register_vfio_region(device, 2, bar2)?;
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
    ) -> Result<(), Error> {
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
    RegionSpan {
        start: base + from as usize,
        end: base + to as usize,
        offset: near.offset,
        file: near.file,
        page_size: near.page_size,
        mappable: false,
    }
}

fn in_region(e: Error, index: u32) -> Error {
    match e {
        Error::InvalidRegion { reason } => Error::InvalidRegion { reason: format!("vfio region {index}: {reason}") },
        other => other,
    }
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
        assert!(e.contains("VFIO_REGION_INFO_FLAG_MMAP") && e.contains("region 0"), "{e}");
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
            let e = mappable_areas(&info(0x10000, Some(sparse.clone())), 4096).unwrap_err();
            assert!(e.contains(says), "{sparse:x?}: {e}");
        }
        assert!(mappable_areas(&info(0, None), 4096).unwrap_err().contains("size 0"));
    }
}
