//! The source of a view changes under `map`: another thread unmaps it, maps another file
//! or private memory over all or part of it, or splits it with mprotect, over and over,
//! while views of it are built (see `support/race.rs`). Every view returned without an
//! error must show, at each page, what was mapped at that address at some moment during
//! the call, or the registered file at the registered offset; and once everything is
//! dropped, nothing is left behind.
//!
//! The head-replacement races (a shorter mapping over the start of a run's source, which
//! a clone of the whole run would run past) are the hard ones: iovmap checks the file and
//! offset each multi-page clone actually maps, and refuses the view (`SourceChanged`)
//! when it is not the source it planned.
//!
//! Runs without the libtest harness, like leaks.rs: it counts the process's VMAs and fds
//! at the end. IOVMAP_RACE_SECS sets the time per race (default 1 s; a race stops early
//! once 300 views have seen the source change, and runs up to 5 times longer while none
//! has: a race never seen proves nothing and fails).

#[path = "support/race.rs"]
mod race;
#[path = "support/steady.rs"]
mod steady;

use iovmap_testkit::Counts;
use race::{Change, World};

fn main() {
    let secs: f64 = std::env::var("IOVMAP_RACE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    // SAFETY: before any thread starts; one malloc arena keeps the VMA count ours.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let w = World::new();
    // Warm up: a racer thread's stack stays cached by glibc once it has run, and what
    // iovmap keeps open for the process (on kernels that punch holes, the marker file of
    // reservations, which the races' one-run views never need) is opened.
    steady::warm_up();
    let _ = w.race(Change::Protect, true, 0.05, 1);
    let before = Counts::now();
    let mut failed = Vec::new();
    for change in Change::GUARANTEED {
        for registered in [false, true] {
            let t = w.race(change, registered, secs, 300);
            let name = format!("{change:?}, {}", if registered { "registered" } else { "unregistered" });
            // Every view and remapper of the race is gone and X is F1 again.
            let left = before.changes();
            let ok = t.violations == 0 && t.interfered() > 0 && left.is_none();
            println!(
                "race {name} ... {}: {} changes, {} views ({} saw the change), errors {:?}, {} bad pages in {} views{}",
                if ok { "ok" } else { "FAILED" },
                t.changes,
                t.views,
                t.disturbed,
                t.errors,
                t.violations,
                t.bad_views,
                t.first_violation.as_ref().map(|v| format!(" (first: {v})")).unwrap_or_default()
            );
            if t.interfered() == 0 {
                println!("  the race was never hit: raise IOVMAP_RACE_SECS");
            }
            if let Some(left) = left {
                println!("  left behind: {left}");
            }
            if !ok {
                failed.push(name);
            }
        }
    }
    drop(w);
    println!("\nraces: {} races, {} failed", 2 * Change::GUARANTEED.len(), failed.len());
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
