//! Load: 8 threads share one `Remapper` and map and drop views of random lists over
//! shared regions (registered and unregistered memfd RAM, shared anonymous memory, a BPF
//! array, a perf ring, hugetlb RAM where huge pages can be had) for 30 s, read-only or
//! read-write, populated or not: no error, the bytes of one view in eight verified, and
//! the process's VMA and fd counts back where they were.
//!
//! Ignored by default (it takes 30 s); CI runs it shorter:
//! `IOVMAP_LOAD_SECS=5 cargo test -p iovmap --test load -- --ignored --nocapture`.
//! It counts process-wide VMAs and fds: it is the only test of this binary.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iovmap::{Access, MapOptions, Remapper};
use iovmap_testkit::workloads::Rng;
use iovmap_testkit::{self as kit, BpfArray, Counts, GuestRam, Mapping, PerfRing};

const THREADS: usize = 8;

struct Sources {
    ram: GuestRam,
    unregistered: GuestRam,
    anon: Mapping,
    bpf: Option<BpfArray>,
    ring: Option<PerfRing>,
    huge: Option<GuestRam>,
}

#[derive(Default)]
struct Totals {
    views: AtomicUsize,
    segments: AtomicUsize,
    runs: AtomicUsize,
    cloned: AtomicUsize,
    fd_mapped: AtomicUsize,
    bytes: AtomicUsize,
    verified: AtomicUsize,
    read_only: AtomicUsize,
    populated: AtomicUsize,
}

/// A random list that iovmap must map: interior boundaries on page boundaries, the first
/// segment possibly starting mid-page and the last possibly ending mid-page, huge pages
/// first (so that they land 2 MiB-aligned), the perf ring whole.
fn random_list(s: &Sources, rng: &mut Rng) -> Vec<libc::iovec> {
    let p = kit::page();
    let mut list: Vec<libc::iovec> = Vec::new();
    if let Some(h) = &s.huge {
        if rng.below(6) == 0 {
            let n = 1 + rng.below(2);
            list.push(h.iov(rng.below(h.len() / kit::HUGE_2M - n + 1) * kit::HUGE_2M, n * kit::HUGE_2M));
        }
    }
    let segments = 1 + rng.below(24);
    while list.len() < segments {
        let prev = list.last().map(|v| (v.iov_base as usize, v.iov_len));
        match rng.below(8) {
            // Continue the previous segment where it ended (a run grows), if it was RAM.
            0 | 1
                if prev.is_some_and(|(a, l)| {
                    let end = a + l;
                    end % p == 0 && end < s.ram.ptr() as usize + s.ram.len() && a >= s.ram.ptr() as usize
                }) =>
            {
                let (a, l) = prev.unwrap();
                let left = (s.ram.ptr() as usize + s.ram.len() - (a + l)) / p;
                list.push(kit::iov((a + l) as *const u8, (1 + rng.below(left.min(8))) * p));
            }
            2 => {
                let n = 1 + rng.below(8);
                list.push(s.unregistered.iov(rng.below(s.unregistered.len() / p - n + 1) * p, n * p));
            }
            3 => {
                let n = 1 + rng.below(4);
                list.push(s.anon.iov(rng.below(s.anon.len() / p - n + 1) * p, n * p));
            }
            4 if s.bpf.is_some() => {
                let a = s.bpf.as_ref().unwrap();
                let n = 1 + rng.below(4);
                // Anywhere, right after the perf ring included: both are anon-inode files,
                // which share one (st_dev, st_ino); iovmap keeps them apart.
                let at = rng.below(a.map.len() / p - n + 1);
                list.push(a.map.iov(at * p, n * p));
            }
            5 if s.ring.is_some() => {
                let r = s.ring.as_ref().unwrap();
                list.push(r.map.iov(0, r.map.len()));
            }
            _ => {
                let n = 1 + rng.below(8);
                list.push(s.ram.iov(rng.below(s.ram.len() / p - n + 1) * p, n * p));
            }
        }
    }
    // The first may start mid-page (not inside the perf ring's fd map: it must be whole,
    // and a mid-page start maps it from its first page anyway); the last may end mid-page.
    if rng.below(4) == 0 && list[0].iov_len > p {
        let skip = 1 + rng.below(p - 1);
        list[0].iov_base = (list[0].iov_base as usize + skip) as *mut libc::c_void;
        list[0].iov_len -= skip;
    }
    let last = list.len() - 1;
    if rng.below(4) == 0 && list[last].iov_len > p {
        list[last].iov_len -= 1 + rng.below(p - 1);
    }
    list
}

fn worker(r: &Remapper, s: &Sources, t: &Totals, seed: u64, until: Instant) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut n = 0u64;
    while Instant::now() < until {
        let list = random_list(s, &mut rng);
        let access = if rng.below(3) == 0 { Access::ReadOnly } else { Access::ReadWrite };
        let opts = MapOptions::new().with_access(access);
        let opts = if rng.below(3) == 0 { opts.populate() } else { opts };
        let view = r.map_with(&list, opts).map_err(|e| format!("view {n} of seed {seed:#x}: {e} ({e:?})"))?;
        let st = view.stats();
        if st.runs != st.cloned + st.fd_mapped || st.segments != list.iter().filter(|v| v.iov_len > 0).count() {
            return Err(format!("view {n} of seed {seed:#x}: inconsistent stats {st:?}"));
        }
        if n % 8 == 0 {
            // SAFETY: nothing writes the sources during the load.
            let want = unsafe { iovmap_peers::gather(&list) };
            // SAFETY: the view is live for len() bytes.
            if let Some(at) = unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) } {
                return Err(format!("view {n} of seed {seed:#x}: byte {at} differs from its source"));
            }
            t.verified.fetch_add(1, Ordering::Relaxed);
        }
        t.views.fetch_add(1, Ordering::Relaxed);
        t.segments.fetch_add(st.segments, Ordering::Relaxed);
        t.runs.fetch_add(st.runs, Ordering::Relaxed);
        t.cloned.fetch_add(st.cloned, Ordering::Relaxed);
        t.fd_mapped.fetch_add(st.fd_mapped, Ordering::Relaxed);
        t.bytes.fetch_add(view.len(), Ordering::Relaxed);
        t.read_only.fetch_add(usize::from(access == Access::ReadOnly), Ordering::Relaxed);
        t.populated.fetch_add(usize::from(opts.populates()), Ordering::Relaxed);
        n += 1;
    }
    Ok(())
}

/// Runs the workers for `d`, each thread joined (its stack back in glibc's cache).
fn run(r: &Remapper, s: &Sources, t: &Totals, d: Duration, seed: u64) -> Vec<String> {
    let until = Instant::now() + d;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| scope.spawn(move || worker(r, s, t, seed + i as u64 * 0x1_0000_0001, until)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect()
    })
}

#[test]
#[ignore = "takes 30 s (IOVMAP_LOAD_SECS): run with `cargo test -p iovmap --test load -- --ignored`"]
fn eight_threads_map_and_drop_views_of_random_lists() {
    let secs: f64 = std::env::var("IOVMAP_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30.0);
    // SAFETY: before the workers start; one malloc arena keeps the VMA count ours.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let p = kit::page();
    let s = Sources {
        ram: GuestRam::new(4096 * p).unwrap(),
        unregistered: GuestRam::new(1024 * p).unwrap(),
        anon: Mapping::anon_shared(256 * p).unwrap(),
        bpf: BpfArray::new(64).map_err(|e| eprintln!("SKIP part: no BPF array: {e}")).ok(),
        ring: PerfRing::new(2).map_err(|e| eprintln!("SKIP part: no perf ring: {e}")).ok(),
        huge: GuestRam::huge(4 * kit::HUGE_2M).map_err(|e| eprintln!("SKIP part: no huge pages: {e}")).ok(),
    };
    s.ram.fill(91);
    s.unregistered.fill(92);
    // SAFETY: fresh writable mappings, not shared yet.
    unsafe { kit::fill(s.anon.ptr(), s.anon.len(), 93, 0) };
    let mut r = Remapper::new();
    r.register(s.ram.ptr(), s.ram.len(), s.ram.fd(), 0).unwrap();
    if let Some(a) = &s.bpf {
        // SAFETY: as above.
        unsafe { kit::fill(a.map.ptr(), a.map.len(), 94, 0) };
        r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
    }
    if let Some(ring) = &s.ring {
        r.register(ring.map.ptr(), ring.map.len(), ring.fd(), 0).unwrap();
    }
    if let Some(h) = &s.huge {
        h.fill(95);
        r.register(h.ptr(), h.len(), h.fd(), 0).unwrap();
    }

    // Warm up: thread stacks cached, regions' clone refusals learned.
    let warm = Totals::default();
    let errors = run(&r, &s, &warm, Duration::from_millis(300), 1);
    assert!(errors.is_empty(), "warm-up: {errors:?}");
    let before = Counts::now();
    let t = Totals::default();
    let start = Instant::now();
    let errors = run(&r, &s, &t, Duration::from_secs_f64(secs), 0x10ad);
    let took = start.elapsed().as_secs_f64();
    let after = Counts::now();
    let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    println!(
        "load: {THREADS} threads x {took:.1} s: {} views ({:.0}/s; {} read-only, {} populated), {} segments, {} runs \
         ({} cloned, {} fd-mapped), {} MiB mapped, {} views verified byte for byte, {} errors; VMAs {} -> {}, \
         fds {} -> {}",
        get(&t.views),
        get(&t.views) as f64 / took,
        get(&t.read_only),
        get(&t.populated),
        get(&t.segments),
        get(&t.runs),
        get(&t.cloned),
        get(&t.fd_mapped),
        get(&t.bytes) >> 20,
        get(&t.verified),
        errors.len(),
        before.vmas,
        after.vmas,
        before.fds,
        after.fds,
    );
    assert!(errors.is_empty(), "{} threads failed: {errors:#?}", errors.len());
    assert_eq!(before, after, "VMAs or fds leaked under load");
    assert!(get(&t.views) > THREADS && get(&t.verified) > 0);
}
