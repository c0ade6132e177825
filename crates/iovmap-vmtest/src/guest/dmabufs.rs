//! dma-bufs of BAR runs (issue 12): `Remapper::dmabufs` exports them through vfio-pci
//! (`VFIO_DEVICE_FEATURE_DMA_BUF`, Linux 6.19+) where the kernel can, and says why not
//! where it cannot. vfio gives such a dma-buf no CPU mapping, so its bytes cannot be read
//! back here: what is checked is what the kernel says of it in /proc/self/fdinfo (its
//! size and exporter).

use std::os::fd::AsRawFd;

use iovmap::{Error, KernelBuiltError, Remapper};
use iovmap_vmtest::facts;
use iovmap_vmtest::layout::{Piece, Src};
use iovmap_vmtest::mem::page;
use iovmap_vmtest::report::Checks;

use super::Guest;

impl Guest {
    pub(super) fn bar_dmabufs(&self, remapper: &Remapper, c: &mut Checks) {
        self.bar_dmabufs_of("bar-dmabufs", remapper, c);
        // The BAR registered as one mmap of region 2 (what QEMU's vfio code holds: the
        // device fd, the region's index and offset, the mmap's offset in it).
        let r2 = self.dev.region(2);
        let mut per_mmap = Remapper::new();
        match per_mmap.register_vfio_mmap(
            // SAFETY: the device owns the fd and outlives the call (registration dups it).
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.dev.device.as_raw_fd()) },
            2,
            r2.offset,
            0,
            self.bar.ptr(),
            self.bar.len(),
        ) {
            Ok(_) => self.bar_dmabufs_of("bar-dmabufs-per-mmap", &per_mmap, c),
            Err(e) => {
                c.check("bar-dmabufs-per-mmap", Err(format!("register_vfio_mmap of BAR2: {e}")));
            }
        }
    }

    fn bar_dmabufs_of(&self, name: &str, remapper: &Remapper, c: &mut Checks) {
        let p = page();
        // Two runs of BAR2 (three pages): one export with two ranges.
        let list = [
            Piece { src: Src::Bar, off: 4 * p, len: p },
            Piece { src: Src::Bar, off: 9 * p, len: p },
            Piece { src: Src::Bar, off: 10 * p, len: p },
        ];
        let exports = facts::vfio_dmabuf_of(self.dev.device.as_raw_fd());
        let res = remapper.dmabufs(&self.iov(&list));
        c.check(
            name,
            match (&res, exports.yes) {
                (Ok(bufs), true) => match bufs.buffers() {
                    [b] if b.offset() == 0 && b.len() == 3 * p => fdinfo_size(b.fd().as_raw_fd()).and_then(|size| {
                        let exporter = b.exporter().map_err(|e| format!("exporter: {e}"))?;
                        if size == (3 * p) as u64 && exporter.contains("vfio") {
                            Ok(format!("one dma-buf of 2 BAR runs ({size} bytes, exporter {exporter}); {exports}"))
                        } else {
                            Err(format!("fdinfo says size {size}, exporter {exporter}"))
                        }
                    }),
                    other => Err(format!("want one dma-buf of {:#x} bytes at 0, got {other:?}", 3 * p)),
                },
                (
                    Err(e @ Error::KernelBuilt { index: 0, reason: KernelBuiltError::BarExportRefused { .. } }),
                    false,
                ) => Ok(format!("this kernel does not export BARs ({exports}): \"{e}\"")),
                _ => Err(format!("{res:?} where {exports}")),
            },
        );
    }
}

/// The size /proc/self/fdinfo gives a dma-buf.
fn fdinfo_size(fd: i32) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|e| format!("fdinfo: {e}"))?;
    let size = text.lines().find_map(|l| l.strip_prefix("size:")).ok_or(format!("no size: in {text}"))?;
    size.trim().parse().map_err(|e| format!("size: {e}"))
}
