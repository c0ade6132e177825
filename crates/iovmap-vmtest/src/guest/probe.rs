//! The hole window probe, and the logger that makes it possible.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use iovmap::{Remapper, View};
use iovmap_vmtest::layout::{self, Piece, Src};
use iovmap_vmtest::mem::page;
use iovmap_vmtest::pattern;
use iovmap_vmtest::report::Checks;
use iovmap_vmtest::stress;

use super::Guest;

impl Guest {
    /// A diagnostic of the hole itself: iovmap logs (debug) when a clone is refused,
    /// between the refusal and the fallback. While armed, the logger makes a 1-page
    /// mapping right then, as another thread could, and the check looks where it landed
    /// and whether it survived. Fires only while iovmap issues a refused clone into a
    /// reservation and logs it there.
    pub(super) fn window_probe(&self, c: &mut Checks) {
        let p = page();
        let list = [
            Piece { src: Src::Ram, off: layout::RAM_STRESS.start, len: p },
            Piece { src: Src::Bar, off: layout::BAR_STRESS.start as usize, len: p },
            Piece { src: Src::Ram, off: layout::RAM_STRESS.start + 2 * p, len: p },
        ];
        let (mut fired, mut inside, mut damaged, mut errors) = (0, 0, Vec::new(), Vec::new());
        const TRIES: usize = 20;
        for _ in 0..TRIES {
            let mut r = Remapper::new();
            if let Err(e) = r.register_vfio_region(&self.dev.device, 2, self.bar.ptr()) {
                errors.push(e.to_string());
                continue;
            }
            PROBE_ARMED.store(true, Ordering::SeqCst);
            let res = r.map(&self.iov(&list));
            PROBE_ARMED.store(false, Ordering::SeqCst);
            let addr = PROBE_ADDR.swap(0, Ordering::SeqCst);
            let range = res.as_ref().map(View::mapped_range).ok();
            if addr != 0 {
                fired += 1;
                let within = range.as_ref().is_some_and(|r| r.contains(&addr));
                inside += usize::from(within);
                match stress::check_mapping(addr, p, PROBE_SEED) {
                    // SAFETY: the probe's own mapping, intact: nothing else uses it.
                    Ok(()) if !within => unsafe {
                        libc::munmap(addr as *mut _, p);
                    },
                    Ok(()) => damaged.push(format!("{addr:#x}: intact but inside the view {range:x?}")),
                    Err(what) => damaged.push(format!("{addr:#x}: {what}")),
                }
            }
            if let Err(e) = res {
                errors.push(e.to_string());
            }
        }
        let detail = format!(
            "{TRIES} fresh Remappers, [RAM, BAR, RAM]: the refusal log fired {fired} times; the 1-page mmap(NULL) \
             made then landed inside the reservation {inside} times"
        );
        if !damaged.is_empty() || !errors.is_empty() {
            let n = damaged.len();
            damaged.dedup();
            errors.dedup();
            c.fail(
                "hole-window-probe",
                format_args!(
                    "{detail}; that foreign mapping was damaged {n} times (iovmap mapped over it or unmapped it): \
                     {damaged:?}; errors: {errors:?}"
                ),
            );
        } else if fired == 0 {
            c.skip(
                "hole-window-probe",
                format_args!("{detail}: iovmap issued no logged refused clone into a reservation"),
            );
        } else {
            c.pass("hole-window-probe", format_args!("{detail}, and it was never damaged"));
        }
    }
}

// ---- the window probe's logger -------------------------------------------------------

static PROBE_ARMED: AtomicBool = AtomicBool::new(false);
static PROBE_ADDR: AtomicUsize = AtomicUsize::new(0);
const PROBE_SEED: u64 = 0x9b0b_e000;

/// Prints iovmap's warnings and errors; while the window probe is armed, answers iovmap's
/// "refused" debug line with a 1-page mmap(NULL), filled with a pattern.
pub(super) struct Logger;

pub(super) static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Debug
    }

    fn log(&self, r: &log::Record<'_>) {
        let ours = r.target().starts_with("iovmap");
        if r.level() <= log::Level::Error || (ours && r.level() <= log::Level::Warn) {
            println!("LOG   {} {}: {}", r.level(), r.target(), r.args());
        }
        if !PROBE_ARMED.load(Ordering::SeqCst) || !ours {
            return;
        }
        if !r.args().to_string().contains("refused") || !PROBE_ARMED.swap(false, Ordering::SeqCst) {
            return;
        }
        let p = page();
        // SAFETY: NULL hint without MAP_FIXED: the kernel picks free space, replacing nothing.
        let a = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                p,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if a != libc::MAP_FAILED {
            // SAFETY: the page just mapped, ours.
            unsafe { pattern::fill(a.cast(), p, PROBE_SEED, 0) };
            PROBE_ADDR.store(a as usize, Ordering::SeqCst);
        }
    }

    fn flush(&self) {}
}
