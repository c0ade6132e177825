//! The hole-safety stress scenarios: views built, checked and dropped while loop threads
//! map and unmap around them.

use std::time::Duration;

use iovmap::{Error, Remapper};
use iovmap_vmtest::layout::{self, Rng};
use iovmap_vmtest::report::Checks;
use iovmap_vmtest::stress::{self, Outcome, Scanner};

use super::Guest;
use crate::Opts;

impl Guest {
    pub(super) fn stress(&self, opts: &Opts, c: &mut Checks) {
        let cfg = stress::Config {
            threads: opts.threads,
            builders: opts.builders,
            duration: opts.stress,
            catch_faults: true,
            ..stress::Config::default()
        };
        c.info(format_args!(
            "stress: {} loop threads (mmap/fill/check/munmap of 1-4 pages, {} alive each), {} builders, {} sentinels, \
             {:.1} s per scenario",
            cfg.threads,
            cfg.live_per_thread,
            cfg.builders,
            cfg.sentinels,
            cfg.duration.as_secs_f64()
        ));
        // The detection itself, first: planted damage must be reported.
        let shared = self.shared();
        let plant = stress::Config {
            plant_every: Some(5),
            duration: Duration::from_secs(1),
            catch_faults: false,
            ..cfg.clone()
        };
        let r = stress::run(&plant, |rng, scanner| self.stress_view(Scenario::Shared(&shared), rng, scanner));
        c.check(
            "stress-detects-planted-damage",
            if r.clobbered_count > 0 {
                Ok(format!("{} planted clobbers reported, e.g. {:?}", r.clobbered_count, r.clobbered.first()))
            } else {
                Err(format!("planted damage went unseen: {}", r.summary()))
            },
        );
        for (name, scenario) in [
            ("stress-shared-remapper", Scenario::Shared(&shared)),
            ("stress-fresh-remapper", Scenario::Fresh),
            ("stress-unregistered-bar", Scenario::Unregistered),
        ] {
            let r = stress::run(&cfg, |rng, scanner| self.stress_view(scenario, rng, scanner));
            let mut why = Vec::new();
            why.extend(r.failures.iter().map(|f| format!("view: {f}")));
            why.extend(r.clobbered.iter().map(|f| format!("foreign: {f}")));
            why.extend(r.sentinels_bad.iter().map(|f| format!("sentinel: {f}")));
            if r.built + r.expected.values().sum::<usize>() == 0 {
                why.push("no view was attempted".into());
            }
            let expected_ok = match scenario {
                Scenario::Unregistered => r.built == 0 && r.expected.keys().all(|k| k == "NoFallback"),
                _ => r.expected.is_empty(),
            };
            if !expected_ok {
                why.push(format!("unexpected outcome mix: built {}, errors {:?}", r.built, r.expected));
            }
            c.check(
                name,
                if r.ok() && why.is_empty() {
                    Ok(r.summary())
                } else {
                    Err(format!("{}: {}", r.summary(), why.join(" | ")))
                },
            );
        }
    }

    pub(super) fn shared(&self) -> Remapper {
        let mut r = Remapper::new();
        r.register_vfio_region(&self.dev.device, 2, self.bar.ptr()).expect("registered before, so registers again");
        r
    }

    /// One stress view: build, check stats and every byte, look for foreign mappings
    /// inside it, drop it.
    pub(super) fn stress_view(&self, scenario: Scenario<'_>, rng: &mut Rng, scanner: &Scanner<'_>) -> Outcome {
        let ram_first = rng.below(2) == 0;
        let list = layout::stress_list(rng, ram_first);
        let iov = self.iov(&list);
        let fresh;
        let remapper = match scenario {
            Scenario::Shared(r) => r,
            Scenario::Fresh => {
                let mut r = Remapper::new();
                if let Err(e) = r.register_vfio_region(&self.dev.device, 2, self.bar.ptr()) {
                    return Outcome::Failed(format!("register: {e}"));
                }
                fresh = r;
                &fresh
            }
            Scenario::Unregistered => {
                fresh = Remapper::new();
                &fresh
            }
        };
        let view = match (remapper.map(&iov), scenario) {
            (Ok(_), Scenario::Unregistered) => return Outcome::Failed("an unregistered BAR was mapped".into()),
            (Ok(v), _) => v,
            (Err(Error::NoFallback { .. }), Scenario::Unregistered) => return Outcome::Expected("NoFallback".into()),
            (Err(e), _) => return Outcome::Failed(format!("map {list:?}: {e}")),
        };
        // Safety first (bytes, intrusions), then the stats.
        if let Err(why) = Self::view_holds(&view, &list, Self::initial) {
            return Outcome::Failed(why);
        }
        let inside = scanner.foreign_inside(view.mapped_range());
        if !inside.is_empty() {
            return Outcome::Failed(format!(
                "live loop-thread mappings inside the view {:x?}: {inside:x?}",
                view.mapped_range()
            ));
        }
        let s = view.stats();
        if let Err(why) = Self::stats_match(s, layout::expect(&list)) {
            return Outcome::Failed(why);
        }
        let cost = self.cost();
        let result = match scenario {
            // Two builders may both make the shared Remapper's first view, where the kernel
            // keeps the destination: each then meets the refusal once.
            Scenario::Shared(_) => {
                let want = cost.syscalls(&list, false);
                if (want..=want + cost.first_refusal()).contains(&s.syscalls) {
                    Ok(String::new())
                } else {
                    Err(format!("{s:?}: want syscalls {want} = {}", cost.explain(&list, false)))
                }
            }
            _ => self.syscalls_match(s, &list, true),
        };
        if let Err(why) = result {
            return Outcome::Failed(format!("{why} ({scenario:?} Remapper)"));
        }
        Outcome::Built
    }
}

#[derive(Clone, Copy)]
pub(super) enum Scenario<'a> {
    /// One Remapper for every view, registered once: the refusal is learned once.
    Shared(&'a Remapper),
    /// A new Remapper per view, registered each time: every view meets the refusal anew.
    Fresh,
    /// Nothing registered: every view is refused (NoFallback), through the rollback path.
    Unregistered,
}

impl std::fmt::Debug for Scenario<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scenario::Shared(_) => "Shared",
            Scenario::Fresh => "Fresh",
            Scenario::Unregistered => "Unregistered",
        })
    }
}
