//! Registering the BAR (and what is refused), and unregistering it.

use iovmap::vfio::RegionInfoError;
use iovmap::{Error, RegionError, Remapper};
use iovmap_vmtest::device;
use iovmap_vmtest::layout;
use iovmap_vmtest::mem::page;
use iovmap_vmtest::report::Checks;

use super::Guest;

impl Guest {
    pub(super) fn registration(&self, remapper: &mut Remapper, c: &mut Checks) {
        let r2 = self.dev.region(2);
        let res = remapper.register_vfio_region(&self.dev.device, 2, self.bar.ptr());
        let regions: Vec<_> = remapper.regions().map(|g| (g.addr, g.len, g.offset)).collect();
        c.check(
            "register-bar2",
            match res {
                Ok(_) if regions == [(self.bar.ptr() as *const u8, r2.size as usize, r2.offset)] => Ok(format!(
                    "register_vfio_region(&device, 2, bar2): one region {:#x} bytes at fd offset {:#x}",
                    r2.size, r2.offset
                )),
                other => Err(format!("{other:?}, regions {regions:?}")),
            },
        );
        let again = remapper.register_vfio_region(&self.dev.device, 2, self.bar.ptr());
        let shifted = Remapper::new().register_vfio_region(&self.dev.device, 2, self.bar.ptr().wrapping_add(page()));
        c.check(
            "register-refuses-bad-input",
            match (&again, &shifted) {
                (
                    Err(a @ Error::InvalidRegion { kind: RegionError::Overlap { .. }, .. }),
                    Err(
                        b @ Error::InvalidRegion {
                            kind: RegionError::NotMapped { .. } | RegionError::Private { .. } | RegionError::NotTheFile { .. },
                            ..
                        },
                    ),
                ) => Ok(format!("twice: \"{a}\"; one page off: \"{b}\"")),
                _ => Err(format!("twice: {again:?}; one page off: {shifted:?}")),
            },
        );
    }

    /// ivshmem BAR0 is a 256-byte register window; vfio-pci may or may not let it be
    /// mmapped (it does when the BAR sits alone on its page). The config space region
    /// never is.
    pub(super) fn region_without_mmap(&self, c: &mut Checks) {
        let bar0 = self.dev.region(0);
        let mut tried = Vec::new();
        let mut bad = Vec::new();
        // BAR1 does not exist on ivshmem-plain (size 0, flags 0); region 7 is config space.
        let mut regions = vec![1, device::CONFIG_REGION];
        if !bar0.mmap() {
            regions.insert(0, 0);
        } else {
            let r = Remapper::new().register_vfio_region(&self.dev.device, 0, self.bar.ptr());
            c.info(format_args!(
                "ivshmem BAR0 is mmappable here ({bar0}); registering it (at any address) gives: {}",
                r.as_ref().map_or_else(|e| e.to_string(), |_| "Ok".into())
            ));
        }
        for index in regions {
            let mut r = Remapper::new();
            let res = r.register_vfio_region(&self.dev.device, index, self.bar.ptr());
            match &res {
                Err(e @ Error::InvalidRegion { kind: RegionError::Vfio(RegionInfoError::NotMmappable { .. }), .. })
                    if r.regions().count() == 0 =>
                {
                    tried.push(format!("region {index} (flags {:#x}): \"{e}\"", self.dev.region(index).flags));
                }
                other => bad.push(format!("region {index}: {other:?}")),
            }
        }
        c.check("region-without-mmap", if bad.is_empty() { Ok(tried.join("; ")) } else { Err(bad.join("; ")) });
    }

    pub(super) fn unregister(&self, remapper: &mut Remapper, c: &mut Checks) {
        let list = &layout::second_list(page());
        let view = match remapper.map(&self.iov(list)) {
            Ok(v) => v,
            Err(e) => {
                c.fail("unregister", format_args!("map before unregister: {e}"));
                return;
            }
        };
        let bar = remapper.regions().find(|g| g.addr == self.bar.ptr().cast_const()).map(|g| g.id);
        let r = bar.map(|id| remapper.unregister(id));
        let left = remapper.regions().count();
        let after = remapper.map(&self.iov(&list[1..2])).map(drop);
        Self::write_view(&view, list, layout::SEED_VIA_VIEW);
        let aliased = self.sources_hold(list, layout::SEED_VIA_VIEW);
        drop(view);
        c.check(
            "unregister",
            match (&r, left, &after, &aliased) {
                (Some(Ok(())), 0, Err(Error::NoFallback { index: 0, .. }), Ok(())) => {
                    Ok("unregister(bar2): no regions left, a new BAR view -> NoFallback, the view built before still \
                     aliases the BAR and RAM both ways"
                        .into())
                }
                _ => Err(format!("unregister {r:?}, {left} regions left, map after {after:?}, old view {aliased:?}")),
            },
        );
    }
}
