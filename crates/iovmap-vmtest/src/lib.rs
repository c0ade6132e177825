//! iovmap on a real vfio-pci device.
//!
//! This crate holds the guest side of issue 7's VM test and the `vfio_passthrough`
//! example. `run.sh` boots a Linux 6.1 guest under QEMU (TCG, q35, an emulated Intel
//! IOMMU) with an ivshmem device whose BAR2 is a host file, binds it to vfio-pci, and runs
//! the `iovmap-vmtest` binary there: it opens the device with vfio-ioctls exactly as a VMM
//! does, mmaps BAR2 from the device fd, registers it with
//! [`iovmap::Remapper::register_vfio_region`], and checks views that mix BAR and memfd RAM
//! pieces byte for byte, their stats, their errors, and (the hole-safety stress test,
//! [`stress`]) that building them never damages a mapping iovmap does not own. After the
//! guest powers off, `iovmap-vmtest host-check` compares the host's backing file with the
//! image the guest must have left ([`layout::check_image`]).
//!
//! The library is what the guest program and the example share, and what the host's
//! `cargo test` can check without a device: patterns, the layout, the stress harness
//! (run against RAM views), `/proc` helpers and PCI address parsing.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod device;
pub mod facts;
pub mod layout;
pub mod mem;
pub mod pattern;
pub mod report;
pub mod stress;
