//! # iovmap: one contiguous view of a scatter list, without copying a byte
//!
//! A virtual machine monitor holds guest buffers (virtio-gpu blobs, DMA regions,
//! framebuffers) as iovec lists over guest RAM (memfd, shmem, hugetlbfs) and device BARs
//! (vfio-pci). iovmap maps such a list into one contiguous range of host virtual memory
//! that aliases the original pages:
//!
//! - each run of the list is *cloned* into a reserved range with
//!   `mremap(src, 0, len, MREMAP_FIXED | MREMAP_MAYMOVE, dst)`;
//! - where the kernel refuses the clone (vfio-pci BARs and other VM_PFNMAP /
//!   VM_DONTEXPAND mappings: EFAULT; hugetlbfs: EINVAL), the registered fd is mapped at
//!   the right offset instead, and the refusal is remembered;
//! - adjacent segments of one mapping are coalesced into one run, segments that span two
//!   mappings are split, private memory is refused before anything is mapped, and every
//!   error leaves nothing behind.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let page = iovmap::page_size();
//! // Shared guest RAM of 8 pages.
//! let ram = unsafe {
//!     libc::mmap(std::ptr::null_mut(), 8 * page, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
//! } as *mut u8;
//! for i in 0..8 { unsafe { ram.add(i * page).write(i as u8) } }
//! // A scatter list: pages 6, 2, 3 (2 and 3 are adjacent: one run).
//! let iov = |p: usize| libc::iovec { iov_base: unsafe { ram.add(p * page) }.cast(), iov_len: page };
//! let remapper = iovmap::Remapper::new();
//! let view = remapper.map(&[iov(6), iov(2), iov(3)])?;
//! assert_eq!(view.len(), 3 * page);
//! assert_eq!(view.stats().runs, 2);
//! for (i, want) in [6u8, 2, 3].into_iter().enumerate() {
//!     assert_eq!(unsafe { view.as_ptr().add(i * page).read_volatile() }, want);
//! }
//! drop(view);
//! # unsafe { libc::munmap(ram.cast(), 8 * page) };
//! # Ok(()) }
//! ```
//!
//! Where things are: `plan.rs` (pure: validate, split, coalesce, lay out), `strategy.rs`
//! (how each run is placed, decided without a syscall), `place.rs` (the mapping loop),
//! `sys.rs` (every syscall), [`Remapper`] (the registered fds), [`View`] (the result).
//! `docs/design.md` in the repository explains the kernel matrix and the error model.
//!
//! # Cargo features
//!
//! - `vm-memory` (default): [`Remapper::from_guest_memory`], `Remapper::map_guest`
//!   (guest-physical scatter lists) and `VolatileMemory` for [`View`].
//! - `vfio`: `Remapper::register_vfio_region(&VfioDevice, ..)` (vfio-ioctls without its
//!   KVM/MSHV backends). [`Remapper::register_vfio_region_info`] needs no feature.
//! - `unstable-internals`: the planner (`plan`), the maps parser (`maps`) and
//!   `Remapper::plan`, for the fuzz targets and benchmarks. Not covered by semver.
//! - `fault-injection`: `fault`, which makes a chosen syscall of the map path fail (tests
//!   and fuzzing only; never in a product build). Not covered by semver.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod dmabuf;
mod error;
#[cfg(feature = "fault-injection")]
#[cfg_attr(docsrs, doc(cfg(feature = "fault-injection")))]
pub mod fault;
#[cfg(feature = "vm-memory")]
mod guest_memory;
mod headroom;
mod holes;
mod options;
mod place;
#[cfg(feature = "unstable-internals")]
#[cfg_attr(docsrs, doc(cfg(feature = "unstable-internals")))]
pub mod plan;
#[cfg(not(feature = "unstable-internals"))]
mod plan;
mod regions;
mod remapper;
mod reservation;
mod strategy;
mod sys;
mod udmabuf;
pub mod userfaultfd;
pub mod vfio;
mod view;
mod vma;

pub use dmabuf::{DmaBuf, DmaBufs, dmabuf_exporter};
pub use error::{Error, Operation, RegionContext, RegionError};
pub use options::{Access, MapOptions, Placement};
pub use regions::{FileId, RegionId};
pub use remapper::{RegisteredRegion, Remapper, map};
pub use udmabuf::KernelBuiltError;
pub use view::{MapStats, View};

#[cfg(feature = "unstable-internals")]
#[cfg_attr(docsrs, doc(cfg(feature = "unstable-internals")))]
pub use holes::kernel_punches_holes;

/// Parsers for the kernel's text about mappings (exposed for fuzzing and tools).
#[cfg(feature = "unstable-internals")]
#[cfg_attr(docsrs, doc(cfg(feature = "unstable-internals")))]
pub mod maps {
    pub use crate::vma::{format_maps_line, parse_maps, parse_maps_line};
}

// The examples of the READMEs and the integration guide are compiled as doctests (the
// repository's files only where they exist: a packaged crate has its own README alone).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct CrateReadmeExample;

#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;

#[cfg(all(doctest, feature = "vm-memory", feature = "vfio"))]
#[doc = include_str!("../../../docs/vmm-integration.md")]
struct VmmIntegrationGuide;

/// The base page size of this machine.
///
/// ```
/// assert!(iovmap::page_size().is_power_of_two());
/// ```
pub fn page_size() -> usize {
    sys::page_size()
}
