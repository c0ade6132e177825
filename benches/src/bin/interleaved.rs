//! Peers measured side by side, interleaved round by round, so that the drift of a shared
//! machine (or of a TCG guest) cancels out of their ratios. Prints markdown tables of
//! medians and ratios for docs/benchmarks.md.
//!
//! ```text
//! interleaved small [ROUNDS]          W5: map (+ first read) + drop of 1, 4, 16 scattered pages
//! interleaved large [ROUNDS] [MiB]    W3 (16,384 and 60,000 scattered pages) and W2
//!                                     (fragmented), build, build + first touch, teardown
//! interleaved crossover [ROUNDS]      udmabuf against remapping by list size and by run
//!                                     length: where automatic placement switches
//! interleaved w1 [ROUNDS]             W1 (262,144 adjacent iovecs) against the floor: one
//!                                     pass over the list and the syscalls of one run
//! ```
//!
//! Peers: iovmap with automatic placement (udmabuf where /dev/udmabuf exists), iovmap
//! remap only (clone or fd, as 0.1), and the naive loop (a reservation, one clone per
//! iovec, munmap). Guest RAM is a registered memfd sealed as QEMU's memory-backend-memfd
//! seals it, so automatic placement may build views in the kernel. Run it on the host
//! (`cargo run --release -p iovmap-benches --bin interleaved -- small`) or in a guest
//! (crates/iovmap-vmtest/matrix.sh runs it in the newest row).

use std::hint::black_box;
use std::time::{Duration, Instant};

use iovmap::{MapOptions, Remapper};
use iovmap_peers::{floor_map, naive_map};
use iovmap_testkit::{self as kit, GuestRam, workloads};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn human(ms: f64) -> String {
    if ms >= 1.0 { format!("{ms:.2} ms") } else { format!("{:.2} µs", ms * 1e3) }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Reads one byte of every page of `[p, p + len)`: the first touch a consumer makes.
fn touch(p: *const u8, len: usize) -> u64 {
    // SAFETY: callers pass the range of a live view or mapping.
    unsafe { kit::touch_pages(p, len) }
}

/// The peers a table compares, in its column order.
const PEERS: [&str; 3] = ["iovmap (automatic)", "iovmap (remap only)", "naive loop"];

struct Setup {
    ram: GuestRam,
    remapper: Remapper,
    page: usize,
}

fn setup(ram_bytes: usize) -> Setup {
    let ram = GuestRam::sealed(ram_bytes).expect("sealed memfd guest RAM");
    ram.fill(1);
    let mut remapper = Remapper::new();
    remapper.register(ram.ptr(), ram.len(), ram.fd(), 0).expect("register guest RAM");
    Setup { ram, remapper, page: kit::page() }
}

/// W5: `inner` map (+ first read of every page) + drop cycles per peer per round, timed
/// together: a view is made to be read, so the table with the read is the one that
/// counts; the one without it says where the time goes.
fn small(rounds: usize) {
    let s = setup(64 << 20);
    let auto = MapOptions::new();
    let remap = MapOptions::new().remap_only();
    // The same RAM unregistered: memfd RAM needs no registration to be cloned, and then
    // no piece has a registration to check against its VMA.
    let unregistered = Remapper::new();
    for touched in [true, false] {
        println!(
            "W5 small, map{} + drop, medians of {rounds} interleaved rounds (per view):\n",
            if touched { " + first read of every page" } else { "" }
        );
        println!(
            "| iovecs | {} | {} | iovmap (RAM not registered) | {} | automatic / naive | remap only / naive | not registered / naive |",
            PEERS[0], PEERS[1], PEERS[2]
        );
        println!("|---|---|---|---|---|---|---|---|");
        for n in [1usize, 4, 16] {
            let list = workloads::page_iovecs(s.ram.ptr(), &workloads::scattered(n, 3), s.page);
            let inner = (2000 / n).max(50);
            let read = |p: *const u8, len: usize| if touched { black_box(touch(p, len)) } else { 0 };
            let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (k, peer) in t.iter_mut().enumerate() {
                    let start = Instant::now();
                    for _ in 0..inner {
                        match k {
                            0 => {
                                let v = s.remapper.map_with(black_box(&list), auto).unwrap();
                                read(v.as_ptr(), v.len());
                            }
                            1 => {
                                let v = s.remapper.map_with(black_box(&list), remap).unwrap();
                                read(v.as_ptr(), v.len());
                            }
                            2 => {
                                let v = unregistered.map(black_box(&list)).unwrap();
                                read(v.as_ptr(), v.len());
                            }
                            _ => {
                                let m = naive_map(black_box(&list)).unwrap();
                                read(m.ptr(), m.len());
                            }
                        }
                    }
                    peer.push(ms(start.elapsed()) / inner as f64);
                }
            }
            let [a, r, u, nv] = t.map(median);
            println!(
                "| {n} | {} | {} | {} | {} | {:.2}x | {:.2}x | {:.2}x |",
                human(a),
                human(r),
                human(u),
                human(nv),
                a / nv,
                r / nv,
                u / nv
            );
        }
        println!();
    }
}

/// W1 against the floor: 262,144 adjacent iovecs over 1 GiB of memfd RAM (one run),
/// map + drop, and map + one read + drop, interleaved. The floor (`iovmap_peers::floor_map`)
/// is one pass over the list that coalesces and counts, plus the one clone and the munmap.
fn w1(rounds: usize) {
    let ram = GuestRam::new(1 << 30).expect("1 GiB of memfd guest RAM");
    ram.fill(1);
    let page = kit::page();
    let list = workloads::page_iovecs(ram.ptr(), &[workloads::Chunk { page: 0, pages: (1 << 30) / page }], page);
    let remapper = Remapper::new();
    println!("W1: {} adjacent iovecs, medians of {rounds} interleaved rounds:\n", list.len());
    println!("| step | iovmap | floor (one pass + the clone + munmap) | iovmap / floor |");
    println!("|---|---|---|---|");
    for touched in [false, true] {
        let mut t = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            let start = Instant::now();
            let v = remapper.map(black_box(&list)).unwrap();
            if touched {
                // SAFETY: the view's first byte.
                black_box(unsafe { v.as_ptr().read_volatile() });
            }
            drop(v);
            t[0].push(ms(start.elapsed()));
            let start = Instant::now();
            let m = floor_map(black_box(&list)).unwrap();
            if touched {
                // SAFETY: the mapping's first byte.
                black_box(unsafe { m.ptr().read_volatile() });
            }
            drop(m);
            t[1].push(ms(start.elapsed()));
        }
        let [a, f] = t.map(median);
        let step = if touched { "map + first read + drop" } else { "map + drop" };
        println!("| {step} | {} | {} | {:.2}x |", human(a), human(f), a / f);
    }
    println!();
}

/// W3 and W2: build, build + touch, teardown, each peer once per round.
fn large(rounds: usize, ram_mib: usize) {
    let s = setup(ram_mib << 20);
    let pages = s.ram.len() / s.page;
    let mut lists = Vec::new();
    for n in [16_384usize, 60_000] {
        if 2 * n <= pages {
            lists.push((format!("W3 scattered, {n} pages"), workloads::scattered(n, 3)));
        } else {
            println!(
                "W3 with {n} pages skipped: it needs {} MiB of guest RAM, {ram_mib} MiB here\n",
                (2 * n * s.page) >> 20
            );
        }
    }
    lists.push(("W2 fragmented".to_string(), workloads::fragmented(pages, pages / 4, 64, 2)));
    // The naive loop of 60,000 pages needs that many VMAs: lift a lowered cap (a guest's).
    let cap: usize =
        std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530);
    if cap < 65530 && std::fs::write("/proc/sys/vm/max_map_count", "65530").is_err() {
        println!("vm.max_map_count is {cap} and cannot be raised: lists over it are refused\n");
    }
    let auto = MapOptions::new();
    let remap = MapOptions::new().remap_only();
    for (name, chunks) in &lists {
        let list = workloads::page_iovecs(s.ram.ptr(), chunks, s.page);
        let runs = s.remapper.map_with(&list, remap).map(|v| v.stats().runs).unwrap_or(0);
        let probe = s.remapper.map(&list).ok();
        let kb = probe.as_ref().map_or(0, |v| v.stats().dmabufs);
        let declined = probe.as_ref().and_then(|v| v.stats().kernel_built_declined);
        drop(probe);
        // [peer][build, build + touch, teardown]; the last peer, kernel-built whatever the
        // list, shows what automatic placement chose against.
        let forced = kit::udmabuf().is_ok();
        let mut t: [[Vec<f64>; 3]; 4] = Default::default();
        for _ in 0..rounds {
            for (k, peer) in t.iter_mut().enumerate().take(if forced { 4 } else { 3 }) {
                let start = Instant::now();
                let built = match k {
                    0 => Built::View(s.remapper.map_with(&list, auto).unwrap()),
                    1 => Built::View(s.remapper.map_with(&list, remap).unwrap()),
                    2 => Built::Naive(naive_map(&list).unwrap()),
                    _ => Built::View(s.remapper.map_with(&list, MapOptions::new().kernel_built()).unwrap()),
                };
                let (ptr, len) = match &built {
                    Built::View(v) => (v.as_ptr(), v.len()),
                    Built::Naive(m) => (m.ptr().cast_const(), m.len()),
                };
                let build = start.elapsed();
                black_box(touch(ptr, len));
                let touched = start.elapsed();
                let start = Instant::now();
                drop(built);
                let torn = start.elapsed();
                peer[0].push(ms(build));
                peer[1].push(ms(touched));
                peer[2].push(ms(torn));
            }
        }
        let m = t.map(|p| p.map(|v| if v.is_empty() { f64::NAN } else { median(v) }));
        println!(
            "{name}: {} iovecs, {runs} runs; automatic placement: {}",
            list.len(),
            match (kb, declined) {
                (0, Some(why)) => format!("remapped ({why})"),
                (0, None) => "remapped (not worth a dma-buf)".to_string(),
                (n, _) => format!("{n} dma-bufs (udmabuf)"),
            }
        );
        println!("medians of {rounds} interleaved rounds:\n");
        println!(
            "| step | {} | {} | {} | naive / automatic | naive / remap only | kernel-built (forced) |",
            PEERS[0], PEERS[1], PEERS[2]
        );
        println!("|---|---|---|---|---|---|---|");
        for (i, step) in ["build", "build + first touch", "teardown"].iter().enumerate() {
            let (a, r, n, k) = (m[0][i], m[1][i], m[2][i], m[3][i]);
            let forced = if k.is_nan() { "-".to_string() } else { format!("{} ({:.1}x)", human(k), n / k) };
            println!(
                "| {step} | {} | {} | {} | {:.1}x | {:.2}x | {forced} |",
                human(a),
                human(r),
                human(n),
                n / a,
                n / r
            );
        }
        println!();
    }
}

/// Where kernel-built views start to pay: forced kernel-built against remap only, map +
/// first touch + drop, over scattered lists of n pages and over 64 runs of L pages.
fn crossover(rounds: usize) {
    if let Err(why) = kit::udmabuf() {
        println!("crossover: nothing to measure: {why}");
        return;
    }
    let s = setup(256 << 20);
    let kb = MapOptions::new().kernel_built();
    let remap = MapOptions::new().remap_only();
    let cycle = |list: &[libc::iovec], opts: MapOptions| {
        let v = s.remapper.map_with(list, opts).unwrap();
        black_box(touch(v.as_ptr(), v.len()));
    };
    let measure = |list: &[libc::iovec], inner: usize| {
        let mut t = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (k, opts) in [kb, remap].into_iter().enumerate() {
                let start = Instant::now();
                for _ in 0..inner {
                    cycle(list, opts);
                }
                t[k].push(ms(start.elapsed()) / inner as f64);
            }
        }
        t.map(median)
    };
    println!("Kernel-built against remap only, map + first touch + drop, medians of {rounds} interleaved rounds:\n");
    println!("| list | kernel-built | remap only | remap / kernel-built |");
    println!("|---|---|---|---|");
    for n in [1usize, 2, 3, 4, 6, 8, 16, 64, 256] {
        let list = workloads::page_iovecs(s.ram.ptr(), &workloads::scattered(n, 3), s.page);
        let [k, r] = measure(&list, (256 / n).max(4));
        println!("| {n} scattered pages | {} | {} | {:.2}x |", human(k), human(r), r / k);
    }
    for len in [2usize, 4, 8, 16, 32, 64] {
        // 64 runs of `len` adjacent pages, a gap between runs.
        let chunks: Vec<workloads::Chunk> =
            (0..64).map(|i| workloads::Chunk { page: i * (len + 1), pages: len }).collect();
        let list = workloads::chunk_iovecs(s.ram.ptr(), &chunks, s.page);
        let [k, r] = measure(&list, 4);
        println!("| 64 runs of {len} pages | {} | {} | {:.2}x |", human(k), human(r), r / k);
    }
    println!();
}

/// What a peer built: dropping it is the teardown that is timed.
enum Built {
    View(iovmap::View),
    Naive(kit::Mapping),
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = args.get(1).and_then(|r| r.parse().ok());
    match args.first().map(String::as_str) {
        Some("small") => small(rounds.unwrap_or(15)),
        Some("large") => large(rounds.unwrap_or(5), args.get(2).and_then(|m| m.parse().ok()).unwrap_or(1024)),
        Some("crossover") => crossover(rounds.unwrap_or(9)),
        Some("w1") => w1(rounds.unwrap_or(31)),
        _ => {
            eprintln!(
                "usage: interleaved small [ROUNDS] | large [ROUNDS] [RAM MiB] | crossover [ROUNDS] | w1 [ROUNDS]"
            );
            std::process::exit(2);
        }
    }
    match kit::udmabuf() {
        Ok(()) => println!("(/dev/udmabuf present: automatic placement may build views in the kernel)"),
        Err(why) => println!("(automatic placement cannot use udmabuf here: {why})"),
    }
}
