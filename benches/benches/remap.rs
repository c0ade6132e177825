//! iovmap side by side with its peers, on the same lists, in the same run.
//!
//! `cargo bench` (from the workspace root) runs everything; `cargo bench -- w2` one
//! group. `cargo run -p iovmap-benches --bin report --release` turns the results into the
//! table and plot of docs/benchmarks.md. The workloads are described in `src/lib.rs`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use iovmap::{MapOptions, Remapper};
use iovmap_benches::{PAGE, Workload, bar_like, contiguous, fragmented, guest_ram, scattered};
use iovmap_peers::{bounce_copy, fd_arena, floor, naive_map};
use iovmap_testkit::GuestRam;

/// Times building the view of `w` with each peer; the view is dropped outside the timing.
fn peers(c: &mut Criterion, group: &str, param: usize, w: &Workload, ram: &GuestRam, bounce: &mut [u8]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    let remapper = Remapper::new();
    let populate = MapOptions::new().populate();
    g.bench_with_input(BenchmarkId::new("iovmap", param), w, |b, w| {
        b.iter_batched(|| (), |()| remapper.map(black_box(&w.iovs)).unwrap(), BatchSize::PerIteration)
    });
    g.bench_with_input(BenchmarkId::new("iovmap_populate", param), w, |b, w| {
        b.iter_batched(|| (), |()| remapper.map_with(black_box(&w.iovs), populate).unwrap(), BatchSize::PerIteration)
    });
    g.bench_with_input(BenchmarkId::new("naive", param), w, |b, w| {
        b.iter_batched(|| (), |()| naive_map(black_box(&w.iovs)).unwrap(), BatchSize::PerIteration)
    });
    g.bench_with_input(BenchmarkId::new("fd_arena", param), w, |b, w| {
        b.iter_batched(|| (), |()| fd_arena(ram.fd(), black_box(&w.pieces)).unwrap(), BatchSize::PerIteration)
    });
    g.bench_with_input(BenchmarkId::new("bounce_copy", param), w, |b, w| {
        // SAFETY: the sources are the benchmark's guest RAM, which nothing writes.
        b.iter(|| unsafe { bounce_copy(black_box(&w.iovs), &mut bounce[..w.bytes]) })
    });
    g.finish();
}

fn w1_w2_w3(c: &mut Criterion) {
    let ram = guest_ram();
    let mut bounce = vec![0u8; 1 << 30];
    peers(c, "w1_contiguous", 262_144, &contiguous(&ram, 262_144), &ram, &mut bounce);
    // W2 and W3 are the last points of the two size sweeps drawn in docs/benchmarks.svg.
    for n in [64, 1024, 16_384, 262_144] {
        peers(c, "w2_fragmented", n, &fragmented(&ram, n), &ram, &mut bounce);
    }
    for n in [64, 1024, 16_384, 60_000] {
        peers(c, "w3_scattered", n, &scattered(&ram, n), &ram, &mut bounce);
    }
}

fn w4_bar_like(c: &mut Criterion) {
    let w4 = match bar_like() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("w4_bar_like: skipped: {e}");
            return;
        }
    };
    // The naive loop cannot do this list at all: the kernel refuses the clone (EFAULT).
    assert!(naive_map(&w4.list.iovs).is_err());
    drop(w4.remapper.map(&w4.list.iovs).unwrap()); // learn the refusal once
    let mut g = c.benchmark_group("w4_bar_like");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::new("iovmap", 4096), |b| {
        b.iter_batched(|| (), |()| w4.remapper.map(black_box(&w4.list.iovs)).unwrap(), BatchSize::PerIteration)
    });
    g.bench_function(BenchmarkId::new("fd_arena", 4096), |b| {
        b.iter_batched(
            || (),
            |()| fd_arena(w4.array.fd(), black_box(&w4.list.pieces)).unwrap(),
            BatchSize::PerIteration,
        )
    });
    let mut bounce = vec![0u8; w4.list.bytes];
    g.bench_function(BenchmarkId::new("bounce_copy", 4096), |b| {
        // SAFETY: the sources are the BPF array, which nothing writes.
        b.iter(|| unsafe { bounce_copy(black_box(&w4.list.iovs), &mut bounce) })
    });
    g.finish();
}

fn w5_small(c: &mut Criterion) {
    let ram = GuestRam::new(1024 * PAGE).unwrap();
    ram.fill(5);
    let remapper = Remapper::new();
    let mut g = c.benchmark_group("w5_small");
    g.sample_size(30).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for n in [1, 4, 16, 256] {
        let w = scattered(&ram, n);
        // Whole cycles: map and drop (the floor below also unmaps).
        g.bench_with_input(BenchmarkId::new("iovmap", n), &w, |b, w| {
            b.iter(|| drop(remapper.map(black_box(&w.iovs)).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("naive", n), &w, |b, w| {
            b.iter(|| drop(naive_map(black_box(&w.iovs)).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("fd_arena", n), &w, |b, w| {
            b.iter(|| drop(fd_arena(ram.fd(), black_box(&w.pieces)).unwrap()))
        });
        // As a consumer uses a view: map, read the first byte of every page, drop.
        g.bench_with_input(BenchmarkId::new("iovmap_touched", n), &w, |b, w| {
            b.iter(|| {
                let v = remapper.map(black_box(&w.iovs)).unwrap();
                black_box(read_pages(v.as_ptr(), v.len()));
            })
        });
        g.bench_with_input(BenchmarkId::new("naive_touched", n), &w, |b, w| {
            b.iter(|| {
                let m = naive_map(black_box(&w.iovs)).unwrap();
                black_box(read_pages(m.ptr(), m.len()));
            })
        });
        let mut bounce = vec![0u8; w.bytes];
        // SAFETY: the sources are the benchmark's guest RAM, which nothing writes.
        g.bench_with_input(BenchmarkId::new("bounce_copy", n), &w, |b, w| {
            b.iter(|| unsafe { bounce_copy(black_box(&w.iovs), &mut bounce) })
        });
    }
    let one = scattered(&ram, 1);
    g.bench_function(BenchmarkId::new("floor_reserve_clone_unmap", 1), |b| {
        b.iter(|| floor::reserve_clone_unmap(black_box(one.iovs[0].iov_base as *const u8), PAGE).unwrap())
    });
    g.finish();
}

/// Reads the first byte of every page of `[p, p + len)`, a live view or mapping.
fn read_pages(p: *const u8, len: usize) -> u64 {
    // SAFETY: the callers pass the range of a live view or mapping.
    unsafe { iovmap_testkit::touch_pages(p, len) }
}

fn teardown(c: &mut Criterion) {
    let ram = guest_ram();
    let remapper = Remapper::new();
    let mut g = c.benchmark_group("teardown");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    for (name, w) in
        [("w1", contiguous(&ram, 262_144)), ("w2", fragmented(&ram, 262_144)), ("w3", scattered(&ram, 60_000))]
    {
        g.bench_function(BenchmarkId::new("iovmap", name), |b| {
            b.iter_batched(|| remapper.map(&w.iovs).unwrap(), drop, BatchSize::PerIteration)
        });
        g.bench_function(BenchmarkId::new("naive", name), |b| {
            b.iter_batched(|| naive_map(&w.iovs).unwrap(), drop, BatchSize::PerIteration)
        });
    }
    g.finish();
}

/// The pure planning step alone, on 1,000,000 segments over a table of one mapping.
fn planning(c: &mut Criterion) {
    use iovmap::plan::{Plan, Vma, plan, plan_into};
    let base = 0x1000_0000_0000usize;
    let n = 1_000_000usize;
    let iov = |page: usize| libc::iovec { iov_base: (base + page * PAGE) as *mut libc::c_void, iov_len: PAGE };
    let vma = Vma {
        start: base,
        end: base + 2 * n * PAGE,
        prot: libc::PROT_READ | libc::PROT_WRITE,
        shared: true,
        page_size: PAGE,
        ..Default::default()
    };
    let chunks = iovmap_testkit::workloads::fragmented(2 * n, n, 64, 2);
    let lists = [
        ("contiguous", (0..n).map(iov).collect::<Vec<_>>()),
        ("fragmented", chunks.iter().flat_map(|c| (c.page..c.page + c.pages).map(iov)).collect()),
        ("scattered", iovmap_testkit::workloads::scattered(n, 3).iter().map(|c| iov(c.page)).collect()),
    ];
    let mut g = c.benchmark_group("planning");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    for (name, list) in &lists {
        // Into fresh memory each time, as a one-off call does.
        g.bench_function(BenchmarkId::new(*name, n), |b| {
            b.iter(|| plan(black_box(list), &mut [vma][..], &[], PAGE).unwrap())
        });
        // Reusing the run list's memory, as a caller that plans repeatedly does.
        let mut reused = Plan::default();
        g.bench_function(BenchmarkId::new(format!("{name}_reused"), n), |b| {
            b.iter(|| plan_into(black_box(list), &mut [vma][..], &[], PAGE, &mut reused).unwrap())
        });
    }
    g.finish();
}

/// What one placement costs: a single-page clone, and a single-page fd map, into a
/// reservation (per placement, 10,000 in a row); and W3's syscall floor: 60,000
/// single-page clones in a row (a clone costs more as the reservation it splits holds more
/// VMAs, so the floor of a 60,000-run view is measured at that size).
fn placement_floor(c: &mut Criterion) {
    let ram = GuestRam::new(40_000 * PAGE).unwrap();
    let srcs: Vec<*const u8> = iovmap_testkit::workloads::scattered(10_000, 3)
        .iter()
        .map(|c| ram.ptr().wrapping_add(c.page * PAGE) as *const u8)
        .collect();
    let offsets: Vec<u64> =
        iovmap_testkit::workloads::scattered(10_000, 3).iter().map(|c| (c.page * PAGE) as u64).collect();
    let mut g = c.benchmark_group("placement_floor");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    // Batches of at most 10,000 placements, so the VMAs stay far from vm.max_map_count.
    g.bench_function("clone_one_page", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let k = left.min(srcs.len());
                total += floor::timed_clones(&srcs[..k], PAGE).unwrap();
                left -= k;
            }
            total
        })
    });
    let w3 = {
        let ram = Box::leak(Box::new(GuestRam::new(120_000 * PAGE).unwrap()));
        iovmap_testkit::workloads::scattered(60_000, 3)
            .iter()
            .map(|c| ram.ptr().wrapping_add(c.page * PAGE) as *const u8)
            .collect::<Vec<_>>()
    };
    g.sample_size(10);
    g.bench_function("clones_60000", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| floor::timed_clones(&w3, PAGE).unwrap()).sum())
    });
    g.sample_size(20);
    g.bench_function("fd_map_one_page", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let k = left.min(offsets.len());
                total += floor::timed_fd_maps(ram.fd(), &offsets[..k], PAGE).unwrap();
                left -= k;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, planning, placement_floor, w5_small, w4_bar_like, w1_w2_w3, teardown);
criterion_main!(benches);
