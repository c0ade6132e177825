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
            "bar-dmabufs",
            match (&res, exports.yes) {
                (Ok(bufs), true) => match bufs.buffers() {
                    [b] if b.offset() == 0 && b.len() == 3 * p => {
                        fdinfo(b.fd().as_raw_fd()).and_then(|(size, exporter)| {
                            if size == (3 * p) as u64 && exporter.contains("vfio") {
                                Ok(format!("one dma-buf of 2 BAR runs ({size} bytes, exporter {exporter}); {exports}"))
                            } else {
                                Err(format!("fdinfo says size {size}, exporter {exporter}"))
                            }
                        })
                    }
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

/// What /proc/self/fdinfo says of a dma-buf: its size and its exporter's name.
fn fdinfo(fd: i32) -> Result<(u64, String), String> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|e| format!("fdinfo: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or(format!("no {name} in {text}"))
    };
    let size = field("size:")?.parse().map_err(|e| format!("size: {e}"))?;
    Ok((size, field("exp_name:")?))
}
