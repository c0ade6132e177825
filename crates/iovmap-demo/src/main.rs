//! iovmap demo: the main job on an embedded default, no arguments, no setup.
//!
//! Builds a memfd-backed fake guest RAM (1 GiB), takes a fragmented scatter list like
//! the backing of a virtio-gpu blob (one iovec per 4 KiB page, in runs of 1-64 adjacent
//! pages scattered over guest RAM), maps it into one contiguous view, verifies every
//! byte, and times the naive one-clone-per-iovec loop on the same list. Then it shows
//! the fallback on a BAR-like region the kernel will not clone (a perf_event ring).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use iovmap::{Remapper, View};
use iovmap_testkit::{self as kit, GuestRam, PerfRing, workloads};

#[derive(Parser, Debug)]
#[command(about = "Map a fragmented guest buffer into one contiguous view, verify it, compare with the naive loop")]
struct Args {
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
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Compares the view with its sources, segment by segment. Returns the bytes checked.
fn verify(view: &View, iovs: &[libc::iovec]) -> Result<usize, String> {
    let mut at = 0;
    for (i, iov) in iovs.iter().enumerate() {
        // SAFETY: the view is live for len() bytes and the sources are the demo's own
        // guest RAM; nothing writes either while this runs.
        let diff = unsafe { kit::first_difference(view.as_ptr().add(at), iov.iov_base as *const u8, iov.iov_len) };
        if let Some(d) = diff {
            return Err(format!("byte {} of segment {i} differs from guest RAM", d));
        }
        at += iov.iov_len;
    }
    Ok(at)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let page = kit::page();
    let ram_pages = (args.ram_mib << 20) / page;
    let blob_pages = (args.blob_mib << 20) / page;
    let t = Instant::now();
    let ram = GuestRam::new(ram_pages * page)?;
    ram.fill(args.seed);
    let chunks = workloads::fragmented(ram_pages, blob_pages, args.max_run, args.seed);
    let iovs = workloads::page_iovecs(ram.ptr(), &chunks, page);
    println!(
        "guest RAM: {} MiB memfd (filled in {}); blob: {} MiB in {} iovecs of 4 KiB, runs of 1-{} pages, seed {}",
        args.ram_mib,
        ms(t.elapsed()),
        args.blob_mib,
        iovs.len(),
        args.max_run,
        args.seed
    );

    let remapper = Remapper::new();
    let t = Instant::now();
    let view = remapper.map(&iovs)?;
    let took = t.elapsed();
    let s = view.stats();
    println!(
        "iovmap:     segments {}  runs {}  cloned {}  fd_mapped {}  syscalls {}  time {}",
        s.segments,
        s.runs,
        s.cloned,
        s.fd_mapped,
        s.syscalls,
        ms(took)
    );
    let t = Instant::now();
    let checked = verify(&view, &iovs)?;
    println!("verified:   {checked} bytes through the view, identical to guest RAM ({})", ms(t.elapsed()));
    let t = Instant::now();
    drop(view);
    let unmap = t.elapsed();

    let t = Instant::now();
    let naive = iovmap_peers::naive_map(&iovs)?;
    let naive_took = t.elapsed();
    drop(naive);
    println!(
        "naive loop: one mremap per iovec, syscalls {}  time {}  ({:.0}x the time of iovmap; view unmap {})",
        iovs.len(),
        ms(naive_took),
        naive_took.as_secs_f64() / took.as_secs_f64(),
        ms(unmap)
    );

    // A BAR-like region: VM_PFNMAP, the clone is refused; iovmap maps the registered fd.
    match PerfRing::new(8) {
        Ok(ring) => {
            let list = [ram.iov(0, page), ring.map.iov(0, ring.map.len()), ram.iov(2 * page, page)];
            let naive = iovmap_peers::naive_map(&list).map(drop);
            let mut remapper = Remapper::new();
            remapper.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0)?;
            let view = remapper.map(&list)?;
            let s = view.stats();
            println!(
                "BAR-like (perf_event ring, VmFlags pf io de): naive loop -> {}; iovmap -> runs {}  cloned {}  fd_mapped {}  syscalls {}, {} bytes verified",
                naive.err().map_or("ok".to_string(), |e| format!("error: {e}")),
                s.runs,
                s.cloned,
                s.fd_mapped,
                s.syscalls,
                verify(&view, &list)?
            );
        }
        Err(e) => println!("BAR-like: skipped, {e}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iovmap-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
