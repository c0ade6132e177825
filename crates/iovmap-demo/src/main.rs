//! iovmap demo: the main job on an embedded default, no arguments, no setup.
//!
//! Default (`--mode memfd`): builds a memfd-backed fake guest RAM (1 GiB), takes a
//! fragmented scatter list like the backing of a virtio-gpu blob (one iovec per 4 KiB
//! page, in runs of 1-64 adjacent pages scattered over guest RAM), maps it into one
//! contiguous view, verifies every byte, and times the naive one-clone-per-iovec loop on
//! the same list. Where the kernel has /dev/udmabuf it then builds the same view in the
//! kernel (dma-bufs, one ioctl and one mmap per buffer) and times that too; elsewhere it
//! says in one line why not. Then it shows the fallback on a BAR-like region the kernel
//! will not clone (a perf_event ring).
//!
//! `--mode vm-memory`: a guest described with rust-vmm's vm-memory, with several RAM
//! regions (one on 2 MiB hugetlb pages when the host has them), and a blob scatter list
//! in guest-physical addresses, as virtio-gpu's RESOURCE_ATTACH_BACKING carries it.
//!
//! `--json` prints one JSON object instead of text.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use iovmap::{Error, MapOptions, MapStats, Remapper, View};
use iovmap_testkit::{self as kit, GuestRam, PerfRing, workloads};
use serde_json::{Value, json};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One memfd guest RAM, a host iovec list.
    Memfd,
    /// A vm-memory guest with several regions, a guest-physical scatter list.
    VmMemory,
}

#[derive(Parser, Debug)]
#[command(about = "Map a fragmented guest buffer into one contiguous view, verify it, compare with the naive loop")]
struct Args {
    /// What kind of guest to build.
    #[arg(long, value_enum, default_value_t = Mode::Memfd)]
    mode: Mode,
    /// Size of the fake guest RAM, in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mib: usize,
    /// Size of the blob (the scatter list), in MiB.
    #[arg(long, default_value_t = 256)]
    blob_mib: usize,
    /// Longest run of adjacent pages in the list.
    #[arg(long, default_value_t = 64)]
    max_run: usize,
    /// Seed of the list.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn stats_json(s: &MapStats) -> Value {
    json!({
        "segments": s.segments, "runs": s.runs, "cloned": s.cloned, "fd_mapped": s.fd_mapped,
        "kernel_built": s.kernel_built, "dmabufs": s.dmabufs, "syscalls": s.syscalls,
    })
}

/// Compares the view with its host sources, segment by segment. Returns the bytes checked.
fn verify(view: &View, iovs: &[libc::iovec]) -> Result<usize, String> {
    let mut at = 0;
    for (i, iov) in iovs.iter().enumerate() {
        // SAFETY: the view is live for len() bytes and the sources are the demo's own
        // guest RAM; nothing writes either while this runs.
        let diff = unsafe { kit::first_difference(view.as_ptr().add(at), iov.iov_base as *const u8, iov.iov_len) };
        if let Some(d) = diff {
            return Err(format!("byte {d} of segment {i} differs from guest RAM"));
        }
        at += iov.iov_len;
    }
    Ok(at)
}

/// What one demo run did, printed as text or JSON.
struct Report {
    lines: Vec<String>,
    json: Value,
    /// How long the naive loop took, to compare later paths with.
    naive: Option<Duration>,
}

/// Maps `iovs` with `map`, verifies, unmaps, then runs the naive loop on the same list.
fn map_verify_compare(
    map: impl FnOnce() -> Result<View, iovmap::Error>,
    iovs: &[libc::iovec],
    report: &mut Report,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let view = map()?;
    let took = t.elapsed();
    let s = *view.stats();
    report.lines.push(format!(
        "iovmap (clone/fd): segments {}  runs {}  cloned {}  fd_mapped {}  syscalls {}  time {:.2} ms",
        s.segments,
        s.runs,
        s.cloned,
        s.fd_mapped,
        s.syscalls,
        ms(took)
    ));
    let t = Instant::now();
    let checked = verify(&view, iovs)?;
    let verify_took = t.elapsed();
    report.lines.push(format!(
        "verified:   {checked} bytes through the view, identical to guest RAM ({:.2} ms)",
        ms(verify_took)
    ));
    let t = Instant::now();
    drop(view);
    let unmap = t.elapsed();

    let t = Instant::now();
    let naive = iovmap_peers::naive_map(iovs).map(drop);
    let naive_took = t.elapsed();
    let naive_json = match &naive {
        Ok(()) => {
            report.lines.push(format!(
                "naive loop: one mremap per iovec, syscalls {}  time {:.2} ms  ({:.0}x the time of iovmap; view unmap {:.2} ms)",
                iovs.len(),
                ms(naive_took),
                naive_took.as_secs_f64() / took.as_secs_f64(),
                ms(unmap)
            ));
            json!({ "syscalls": iovs.len(), "map_ms": ms(naive_took), "ratio": naive_took.as_secs_f64() / took.as_secs_f64() })
        }
        Err(e) => {
            report.lines.push(format!("naive loop: fails: {e} (iovmap fell back to the registered fd)"));
            json!({ "error": e.to_string() })
        }
    };
    report.json["iovmap"] = json!({
        "stats": stats_json(&s), "map_ms": ms(took), "verified_bytes": checked,
        "verify_ms": ms(verify_took), "unmap_ms": ms(unmap),
    });
    report.json["naive"] = naive_json;
    report.naive = Some(naive_took);
    Ok(())
}

/// Builds the same view through udmabuf where the kernel has it, or says why not.
fn kernel_built(
    remapper: &Remapper,
    iovs: &[libc::iovec],
    report: &mut Report,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let view = match remapper.map_with(iovs, MapOptions::new().kernel_built()) {
        Ok(view) => view,
        Err(Error::KernelBuilt { reason, .. }) => {
            report.lines.push(format!("kernel-built (udmabuf): not here: {reason}"));
            report.json["kernel_built"] = json!({ "unavailable": reason.to_string() });
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let took = t.elapsed();
    let s = *view.stats();
    let checked = verify(&view, iovs)?;
    let t = Instant::now();
    drop(view);
    let unmap = t.elapsed();
    let vs_naive = report.naive.map_or(String::new(), |n| {
        format!(" (the naive loop takes {:.0}x as long)", n.as_secs_f64() / took.as_secs_f64())
    });
    report.lines.push(format!(
        "kernel-built (udmabuf): runs {}  dma-bufs {}  syscalls {}  time {:.2} ms{vs_naive}, {checked} bytes verified, unmap {:.2} ms",
        s.kernel_built,
        s.dmabufs,
        s.syscalls,
        ms(took),
        ms(unmap)
    ));
    report.json["kernel_built"] =
        json!({ "stats": stats_json(&s), "map_ms": ms(took), "verified_bytes": checked, "unmap_ms": ms(unmap) });
    Ok(())
}

fn memfd_mode(args: &Args, report: &mut Report) -> Result<(), Box<dyn std::error::Error>> {
    let page = kit::page();
    let ram_pages = (args.ram_mib << 20) / page;
    let blob_pages = (args.blob_mib << 20) / page;
    let t = Instant::now();
    // Sealed and registered as QEMU's memory-backend-memfd RAM is, so that the kernel can
    // build the view too where it has udmabuf.
    let ram = GuestRam::sealed(ram_pages * page)?;
    ram.fill(args.seed);
    let chunks = workloads::fragmented(ram_pages, blob_pages, args.max_run, args.seed);
    let iovs = workloads::page_iovecs(ram.ptr(), &chunks, page);
    report.lines.push(format!(
        "guest RAM: {} MiB sealed memfd (filled in {:.0} ms); blob: {} MiB in {} iovecs of {} KiB, runs of 1-{} pages, seed {}",
        args.ram_mib,
        ms(t.elapsed()),
        args.blob_mib,
        iovs.len(),
        page >> 10,
        args.max_run,
        args.seed
    ));
    report.json["guest"] = json!({ "ram_mib": args.ram_mib, "blob_mib": args.blob_mib, "iovecs": iovs.len() });
    let mut remapper = Remapper::new();
    remapper.register(ram.ptr(), ram.len(), ram.fd(), 0)?;
    map_verify_compare(|| remapper.map_with(&iovs, MapOptions::new().remap_only()), &iovs, report)?;
    kernel_built(&remapper, &iovs, report)?;

    // A BAR-like region: VM_PFNMAP, the clone is refused; iovmap maps the registered fd.
    match PerfRing::new(8) {
        Ok(ring) => {
            let list = [ram.iov(0, page), ring.map.iov(0, ring.map.len()), ram.iov(2 * page, page)];
            let naive = iovmap_peers::naive_map(&list).map(drop);
            let mut remapper = Remapper::new();
            remapper.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0)?;
            let view = remapper.map(&list)?;
            let s = *view.stats();
            let checked = verify(&view, &list)?;
            let naive = naive.err().map_or("ok".to_string(), |e| format!("fails: {e}"));
            report.lines.push(format!(
                "BAR-like (perf_event ring, VmFlags pf io de): naive loop {naive}; iovmap: runs {}  cloned {}  fd_mapped {}  syscalls {}, {checked} bytes verified",
                s.runs, s.cloned, s.fd_mapped, s.syscalls
            ));
            report.json["bar_like"] = json!({ "naive": naive, "iovmap": stats_json(&s), "verified_bytes": checked });
        }
        Err(e) => {
            report.lines.push(format!("BAR-like: skipped, {e}"));
            report.json["bar_like"] = json!({ "skipped": e.to_string() });
        }
    }
    Ok(())
}

const MIB: usize = 1 << 20;

fn vm_memory_mode(args: &Args, report: &mut Report) -> Result<(), Box<dyn std::error::Error>> {
    let page = kit::page();
    // Guest RAM: low RAM at 0, a hole (the PCI window), high RAM at 4 GiB, and 64 MiB of
    // hugetlb RAM right after it when the host has the huge pages.
    let low = args.ram_mib / 2 * MIB;
    let high = args.ram_mib * MIB - low;
    let huge_len = 64 * MIB;
    let huge = kit::free_huge_pages() * kit::HUGE_2M >= huge_len;
    let file = |len: usize, flags: libc::c_uint| -> std::io::Result<Option<FileOffset>> {
        let f = kit::memfd("guest-ram", flags)?;
        f.set_len(len as u64)?;
        Ok(Some(FileOffset::new(f, 0)))
    };
    let high_start = 4u64 << 30;
    let huge_start = high_start + high as u64;
    let mut ranges = vec![(GuestAddress(0), low, file(low, 0)?), (GuestAddress(high_start), high, file(high, 0)?)];
    if huge {
        ranges.push((GuestAddress(huge_start), huge_len, file(huge_len, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)?));
    }
    let t = Instant::now();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges)?;
    for region in mem.iter() {
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0))?;
        // SAFETY: the region's whole mapping, which only this demo uses.
        unsafe { kit::fill(host, region.len() as usize, args.seed, region.start_addr().0 as usize) };
    }
    let fill = t.elapsed();

    // The blob: whole huge pages first (a 2 MiB-aligned scanout buffer), then a
    // fragmented allocation of 4 KiB pages spread over low and high RAM.
    let mut blob: Vec<(GuestAddress, usize)> = Vec::new();
    if huge {
        for i in [3usize, 0, 5] {
            blob.push((GuestAddress(huge_start + (i * kit::HUGE_2M) as u64), kit::HUGE_2M));
        }
    }
    let ram_pages = (low + high) / page;
    for c in workloads::fragmented(ram_pages, (args.blob_mib * MIB) / page, args.max_run, args.seed) {
        let mut addr = (c.page * page) as u64;
        let mut len = c.pages * page;
        if addr >= low as u64 {
            addr = addr - low as u64 + high_start;
        } else if addr + len as u64 > low as u64 {
            len = low - addr as usize; // keep each entry inside one region
        }
        blob.push((GuestAddress(addr), len));
    }
    let regions: Vec<String> = mem.iter().map(|r| format!("{:#x}+{}M", r.start_addr().0, r.len() >> 20)).collect();
    report.lines.push(format!(
        "guest (vm-memory): regions {} ({}hugetlb; filled in {:.0} ms); blob: {} guest-physical entries, {} MiB",
        regions.join(", "),
        if huge { "" } else { "no free huge pages, so no " },
        ms(fill),
        blob.len(),
        blob.iter().map(|e| e.1).sum::<usize>() >> 20
    ));
    report.json["guest"] = json!({ "regions": regions, "hugetlb": huge, "entries": blob.len(), "blob_bytes": blob.iter().map(|e| e.1).sum::<usize>() });

    let remapper = Remapper::from_guest_memory(&mem)?;
    // The host iovecs of the same list, for verification and the naive loop.
    let iovs: Vec<libc::iovec> = blob
        .iter()
        .map(|&(gpa, len)| Ok(kit::iov(mem.get_host_address(gpa)?, len)))
        .collect::<Result<_, vm_memory::GuestMemoryError>>()?;
    map_verify_compare(|| remapper.map_guest(&mem, &blob, iovmap::MapOptions::new()), &iovs, report)?;

    // Through vm-memory's own accessors: the view is a VolatileSlice.
    let view = remapper.map_guest(&mem, &blob, iovmap::MapOptions::new())?;
    let slice = view.as_volatile_slice();
    let last = blob.last().expect("a non-empty blob");
    let offset = view.len() - last.1;
    slice.write_obj(0xfeed_f00d_u32, offset)?;
    let seen: u32 = mem.read_obj(last.0)?;
    report.lines.push(format!(
        "VolatileSlice: wrote {:#x} at view offset {offset:#x}, guest memory at {:#x} reads {seen:#x}",
        0xfeed_f00d_u32, last.0.0
    ));
    if seen != 0xfeed_f00d {
        return Err("a write through the view did not reach guest memory".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut report = Report {
        lines: Vec::new(),
        json: json!({
            "mode": args.mode.to_possible_value().map(|v| v.get_name().to_string()),
            "seed": args.seed,
        }),
        naive: None,
    };
    let result = match args.mode {
        Mode::Memfd => memfd_mode(&args, &mut report),
        Mode::VmMemory => vm_memory_mode(&args, &mut report),
    };
    if let Err(e) = &result {
        report.lines.push(format!("iovmap-demo: {e}"));
        report.json["error"] = json!(e.to_string());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json).expect("a JSON value serializes"));
    } else {
        for l in &report.lines {
            println!("{l}");
        }
    }
    if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
