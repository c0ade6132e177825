//! iovmap on a device passed through with vfio-pci: `cargo run --example vfio_passthrough
//! -- <PCI address> [--verify-bar] [--pages N]`.
//!
//! Opens the device with vfio-ioctls as a VMM does (type1 container, its IOMMU group, the
//! device fd), mmaps each mappable BAR from the device fd (sparse areas each at their
//! offset), registers it with `Remapper::register_vfio_region`, then builds a view over a
//! scatter list that interleaves pages of every registered BAR with pages of a memfd
//! "guest RAM", twice (the second time the BARs' refusal to be cloned is known), and
//! prints what happened: segments, runs, cloned vs fd-mapped runs, syscalls, time.
//!
//! Device memory is only read with `--verify-bar` (the BAR pages are then read through the
//! view and through the BAR mapping and compared): reading a real device's registers can
//! have side effects, so it is opt-in; the RAM pages of the view are always checked.
//! Nothing is ever written to the device.
//!
//! Needs a device bound to vfio-pci (and root, or access to its /dev/vfio/<group>); on a
//! machine without vfio it says so and exits with status 1. The guest VM test
//! (crates/iovmap-vmtest/run.sh) runs it on its ivshmem and nvme devices.

use std::process::ExitCode;
use std::time::Instant;

use iovmap::{MapOptions, Remapper};
use iovmap_vmtest::device::{self, BarMapping, Device, Region};
use iovmap_vmtest::mem::{SharedRam, page};
use iovmap_vmtest::pattern;

const USAGE: &str = "usage: vfio_passthrough <PCI address, e.g. 0000:01:00.0> [--verify-bar] [--pages N]

Maps pages of every mappable BAR of a device bound to vfio-pci, interleaved with RAM
pages, into one view with iovmap, and prints runs, clone vs fd, syscalls and time.
--verify-bar  also read the BAR pages through the view and through the BAR mapping and
              compare them (reads device registers: only for memory-like BARs)
--pages N     BAR pages per BAR in the list (default 4)";

const RAM_SEED: u64 = 0x7a55_0001;

struct Bar {
    region: Region,
    map: BarMapping,
    /// Pages of the BAR that the list uses, as offsets in the BAR.
    pages: Vec<usize>,
}

fn main() -> ExitCode {
    let mut bdf = None;
    let mut verify_bar = false;
    let mut per_bar = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--verify-bar" => verify_bar = true,
            "--pages" => match args.next().and_then(|v| v.parse().ok()).filter(|&n: &usize| (1..=4096).contains(&n)) {
                Some(n) => per_bar = n,
                None => return usage("--pages needs a number from 1 to 4096"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ if bdf.is_none() && !a.starts_with('-') => bdf = Some(a),
            other => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    let Some(bdf) = bdf else { return usage("no PCI address given") };
    let bdf = match device::parse_bdf(&bdf) {
        Ok(b) => b,
        Err(e) => return usage(&e),
    };
    match run(&bdf, verify_bar, per_bar) {
        Ok(()) => {
            println!("vfio_passthrough: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vfio_passthrough: {e}");
            println!("vfio_passthrough: FAILED");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("vfio_passthrough: {why}\n\n{USAGE}");
    ExitCode::from(2)
}

/// Up to `n` pages spread over the mappable areas of a region.
fn pick_pages(region: &Region, n: usize) -> Vec<usize> {
    let p = page() as u64;
    let areas = region.sparse.clone().unwrap_or_else(|| vec![(0, region.size)]);
    let all: Vec<u64> = areas.iter().flat_map(|&(o, s)| (o / p..(o + s) / p).map(move |i| i * p)).collect();
    if all.is_empty() {
        return Vec::new();
    }
    // Spread over the BAR; the RAM pages between them in the list keep them separate runs.
    let step = (all.len() / n.max(1)).max(1);
    all.iter().step_by(step).take(n).map(|&o| o as usize).collect()
}

fn run(bdf: &str, verify_bar: bool, per_bar: usize) -> Result<(), String> {
    let dev = Device::open(bdf)?;
    println!("{bdf}: opened with vfio-ioctls (VfioContainer + VfioDevice)");
    let mut remapper = Remapper::new();
    let mut bars = Vec::new();
    for index in 0..6 {
        let region = dev.region(index);
        if region.size == 0 {
            continue;
        }
        println!("  BAR{index}: {region}");
        if !region.mmap() {
            println!("    not mmappable: its accesses are trapped by the VMM, so it cannot be part of a view");
            continue;
        }
        let map = match dev.map_region(index) {
            Ok(m) => m,
            Err(e) => {
                println!("    cannot mmap: {e}");
                continue;
            }
        };
        if let Err(e) = remapper.register_vfio_region(&dev.device, index, map.ptr()) {
            println!("    mmapped at {:p}, but not registered: {e}", map.ptr());
            continue;
        }
        let pages = pick_pages(&region, per_bar);
        println!("    mmapped at {:p} and registered; the list takes {} of its pages", map.ptr(), pages.len());
        bars.push(Bar { region, map, pages });
    }
    if bars.is_empty() {
        return Err(format!("{bdf} has no BAR that can be mmapped and registered"));
    }
    let p = page();
    let n_bar: usize = bars.iter().map(|b| b.pages.len()).sum();
    let ram = SharedRam::new((n_bar + 1) * 2 * p).map_err(|e| format!("memfd RAM: {e}"))?;
    // SAFETY: our own RAM mapping, writable.
    unsafe { pattern::fill(ram.ptr(), ram.len(), RAM_SEED, 0) };
    // BAR page, RAM page, BAR page, ...: RAM pages taken every other page, in reverse.
    let mut list = Vec::new();
    let mut ram_page = ram.len() / p;
    for bar in &bars {
        for &off in &bar.pages {
            list.push((Some(bar), off));
            ram_page -= 2;
            list.push((None, ram_page * p));
        }
    }
    let iov: Vec<libc::iovec> = list
        .iter()
        .map(|&(bar, off)| {
            let base = bar.map_or(ram.ptr(), |b| b.map.ptr());
            libc::iovec { iov_base: base.wrapping_add(off).cast(), iov_len: p }
        })
        .collect();
    let writable = bars.iter().all(|b| b.region.flags & device::VFIO_REGION_INFO_FLAG_WRITE != 0);
    let opts = if writable { MapOptions::new() } else { MapOptions::new().read_only() };
    println!(
        "scatter list: {} pages ({n_bar} from {} BAR(s), {} from RAM), view {:?}",
        list.len(),
        bars.len(),
        list.len() - n_bar,
        opts.access()
    );
    for attempt in ["first view", "second view"] {
        let t = Instant::now();
        let view = remapper.map_with(&iov, opts).map_err(|e| format!("map: {e}"))?;
        let took = t.elapsed();
        let s = *view.stats();
        println!(
            "{attempt}: {:#x} bytes at {:p} in {} us: {} segments -> {} runs: {} cloned (RAM), {} fd-mapped (BAR), \
             {} syscalls",
            view.len(),
            view.as_ptr(),
            took.as_micros(),
            s.segments,
            s.runs,
            s.cloned,
            s.fd_mapped,
            s.syscalls
        );
        for (i, &(bar, off)) in list.iter().enumerate() {
            // SAFETY: page `i` of the live view, and the page it aliases in a live mapping.
            let differs = unsafe {
                match bar {
                    None => pattern::find_mismatch(view.as_ptr().add(i * p), p, RAM_SEED, off as u64).is_some(),
                    Some(b) if verify_bar => {
                        pattern::compare(view.as_ptr().add(i * p), b.map.ptr().add(off), p).is_some()
                    }
                    Some(_) => false,
                }
            };
            if differs {
                return Err(format!("{attempt}: page {i} of the view differs from its source"));
            }
        }
        let t = Instant::now();
        drop(view);
        println!(
            "  checked the RAM pages{}; unmapped in {} us",
            if verify_bar { " and the BAR pages" } else { " (BAR pages not read: --verify-bar)" },
            t.elapsed().as_micros()
        );
    }
    Ok(())
}
