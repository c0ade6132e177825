//! Registering the BAR (and what is refused), and unregistering it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use iovmap::vfio::RegionInfoError;
use iovmap::{Error, RegionError, Remapper};
use iovmap_testkit::memfd;
use iovmap_vmtest::device;
use iovmap_vmtest::layout;
use iovmap_vmtest::mem::page;
use iovmap_vmtest::report::Checks;

use super::Guest;

/// What replaces a registered mapping: its name, mmap flags, and the file and offset.
type Replacement<'a> = (&'a str, libc::c_int, Option<(BorrowedFd<'a>, u64)>);

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

    /// A registration is never used for memory it does not describe (issue 10, item 9),
    /// tried on the BAR as a VMM that replaces a mapping without unregistering it would:
    /// the wrong fd is refused at registration, and a second mapping of BAR2, registered
    /// and then replaced (by shared anonymous memory, a memfd, the BAR at another offset),
    /// is refused at map time, naming the segment, instead of showing the old BAR.
    pub(super) fn registration_mismatches(&self, c: &mut Checks) {
        let r2 = self.dev.region(2);
        let len = self.bar.len();
        let memfd = match memfd("iovmap-vmtest-other", 0).and_then(|f| f.set_len(len as u64).map(|()| f)) {
            Ok(f) => f,
            Err(e) => return c.fail("register-wrong-fd", format_args!("memfd: {e}")),
        };
        let wrong_fd = Remapper::new().register(self.bar.ptr(), len, &memfd, r2.offset);
        c.check(
            "register-wrong-fd",
            match &wrong_fd {
                Err(e @ Error::InvalidRegion { kind: RegionError::NotTheFile { .. }, .. }) => {
                    Ok(format!("BAR2 with a memfd's fd: \"{e}\""))
                }
                other => Err(format!("BAR2 registered with a memfd's fd: {other:?}")),
            },
        );
        // SAFETY: the device fd is owned by `self.dev`, which outlives this function.
        let devfd = unsafe { BorrowedFd::borrow_raw(self.dev.device.as_raw_fd()) };
        let replacements: [Replacement<'_>; 3] = [
            ("shared anonymous memory", libc::MAP_SHARED | libc::MAP_ANONYMOUS, None),
            ("a memfd", libc::MAP_SHARED, Some((memfd.as_fd(), 0))),
            ("the BAR one page further on", libc::MAP_SHARED, Some((devfd, r2.offset + page() as u64))),
        ];
        let mut seen = Vec::new();
        for (what, flags, file) in replacements {
            let second = match self.dev.map_region(2) {
                Ok(m) => m,
                Err(e) => return c.fail("stale-bar-registration", format_args!("a second mapping of BAR2: {e}")),
            };
            let mut r = Remapper::new();
            if let Err(e) = r.register_vfio_region(&self.dev.device, 2, second.ptr()) {
                return c.fail("stale-bar-registration", format_args!("registering the second mapping: {e}"));
            }
            // What the replacement maps must be no longer than the file behind it.
            let span = if file.is_some_and(|(_, off)| off != 0) { len - page() } else { len };
            let (fd, off) = file.map_or((-1, 0), |(f, o)| (f.as_raw_fd(), o));
            // SAFETY: replaces our own second mapping of BAR2 (`second` unmaps the range
            // on drop, whatever is mapped there then); nothing else uses that range.
            let p = unsafe {
                libc::mmap(
                    second.ptr().cast(),
                    span,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED,
                    fd,
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return c.fail(
                    "stale-bar-registration",
                    format_args!("replacing the second mapping with {what}: {}", std::io::Error::last_os_error()),
                );
            }
            let list = [iovmap_testkit::iov(second.ptr().wrapping_add(2 * page()), page())];
            match r.map(&list) {
                Err(e @ Error::StaleRegion { index: 0, .. }) => seen.push(format!("{what}: \"{e}\"")),
                Ok(v) => {
                    return c.fail(
                        "stale-bar-registration",
                        format_args!("replaced by {what}, the registration still gave a view: {:?}", v.stats()),
                    );
                }
                Err(e) => {
                    return c
                        .fail("stale-bar-registration", format_args!("replaced by {what}: {e:?}, not StaleRegion"));
                }
            }
        }
        c.pass("stale-bar-registration", seen.join("; "));
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
