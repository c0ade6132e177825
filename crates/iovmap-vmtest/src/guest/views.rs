//! Views of the BAR and RAM: their stats, their bytes both ways, read-only views,
//! a fragmented view; and the helpers that compare a view with its sources.

use std::time::Instant;

use iovmap::{MapOptions, MapStats, Remapper, View};
use iovmap_vmtest::layout::{self, Expect, Piece};
use iovmap_vmtest::mem::{self, page};
use iovmap_vmtest::pattern;
use iovmap_vmtest::report::Checks;

use super::Guest;

impl Guest {
    /// Checks a view's stats against the list: segments, runs, BAR runs fd-mapped, RAM
    /// runs cloned.
    pub(super) fn stats_match(s: &MapStats, e: Expect) -> Result<(), String> {
        if (s.segments, s.runs, s.fd_mapped, s.cloned) == (e.segments, e.runs, e.bar_runs, e.ram_runs) {
            Ok(())
        } else {
            Err(format!(
                "stats {s:?}, want segments {} runs {} fd_mapped {} cloned {}",
                e.segments, e.runs, e.bar_runs, e.ram_runs
            ))
        }
    }

    /// Every byte of the view equals the byte of its source.
    pub(super) fn view_matches_sources(&self, view: &View, list: &[Piece]) -> Result<(), String> {
        let mut voff = 0;
        for (i, p) in list.iter().enumerate() {
            // SAFETY: the view is live and `[voff, voff + len)` is inside it; the source
            // piece is inside its live mapping.
            if let Some((k, a, b)) = unsafe { pattern::compare(view.as_ptr().add(voff), self.src(p), p.len) } {
                return Err(format!("segment {i} ({p:?}): view byte {:#x} is {a:#04x}, source has {b:#04x}", voff + k));
            }
            voff += p.len;
        }
        Ok(())
    }

    /// Every byte of the view holds pattern `seed` at its source offset.
    pub(super) fn view_holds(view: &View, list: &[Piece], seed: impl Fn(&Piece) -> u64) -> Result<(), String> {
        let mut voff = 0;
        for (i, p) in list.iter().enumerate() {
            // SAFETY: as in `view_matches_sources`.
            if let Some(m) = unsafe { pattern::find_mismatch(view.as_ptr().add(voff), p.len, seed(p), p.off as u64) } {
                return Err(format!(
                    "segment {i} ({p:?}): view byte {:#x} is {:#04x}, want {:#04x}",
                    voff + m.0,
                    m.1,
                    m.2
                ));
            }
            voff += p.len;
        }
        Ok(())
    }

    pub(super) fn sources_hold(&self, list: &[Piece], seed: u64) -> Result<(), String> {
        for (i, p) in list.iter().enumerate() {
            // SAFETY: the piece is inside its live source mapping.
            if let Some(m) = unsafe { pattern::find_mismatch(self.src(p), p.len, seed, p.off as u64) } {
                return Err(format!("segment {i} ({p:?}): source byte {:#x} is {:#04x}, want {:#04x}", m.0, m.1, m.2));
            }
        }
        Ok(())
    }

    pub(super) fn write_sources(&self, list: &[Piece], seed: u64) {
        for p in list {
            // SAFETY: the piece is inside its live, writable source mapping.
            unsafe { pattern::fill(self.src(p), p.len, seed, p.off as u64) };
        }
    }

    pub(super) fn write_view(view: &View, list: &[Piece], seed: u64) {
        let mut voff = 0;
        for p in list {
            let base = view.as_mut_ptr().expect("written views are read-write");
            // SAFETY: a read-write view, live; `[voff, voff + len)` is inside it.
            unsafe { pattern::fill(base.add(voff), p.len, seed, p.off as u64) };
            voff += p.len;
        }
    }

    pub(super) fn initial(p: &Piece) -> u64 {
        layout::initial_seed(p.src, p.off).unwrap_or(0)
    }

    pub(super) fn first_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::rw_list(page());
        let e = layout::expect(list);
        let t = Instant::now();
        let view = match remapper.map(&self.iov(list)) {
            Ok(v) => v,
            Err(err) => {
                c.fail("rw-view", format_args!("map of rw_list failed: {err}"));
                return;
            }
        };
        let took = t.elapsed();
        let s = *view.stats();
        c.check(
            "rw-view-stats",
            Self::stats_match(&s, e).and_then(|()| self.syscalls_match(&s, list, true)).and_then(|how| {
                if s.syscalls <= s.runs + 1 {
                    Ok(format!("{s:?} in {} us; first view of this Remapper: {how}; <= runs + 1", took.as_micros()))
                } else {
                    Err(format!("{s:?}: syscalls > runs + 1"))
                }
            }),
        );
        let len_ok =
            view.len() == list.iter().map(|p| p.len).sum::<usize>() && view.as_ptr() as usize % page() == 0x123;
        c.check(
            "rw-view-bytes",
            self.view_matches_sources(&view, list)
                .and_then(|()| Self::view_holds(&view, list, Self::initial))
                .and_then(|()| {
                    if len_ok { Ok(()) } else { Err(format!("len {:#x}, as_ptr {:p}", view.len(), view.as_ptr())) }
                })
                .map(|()| {
                    format!("{:#x} bytes, starting mid-page (+0x123), equal to the BAR and RAM pieces", view.len())
                }),
        );
        self.write_sources(list, layout::SEED_VIA_SOURCE);
        c.check(
            "rw-view-source-to-view",
            Self::view_holds(&view, list, |_| layout::SEED_VIA_SOURCE)
                .map(|()| "written through the BAR mapping and the RAM mapping, read through the view".into()),
        );
        Self::write_view(&view, list, layout::SEED_VIA_VIEW);
        c.check(
            "rw-view-view-to-source",
            self.sources_hold(list, layout::SEED_VIA_VIEW)
                .map(|()| "written through the view, read through the BAR mapping and the RAM mapping".into()),
        );
    }

    pub(super) fn later_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::second_list(page());
        let t = Instant::now();
        let res = remapper.map(&self.iov(list));
        let took = t.elapsed();
        c.check(
            "later-view",
            res.map_err(|e| e.to_string()).and_then(|view| {
                let s = *view.stats();
                Self::stats_match(&s, layout::expect(list))?;
                self.view_matches_sources(&view, list)?;
                Self::view_holds(&view, list, Self::initial)?;
                let how = self.syscalls_match(&s, list, false)?;
                Ok(format!("{s:?} in {} us, bytes equal; a later view: {how}", took.as_micros()))
            }),
        );
    }

    pub(super) fn read_only_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::ro_list(page());
        let opts = MapOptions::new().read_only().populate();
        let view = match remapper.map_with(&self.iov(list), opts) {
            Ok(v) => v,
            Err(e) => {
                c.fail("ro-view", format_args!("map_with(ReadOnly, populate) failed: {e}"));
                return;
            }
        };
        let s = *view.stats();
        c.check(
            "ro-view-bytes",
            Self::stats_match(&s, layout::expect(list)).and_then(|()| self.syscalls_match(&s, list, false)).and_then(
                |how| {
                    self.view_matches_sources(&view, list)?;
                    Self::view_holds(&view, list, Self::initial)?;
                    Ok(format!("{s:?} ({how}), populate: true (RAM prefaulted, BAR runs skipped), bytes equal"))
                },
            ),
        );
        self.write_sources(list, layout::SEED_VIA_SOURCE);
        c.check(
            "ro-view-source-to-view",
            Self::view_holds(&view, list, |_| layout::SEED_VIA_SOURCE)
                .map(|()| "written through the BAR and RAM mappings, read through the read-only view".into()),
        );
        // A write through the view must fault, on a BAR page and on a RAM page.
        let mut results = Vec::new();
        let mut voff = 0;
        for p in list.iter().take(2) {
            // SAFETY: `voff` is inside the live view, which this function owns; single-threaded here.
            let r = unsafe { mem::write_faults(view.as_ptr().cast_mut().add(voff)) };
            results.push((p.src, r.map_err(|e| e.to_string())));
            voff += p.len;
        }
        let all_fault = results.iter().all(|(_, r)| matches!(r, Ok(Some(mem::SEGV_ACCERR))));
        c.check(
            "ro-view-write-faults",
            if all_fault {
                Ok("a write through the view faults (SEGV_ACCERR) on a BAR page and on a RAM page".into())
            } else {
                Err(format!("write faults: {results:?}"))
            },
        );
    }

    pub(super) fn fragmented_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = layout::fragmented_list(1024, 7);
        let e = layout::expect(&list);
        let t = Instant::now();
        let res = remapper.map(&self.iov(&list));
        let took = t.elapsed();
        c.check(
            "fragmented-view",
            res.map_err(|e| e.to_string()).and_then(|view| {
                let s = *view.stats();
                Self::stats_match(&s, e)?;
                self.syscalls_match(&s, &list, false)?;
                self.view_matches_sources(&view, &list)?;
                let t = Instant::now();
                drop(view);
                Ok(format!(
                    "1024 single pages alternating BAR/RAM: {s:?}; map {:.1} ms, unmap {:.1} ms, bytes equal",
                    took.as_secs_f64() * 1e3,
                    t.elapsed().as_secs_f64() * 1e3
                ))
            }),
        );
    }
}
