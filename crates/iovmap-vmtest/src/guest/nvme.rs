//! QEMU's nvme BAR0: registers and an MSI-X table, the sparse-mmap candidate.

use iovmap::{Error, MapOptions, Remapper};
use iovmap_vmtest::device::{self, Device};
use iovmap_vmtest::mem::{SharedRam, page};
use iovmap_vmtest::pattern;
use iovmap_vmtest::report::Checks;

/// QEMU's nvme BAR0 holds its registers and its MSI-X table: the candidate for a sparse
/// mmap (an MSI-X table left out of the mappable areas). Whatever vfio-pci reports, the
/// BAR is registered and mapped into a view with RAM, and two stable registers (CAP and
/// VS) read the same through the view as through the BAR mapping.
pub(super) fn nvme(bdf: &str, ram: &SharedRam, c: &mut Checks) {
    let dev = match Device::open(bdf) {
        Ok(d) => d,
        Err(e) => {
            c.fail("nvme-bar0", format_args!("open {bdf}: {e}"));
            return;
        }
    };
    for i in 0..6 {
        let r = dev.region(i);
        if r.size > 0 {
            c.info(format_args!("nvme {r}"));
        }
    }
    let msix = msix_table(&dev);
    c.info(format_args!(
        "nvme MSI-X: {}",
        msix.map_or("no MSI-X capability".into(), |(bir, off, n)| format!(
            "table in BAR{bir} at {off:#x}, {n} entries ({:#x} bytes)",
            n * 16
        ))
    ));
    let r0 = dev.region(0);
    let bar0 = match dev.map_region(0) {
        Ok(b) => b,
        Err(e) => {
            c.fail("nvme-bar0", e);
            return;
        }
    };
    let mut remapper = Remapper::new();
    if let Err(e) = remapper.register_vfio_region(&dev.device, 0, bar0.ptr()) {
        c.fail("nvme-bar0", format_args!("register_vfio_region(&nvme, 0, bar0): {e}"));
        return;
    }
    let p = page();
    let reg = |base: *const u8, off: usize| -> u32 {
        // SAFETY: `base + off` is a 4-byte register inside a live mapping of BAR0.
        unsafe { base.add(off).cast::<u32>().read_volatile() }
    };
    match &r0.sparse {
        Some(areas) => {
            c.info(format_args!("nvme BAR0 has VFIO_REGION_INFO_CAP_SPARSE_MMAP: {areas:x?}"));
            let hole = areas
                .windows(2)
                .map(|w| w[0].0 + w[0].1)
                .chain(areas.last().map(|l| l.0 + l.1).filter(|&e| e < r0.size))
                .find(|&h| !areas.iter().any(|&(o, s)| (o..o + s).contains(&h)));
            let Some(hole) = hole else {
                c.fail("sparse-mmap-hole", "sparse areas with no hole between or after them");
                return;
            };
            let in_hole = [
                libc::iovec { iov_base: ram.ptr().cast(), iov_len: p },
                libc::iovec { iov_base: bar0.ptr().wrapping_add(hole as usize).cast(), iov_len: p },
            ];
            let res = remapper.map(&in_hole).map(drop);
            c.check(
                "sparse-mmap-hole",
                match res {
                    Err(Error::DeviceHole { index: 1 }) => {
                        Ok(format!("a segment at BAR0+{hole:#x} (not mmappable) -> DeviceHole {{ index: 1 }}"))
                    }
                    other => Err(format!("segment in the hole at {hole:#x}: {other:?}")),
                },
            );
            let around: Vec<libc::iovec> = areas
                .iter()
                .flat_map(|&(o, _)| {
                    [
                        libc::iovec { iov_base: bar0.ptr().wrapping_add(o as usize).cast(), iov_len: p },
                        libc::iovec { iov_base: ram.ptr().wrapping_add(p).cast(), iov_len: p },
                    ]
                })
                .collect();
            let res = remapper.map_with(&around, MapOptions::new().read_only());
            c.check(
                "sparse-mmap-areas",
                res.map_err(|e| e.to_string()).and_then(|v| {
                    let s = *v.stats();
                    if s.fd_mapped != areas.len() {
                        return Err(format!("{s:?}: want one fd run per area"));
                    }
                    if areas[0].0 == 0
                        && (reg(v.as_ptr(), 0), reg(v.as_ptr(), 8)) != (reg(bar0.ptr(), 0), reg(bar0.ptr(), 8))
                    {
                        return Err("CAP/VS differ between the view and the BAR mapping".into());
                    }
                    Ok(format!("the first page of every area maps: {s:?}"))
                }),
            );
        }
        None => {
            c.skip(
                "sparse-mmap",
                format_args!(
                    "nvme BAR0 has no VFIO_REGION_INFO_CAP_SPARSE_MMAP in this guest ({r0}): vfio-pci lets the whole \
                     BAR, MSI-X table included, be mmapped, so there is no hole to test"
                ),
            );
        }
    }
    // Registers and the MSI-X table page, through a view with a RAM page between.
    let table = msix.filter(|m| m.0 == 0).map_or(0, |m| m.1 as usize & !(p - 1));
    let list = [
        libc::iovec { iov_base: bar0.ptr().cast(), iov_len: p },
        libc::iovec { iov_base: ram.ptr().cast(), iov_len: p },
        libc::iovec { iov_base: bar0.ptr().wrapping_add(table).cast(), iov_len: p },
    ];
    let table_in_hole =
        r0.sparse.as_ref().is_some_and(|a| !a.iter().any(|&(o, s)| (o..o + s).contains(&(table as u64))));
    let list = if table_in_hole || table == 0 { &list[..2] } else { &list[..] };
    let res = remapper.map_with(list, MapOptions::new().read_only());
    c.check(
        "nvme-bar0-view",
        res.map_err(|e| e.to_string()).and_then(|v| {
            let s = *v.stats();
            let bar_runs = list.len().div_ceil(2);
            if s.fd_mapped != bar_runs || s.cloned != 1 {
                return Err(format!("{s:?}: want {bar_runs} fd runs and 1 clone"));
            }
            let through_view = (reg(v.as_ptr(), 0), reg(v.as_ptr(), 4), reg(v.as_ptr(), 8));
            let through_bar = (reg(bar0.ptr(), 0), reg(bar0.ptr(), 4), reg(bar0.ptr(), 8));
            if through_view != through_bar || through_bar.2 == 0 {
                return Err(format!("CAP/VS through the view {through_view:x?}, through the BAR {through_bar:x?}"));
            }
            let table_note = if list.len() == 3 {
                // SAFETY: the third page of the view is the MSI-X table page, mapped read-only.
                let same = unsafe { pattern::compare(v.as_ptr().add(2 * p), bar0.ptr().add(table), p) }.is_none();
                if !same {
                    return Err("the MSI-X table page differs between the view and the BAR mapping".into());
                }
                format!(", and the MSI-X table page (BAR0+{table:#x}) maps and reads the same")
            } else {
                String::new()
            };
            Ok(format!(
                "{s:?}: CAP {:#010x}{:08x} VS {:#x} read the same through the view and the BAR mapping{table_note}",
                through_bar.1, through_bar.0, through_bar.2
            ))
        }),
    );
}

/// (BAR, offset, entries) of the MSI-X table, from the device's PCI config space.
fn msix_table(dev: &Device) -> Option<(u32, u32, u32)> {
    let mut cfg = [0u8; 256];
    dev.device.region_read(device::CONFIG_REGION, &mut cfg, 0);
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    let mut at = (cfg[0x34] & !3) as usize;
    for _ in 0..48 {
        if !(0x40..=0xfc).contains(&at) {
            return None;
        }
        if cfg[at] == 0x11 {
            let table = u32_at(at + 4);
            return Some((table & 7, table & !7, u32::from(u16_at(at + 2) & 0x7ff) + 1));
        }
        at = (cfg[at + 1] & !3) as usize;
    }
    None
}
