//! The guest side of issue 7's VM test, and its host-side check.
//!
//! ```text
//! iovmap-vmtest guest --ivshmem <BDF> [--nvme <BDF>] [--stress-secs N] [--threads N] [--builders N]
//! iovmap-vmtest host-check <ivshmem backing file>
//! ```
//!
//! `guest` runs inside the VM that `run.sh` boots (it refuses to run where there is no
//! /dev/vfio/vfio): it uses iovmap on the ivshmem device's BAR2 exactly as a VMM would and
//! prints one `CHECK` line per check and a `VMTEST:` verdict line. `host-check` runs on the
//! host after the guest powered off and compares the ivshmem backing file with the image
//! the guest must have left. See docs/vfio.md.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iovmap::vfio::RegionInfoError;
use iovmap::{Error, MapOptions, MapStats, RegionError, Remapper, View};
use iovmap_vmtest::device::{self, BarMapping, Device};
use iovmap_vmtest::layout::{self, Expect, Piece, Rng, Src};
use iovmap_vmtest::mem::{self, SharedRam, page};
use iovmap_vmtest::pattern;
use iovmap_vmtest::report::Checks;
use iovmap_vmtest::stress::{self, Outcome, Scanner};

const USAGE: &str = "\
usage: iovmap-vmtest guest --ivshmem <BDF> [--nvme <BDF>] [--stress-secs N] [--threads N] [--builders N]
       iovmap-vmtest host-check <ivshmem backing file>

`guest` runs inside the VM that crates/iovmap-vmtest/run.sh boots (it needs the ivshmem
device bound to vfio-pci); `host-check` checks the backing file on the host afterwards.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("guest") => guest(&args[1..]),
        Some("host-check") => host_check(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn host_check(args: &[String]) -> ExitCode {
    let [path] = args else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match std::fs::read(path) {
        Err(e) => {
            println!("HOSTCHECK: FAIL cannot read {path}: {e}");
            ExitCode::FAILURE
        }
        Ok(image) => match layout::check_image(&image) {
            Ok(s) => {
                println!("HOSTCHECK: PASS {path}: {s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("HOSTCHECK: FAIL {path}: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

struct Opts {
    ivshmem: String,
    nvme: Option<String>,
    stress: Duration,
    threads: usize,
    builders: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { ivshmem: String::new(), nvme: None, stress: Duration::from_secs(3), threads: 4, builders: 2 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("{a}: not a number: {v}"));
        match a.as_str() {
            "--ivshmem" => o.ivshmem = device::parse_bdf(&val()?)?,
            "--nvme" => o.nvme = Some(device::parse_bdf(&val()?)?),
            "--stress-secs" => o.stress = Duration::from_millis((num(val()?)? * 1000).max(100)),
            "--threads" => o.threads = num(val()?)?.clamp(1, 64) as usize,
            "--builders" => o.builders = num(val()?)?.clamp(1, 16) as usize,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.ivshmem.is_empty() {
        return Err("--ivshmem <BDF> is required".into());
    }
    Ok(o)
}

fn guest(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iovmap-vmtest: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = device::preflight(&opts.ivshmem) {
        println!("VMTEST: FAIL not in the test VM, or the VM is not set up: {e}");
        return ExitCode::from(2);
    }
    log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Debug)).ok();
    let t0 = Instant::now();
    let mut c = Checks::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    c.info(format_args!("kernel {}, {cpus} cpus, page {:#x}", release.trim(), page()));
    let ok = match Guest::setup(&opts, &mut c) {
        Some(g) => {
            g.run(&opts, &mut c);
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

/// What a map call costs in syscalls beyond one mmap/mremap per run, as iovmap states it
/// for the two kinds of kernel (its own tests count the same way).
#[derive(Clone, Copy, Debug)]
struct Cost {
    /// This kernel unmaps the destination of a refused clone (Linux before 6.17).
    holes: bool,
}

impl Cost {
    /// Where the kernel keeps the destination, the first view of a registered BAR learns
    /// the refusal by a refused clone; where it punches holes, registration learned it.
    fn first_refusal(self) -> usize {
        usize::from(!self.holes)
    }

    /// Where the kernel punches holes, iovmap learns once per call whether each
    /// unregistered mapping clones, by a clone to an address the kernel chooses: here the
    /// memfd RAM (one VMA), when the list has RAM pieces.
    fn probes(self, list: &[Piece]) -> usize {
        usize::from(self.holes && list.iter().any(|p| p.src == Src::Ram))
    }

    /// The syscalls a view of `list` costs, `first` for the first view of a Remapper.
    fn syscalls(self, list: &[Piece], first: bool) -> usize {
        layout::expect(list).runs + if first { self.first_refusal() } else { 0 } + self.probes(list)
    }

    fn explain(self, list: &[Piece], first: bool) -> String {
        format!(
            "runs {} + first refusal {} + RAM clone probe {} ({})",
            layout::expect(list).runs,
            if first { self.first_refusal() } else { 0 },
            self.probes(list),
            if self.holes {
                "this kernel punches holes: the BAR's refusal is learned at registration, unregistered RAM is probed \
                 once per call"
            } else {
                "this kernel keeps the destination: the first view learns the BAR's refusal by a refused clone"
            }
        )
    }
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
        self.region_without_mmap(c);
        self.first_view(&remapper, c);
        self.later_view(&remapper, c);
        self.read_only_view(&remapper, c);
        self.fragmented_view(&remapper, c);
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
            Some(bdf) => nvme(bdf, &self.ram, c),
            None => c.skip("nvme-bar0", "no --nvme device given"),
        }
        self.window_probe(c);
        self.stress(opts, c);
        self.final_image(c);
    }

    fn bar_is_device_memory(&self, c: &mut Checks) {
        let flags = mem::vm_flags(self.bar.ptr() as usize).unwrap_or_default();
        let has = |f: &str| flags.split(' ').any(|x| x == f);
        c.check(
            "bar2-vmflags",
            if has("pf") && has("io") && has("de") {
                Ok(format!("VmFlags {flags} (VM_PFNMAP, VM_IO, VM_DONTEXPAND: the kernel will not clone it)"))
            } else {
                Err(format!("VmFlags {flags}: want pf io de"))
            },
        );
    }

    /// The kernel fact everything stands on, and whether this kernel punches the hole.
    fn kernel_refuses_the_clone(&self, c: &mut Checks) {
        let p = page();
        // SAFETY: a fresh PROT_NONE reservation, replacing nothing.
        let res = unsafe {
            libc::mmap(std::ptr::null_mut(), 3 * p, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if res == libc::MAP_FAILED {
            c.fail("kernel-refuses-clone", "cannot reserve 3 pages");
            return;
        }
        let dst = res as usize + p;
        // SAFETY: `dst` is the middle page of our own reservation; whatever the kernel does
        // there, it does to our range.
        let r = unsafe {
            libc::mremap(
                self.bar.ptr().add(p).cast(),
                0,
                p,
                libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                dst as *mut libc::c_void,
            )
        };
        let err = std::io::Error::last_os_error();
        let hole = mem::has_unmapped_page(dst, p);
        self.holes.store(hole, Ordering::Relaxed);
        // SAFETY: our reservation (single-threaded here: nothing else can have taken the hole).
        unsafe { libc::munmap(res, 3 * p) };
        if r != libc::MAP_FAILED {
            c.fail("kernel-refuses-clone", "mremap cloned a vfio BAR page: this kernel is not what the test expects");
            return;
        }
        c.check(
            "kernel-refuses-clone",
            if err.raw_os_error() == Some(libc::EFAULT) {
                Ok(format!(
                    "mremap(BAR, 0, page, MREMAP_FIXED|MREMAP_MAYMOVE, dst) = EFAULT; dst afterwards: {}",
                    if hole { "UNMAPPED (this kernel punches the hole)" } else { "still reserved" }
                ))
            } else {
                Err(format!("mremap refused with {err}, want EFAULT"))
            },
        );
    }

    fn unregistered_bar_has_no_fallback(&self, c: &mut Checks) {
        let p = page();
        let before = mem::vma_count().unwrap_or(0);
        let r = Remapper::new();
        let bar_only = [Piece { src: Src::Bar, off: 0x1_0000, len: p }];
        let mixed = [Piece { src: Src::Ram, off: 0, len: p }, Piece { src: Src::Bar, off: 0x1_0000, len: p }];
        let a = r.map(&self.iov(&bar_only)).map(drop);
        let b = r.map(&self.iov(&mixed)).map(drop);
        let after = mem::vma_count().unwrap_or(0);
        let efault = |e: &std::io::Error| e.raw_os_error() == Some(libc::EFAULT);
        c.check(
            "unregistered-bar-no-fallback",
            match (&a, &b) {
                (Err(Error::NoFallback { index: 0, source: s0 }), Err(Error::NoFallback { index: 1, source: s1 }))
                    if efault(s0) && efault(s1) && before == after =>
                {
                    Ok(format!(
                        "[BAR] -> NoFallback {{ index: 0 }}, [RAM, BAR] -> NoFallback {{ index: 1 }} (EFAULT); \
                                {before} mappings before and after"
                    ))
                }
                _ => Err(format!("got {a:?} and {b:?}; mappings {before} -> {after}")),
            },
        );
    }

    fn registration(&self, remapper: &mut Remapper, c: &mut Checks) {
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
    fn region_without_mmap(&self, c: &mut Checks) {
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

    /// Checks a view's stats against the list: segments, runs, BAR runs fd-mapped, RAM
    /// runs cloned.
    fn stats_match(s: &MapStats, e: Expect) -> Result<(), String> {
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
    fn view_matches_sources(&self, view: &View, list: &[Piece]) -> Result<(), String> {
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
    fn view_holds(view: &View, list: &[Piece], seed: impl Fn(&Piece) -> u64) -> Result<(), String> {
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

    fn sources_hold(&self, list: &[Piece], seed: u64) -> Result<(), String> {
        for (i, p) in list.iter().enumerate() {
            // SAFETY: the piece is inside its live source mapping.
            if let Some(m) = unsafe { pattern::find_mismatch(self.src(p), p.len, seed, p.off as u64) } {
                return Err(format!("segment {i} ({p:?}): source byte {:#x} is {:#04x}, want {:#04x}", m.0, m.1, m.2));
            }
        }
        Ok(())
    }

    fn write_sources(&self, list: &[Piece], seed: u64) {
        for p in list {
            // SAFETY: the piece is inside its live, writable source mapping.
            unsafe { pattern::fill(self.src(p), p.len, seed, p.off as u64) };
        }
    }

    fn write_view(view: &View, list: &[Piece], seed: u64) {
        let mut voff = 0;
        for p in list {
            let base = view.as_mut_ptr().expect("written views are read-write");
            // SAFETY: a read-write view, live; `[voff, voff + len)` is inside it.
            unsafe { pattern::fill(base.add(voff), p.len, seed, p.off as u64) };
            voff += p.len;
        }
    }

    fn initial(p: &Piece) -> u64 {
        layout::initial_seed(p.src, p.off).unwrap_or(0)
    }

    fn first_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::RW_LIST;
        let e = layout::expect(list);
        let t = Instant::now();
        let view = match remapper.map(&self.iov(list)) {
            Ok(v) => v,
            Err(err) => {
                c.fail("rw-view", format_args!("map of RW_LIST failed: {err}"));
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

    fn later_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::SECOND_LIST;
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

    fn read_only_view(&self, remapper: &Remapper, c: &mut Checks) {
        let list = &layout::RO_LIST;
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

    fn fragmented_view(&self, remapper: &Remapper, c: &mut Checks) {
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

    fn unregister(&self, remapper: &mut Remapper, c: &mut Checks) {
        let list = &layout::SECOND_LIST;
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

    /// A diagnostic of the hole itself: iovmap logs (debug) when a clone is refused,
    /// between the refusal and the fallback. While armed, the logger makes a 1-page
    /// mapping right then, as another thread could, and the check looks where it landed
    /// and whether it survived. Fires only while iovmap issues a refused clone into a
    /// reservation and logs it there.
    fn window_probe(&self, c: &mut Checks) {
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

    fn stress(&self, opts: &Opts, c: &mut Checks) {
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

    fn shared(&self) -> Remapper {
        let mut r = Remapper::new();
        r.register_vfio_region(&self.dev.device, 2, self.bar.ptr()).expect("registered before, so registers again");
        r
    }

    /// One stress view: build, check stats and every byte, look for foreign mappings
    /// inside it, drop it.
    fn stress_view(&self, scenario: Scenario<'_>, rng: &mut Rng, scanner: &Scanner<'_>) -> Outcome {
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

#[derive(Clone, Copy)]
enum Scenario<'a> {
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

/// QEMU's nvme BAR0 holds its registers and its MSI-X table: the candidate for a sparse
/// mmap (an MSI-X table left out of the mappable areas). Whatever vfio-pci reports, the
/// BAR is registered and mapped into a view with RAM, and two stable registers (CAP and
/// VS) read the same through the view as through the BAR mapping.
fn nvme(bdf: &str, ram: &SharedRam, c: &mut Checks) {
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

// ---- the window probe's logger -------------------------------------------------------

static PROBE_ARMED: AtomicBool = AtomicBool::new(false);
static PROBE_ADDR: AtomicUsize = AtomicUsize::new(0);
const PROBE_SEED: u64 = 0x9b0b_e000;

/// Prints iovmap's warnings and errors; while the window probe is armed, answers iovmap's
/// "refused" debug line with a 1-page mmap(NULL), filled with a pattern.
struct Logger;

static LOGGER: Logger = Logger;

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
