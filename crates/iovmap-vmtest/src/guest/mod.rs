//! The guest test: the device set up as a VMM holds it, then the checks, concept by
//! concept: what this kernel does with a BAR (`kernel`), registration (`registration`),
//! views (`views`), the nvme BAR (`nvme`), the hole window (`probe`), the stress
//! scenarios (`stress`), and the BAR's final image, which `host-check` reads on the host.

mod bar_cost;
mod cost;
mod dmabufs;
mod kernel;
mod nvme;
mod probe;
mod registration;
mod stress;
mod views;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use iovmap::{MapStats, Remapper};
use iovmap_vmtest::device::{self, BarMapping, Device};
use iovmap_vmtest::layout::{self, Piece, Src};
use iovmap_vmtest::mem::{self, SharedRam, page};
use iovmap_vmtest::pattern;
use iovmap_vmtest::report::Checks;

use crate::Opts;
use cost::Cost;

/// Runs every check on the device `opts` names and prints the verdict.
pub(crate) fn run(opts: &Opts) -> ExitCode {
    log::set_logger(&probe::LOGGER).map(|()| log::set_max_level(log::LevelFilter::Debug)).ok();
    let t0 = Instant::now();
    let mut c = Checks::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    c.info(format_args!("kernel {}, {cpus} cpus, page {:#x}", release.trim(), page()));
    let ok = match Guest::setup(opts, &mut c) {
        Some(g) => {
            g.run(opts, &mut c);
            true
        }
        None => false,
    };
    if !ok {
        c.fail("setup", "the guest test could not start (see above)");
    }
    c.info(format_args!("guest test took {:.2} s", t0.elapsed().as_secs_f64()));
    println!("{}", c.verdict());
    if c.all_passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The device, its BAR2 mapping and the RAM, as a VMM holds them.
struct Guest {
    // Fields drop in this order: the BAR mapping holds the device file, so it must go
    // before the device, or vfio-ioctls cannot detach the group from the container (EBUSY).
    bar: BarMapping,
    ram: SharedRam,
    dev: Device,
    /// Whether a refused clone unmapped its destination (`kernel-refuses-clone`).
    holes: AtomicBool,
}

impl Guest {
    fn setup(opts: &Opts, c: &mut Checks) -> Option<Guest> {
        let dev = match Device::open(&opts.ivshmem) {
            Ok(d) => d,
            Err(e) => {
                c.fail("vfio-open", e);
                return None;
            }
        };
        c.pass("vfio-open", format_args!("{} opened with vfio-ioctls (VfioContainer type1v2 + VfioDevice)", dev.bdf));
        for i in 0..=device::CONFIG_REGION {
            c.info(format_args!("ivshmem {}", dev.region(i)));
        }
        let r2 = dev.region(2);
        if r2.size < layout::BAR_MIN || !r2.mmap() || r2.sparse.is_some() {
            c.fail(
                "bar2-region",
                format_args!("want a whole-mappable BAR2 of at least {:#x} bytes: {r2}", layout::BAR_MIN),
            );
            return None;
        }
        let bar = match dev.map_region(2) {
            Ok(b) => b,
            Err(e) => {
                c.fail("bar2-mmap", e);
                return None;
            }
        };
        c.pass(
            "bar2-mmap",
            format_args!("{:#x} bytes at {:p} from the device fd at offset {:#x}", bar.len(), bar.ptr(), r2.offset),
        );
        let ram = match SharedRam::new(layout::RAM_SIZE) {
            Ok(r) => r,
            Err(e) => {
                c.fail("ram", format_args!("memfd RAM: {e}"));
                return None;
            }
        };
        // SAFETY: the BAR and RAM mappings are ours, writable, and nothing refers to them.
        unsafe {
            std::ptr::write_bytes(bar.ptr(), 0, layout::BAR_FUNC.start as usize);
            for (i, b) in layout::MAGIC.iter().enumerate() {
                bar.ptr().add(i).write_volatile(*b);
            }
            for (i, b) in (page() as u32).to_le_bytes().iter().enumerate() {
                bar.ptr().add(layout::PAGE_AT as usize + i).write_volatile(*b);
            }
            let f = layout::BAR_FUNC;
            pattern::fill(bar.ptr().add(f.start as usize), (f.end - f.start) as usize, layout::SEED_BAR, f.start);
            let s = layout::BAR_STRESS;
            pattern::fill(
                bar.ptr().add(s.start as usize),
                (s.end - s.start) as usize,
                layout::SEED_BAR_STRESS,
                s.start,
            );
            let f = layout::RAM_FUNC;
            pattern::fill(ram.ptr().add(f.start), f.end - f.start, layout::SEED_RAM, f.start as u64);
            let s = layout::RAM_STRESS;
            pattern::fill(ram.ptr().add(s.start), s.end - s.start, layout::SEED_RAM_STRESS, s.start as u64);
        }
        Some(Guest { bar, ram, dev, holes: AtomicBool::new(false) })
    }

    fn cost(&self) -> Cost {
        Cost { holes: self.holes.load(Ordering::Relaxed) }
    }

    /// `Ok` when the view's syscalls are what `cost` says.
    fn syscalls_match(&self, s: &MapStats, list: &[Piece], first: bool) -> Result<String, String> {
        let want = self.cost().syscalls(list, first);
        let how = self.cost().explain(list, first);
        if s.syscalls == want {
            Ok(format!("syscalls {want} = {how}"))
        } else {
            Err(format!("{s:?}: want syscalls {want} = {how}"))
        }
    }

    fn iov(&self, list: &[Piece]) -> Vec<libc::iovec> {
        layout::iovecs(list, self.bar.ptr(), self.ram.ptr())
    }

    fn src(&self, p: &Piece) -> *mut u8 {
        match p.src {
            Src::Bar => self.bar.ptr().wrapping_add(p.off),
            Src::Ram => self.ram.ptr().wrapping_add(p.off),
        }
    }

    fn run(&self, opts: &Opts, c: &mut Checks) {
        self.bar_is_device_memory(c);
        self.kernel_refuses_the_clone(c);
        // The first map call opens what iovmap keeps open for the process (its
        // /proc/self/maps fd): count mappings and fds after it.
        self.unregistered_bar_has_no_fallback(c);
        let before = (mem::vma_count().unwrap_or(0), mem::fd_count().unwrap_or(0));
        let mut remapper = Remapper::new();
        self.registration(&mut remapper, c);
        self.registration_mismatches(c);
        self.region_without_mmap(c);
        self.first_view(&remapper, c);
        self.later_view(&remapper, c);
        self.read_only_view(&remapper, c);
        self.fragmented_view(&remapper, c);
        self.bar_dmabufs(&remapper, c);
        self.bar_map_cost(&remapper, c);
        self.unregister(&mut remapper, c);
        drop(remapper);
        let after = (mem::vma_count().unwrap_or(0), mem::fd_count().unwrap_or(0));
        c.check(
            "nothing-left-behind",
            if before == after {
                Ok(format!("{} mappings and {} fds before and after the checks above", before.0, before.1))
            } else {
                Err(format!("mappings/fds before {before:?}, after {after:?}"))
            },
        );
        match &opts.nvme {
            Some(bdf) => nvme::nvme(bdf, &self.ram, c),
            None => c.skip("nvme-bar0", "no --nvme device given"),
        }
        self.window_probe(c);
        self.stress(opts, c);
        self.final_image(c);
    }

    fn final_image(&self, c: &mut Checks) {
        let len = (layout::BAR_SIZE as usize).min(self.bar.len()) / 8 * 8;
        let mut image = vec![0u8; len];
        for (i, chunk) in image.chunks_exact_mut(8).enumerate() {
            // SAFETY: 8 aligned bytes inside the live BAR mapping (page aligned).
            let w = unsafe { self.bar.ptr().cast::<u64>().add(i).read_volatile() };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        image[layout::VERDICT_AT as usize..layout::VERDICT_AT as usize + 4].copy_from_slice(b"PASS");
        c.check(
            "bar-final-image",
            layout::check_image(&image).map(|s| format!("the BAR holds what host-check expects: {s}")),
        );
        let verdict: &[u8; 4] = if c.all_passed() { b"PASS" } else { b"FAIL" };
        for (i, b) in verdict.iter().enumerate() {
            // SAFETY: inside the live BAR mapping, writable.
            unsafe { self.bar.ptr().add(layout::VERDICT_AT as usize + i).write_volatile(*b) };
        }
    }
}
