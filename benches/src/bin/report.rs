//! Turns the results of `cargo bench` into docs/benchmarks.md's tables and
//! docs/benchmarks.svg.
//!
//! `cargo run --release -p iovmap-benches --bin report` after `cargo bench -p iovmap-benches` (from the
//! workspace root). It reads `target/criterion/<group>/<peer>/<param>/new/estimates.json`
//! (the median of each benchmark), measures the shapes the targets depend on (runs of W2,
//! syscalls of W4) with iovmap itself, rewrites the part of docs/benchmarks.md between
//! `<!-- results:begin -->` and `<!-- results:end -->`, and writes docs/benchmarks.svg.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

type Results = BTreeMap<String, f64>;

/// Every `new/estimates.json` under `dir`, by its path relative to `dir` (`group/peer/param`),
/// as the median in nanoseconds.
fn collect(dir: &Path, prefix: &str, out: &mut Results) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "report" || name == "base" || name == "change" {
            continue;
        }
        if name == "new" {
            if let Ok(text) = std::fs::read_to_string(path.join("estimates.json")) {
                let v: Value = serde_json::from_str(&text).expect("criterion's estimates.json");
                if let Some(median) = v["median"]["point_estimate"].as_f64() {
                    out.insert(prefix.trim_end_matches('/').to_string(), median);
                }
            }
        } else if path.is_dir() {
            collect(&path, &format!("{prefix}{name}/"), out);
        }
    }
}

fn get(r: &Results, key: &str) -> Option<f64> {
    r.get(key).copied()
}

/// A duration in ns, as text with a sensible unit.
fn human(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn cell(r: &Results, key: &str) -> String {
    get(r, key).map_or("n/a".into(), human)
}

/// `peer / iovmap`, the factor by which iovmap is faster (>1) or slower (<1).
fn ratio(r: &Results, peer: &str, iovmap: &str) -> String {
    match (get(r, peer), get(r, iovmap)) {
        (Some(p), Some(i)) => format!("{:.2}x", p / i),
        _ => "n/a".into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn workload_table(r: &Results, out: &mut String) {
    out.push_str("| workload | iovmap | iovmap + populate | naive loop | fd arena | bounce copy | naive / iovmap | fd arena / iovmap | bounce / iovmap |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let rows = [
        ("W1 contiguous, 262,144 iovecs", "w1_contiguous", "262144"),
        ("W2 fragmented, 262,144 iovecs", "w2_fragmented", "262144"),
        ("W3 scattered, 60,000 iovecs", "w3_scattered", "60000"),
        ("W4 BAR-like, 4,096 iovecs (BPF array)", "w4_bar_like", "4096"),
        ("W5 small, 1 iovec (map + drop)", "w5_small", "1"),
        ("W5 small, 4 iovecs (map + drop)", "w5_small", "4"),
        ("W5 small, 16 iovecs (map + drop)", "w5_small", "16"),
        ("W5 small, 256 iovecs (map + drop)", "w5_small", "256"),
    ];
    let touched = [
        ("W5 small, 1 iovec (map + first read of every page + drop)", "1"),
        ("W5 small, 4 iovecs (map + first read of every page + drop)", "4"),
        ("W5 small, 16 iovecs (map + first read of every page + drop)", "16"),
        ("W5 small, 256 iovecs (map + first read of every page + drop)", "256"),
    ];
    for (label, group, n) in rows {
        let k = |peer: &str| format!("{group}/{peer}/{n}");
        let naive = if group == "w4_bar_like" { "fails (EFAULT)".to_string() } else { cell(r, &k("naive")) };
        let naive_ratio = if group == "w4_bar_like" { "-".to_string() } else { ratio(r, &k("naive"), &k("iovmap")) };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {naive} | {} | {} | {naive_ratio} | {} | {} |",
            cell(r, &k("iovmap")),
            if r.contains_key(&k("iovmap_populate")) { cell(r, &k("iovmap_populate")) } else { "-".into() },
            cell(r, &k("fd_arena")),
            cell(r, &k("bounce_copy")),
            ratio(r, &k("fd_arena"), &k("iovmap")),
            ratio(r, &k("bounce_copy"), &k("iovmap")),
        );
    }
    for (label, n) in touched {
        let (i, nv) = (format!("w5_small/iovmap_touched/{n}"), format!("w5_small/naive_touched/{n}"));
        let _ = writeln!(
            out,
            "| {label} | {} | - | {} | - | - | {} | - | - |",
            cell(r, &i),
            cell(r, &nv),
            ratio(r, &nv, &i)
        );
    }
}

/// Runs and syscalls the targets need, measured with iovmap on the real workloads.
struct Shapes {
    w2_segments: usize,
    w2_runs: usize,
    w4: Option<(usize, usize)>, // (runs, syscalls of a steady-state view)
    /// W3 interleaved: medians (ms) of iovmap and of the naive loop, and the rounds.
    w3_interleaved: (f64, f64, usize),
    /// W1 interleaved with the floor (one pass + one clone + munmap): medians (ms).
    w1_floor: (f64, f64, usize),
    /// W5 interleaved, map + first read of every page + drop, for 1 and 4 scattered
    /// pages: medians (µs per view) of iovmap and of the naive loop, and the rounds.
    w5_touched: [(usize, f64, f64); 2],
    w5_rounds: usize,
}

fn shapes() -> Shapes {
    let ram = iovmap_testkit::GuestRam::new(2 << 30).expect("2 GiB of (sparse) memfd");
    let w2 = iovmap_benches::fragmented(&ram, 262_144);
    let w2_runs = iovmap::Remapper::new().plan(&w2.iovs).expect("plan W2").runs.len();
    let w4 = iovmap_benches::bar_like().ok().map(|w| {
        drop(w.remapper.map(&w.list.iovs).expect("W4 view"));
        let v = w.remapper.map(&w.list.iovs).expect("W4 view");
        (v.stats().runs, v.stats().syscalls)
    });
    let ram = iovmap_benches::guest_ram();
    let w3 = iovmap_benches::scattered(&ram, 60_000);
    let remapper = iovmap::Remapper::new();
    let rounds = 21;
    let (a, b) = iovmap_benches::interleaved(
        rounds,
        || remapper.map(&w3.iovs).expect("W3 view"),
        || iovmap_peers::naive_map(&w3.iovs).expect("W3 naive view"),
    );
    let w1 = iovmap_benches::contiguous(&ram, 262_144);
    let (f1, f2) = iovmap_benches::interleaved(
        31,
        || remapper.map(&w1.iovs).expect("W1 view"),
        || iovmap_peers::floor_map(&w1.iovs).expect("W1 floor"),
    );
    // Small views: 400 cycles per round and peer, so that a round is milliseconds.
    let (w5_rounds, inner) = (21, 400);
    let w5_touched = [1usize, 4].map(|n| {
        let w = iovmap_benches::scattered(&ram, n);
        // SAFETY: a live view or mapping of `len` bytes.
        let read = |p: *const u8, len: usize| unsafe { iovmap_testkit::touch_pages(p, len) };
        let (i, nv) = iovmap_benches::interleaved(
            w5_rounds,
            || {
                for _ in 0..inner {
                    let v = remapper.map(std::hint::black_box(&w.iovs)).expect("W5 view");
                    std::hint::black_box(read(v.as_ptr(), v.len()));
                }
            },
            || {
                for _ in 0..inner {
                    let m = iovmap_peers::naive_map(std::hint::black_box(&w.iovs)).expect("W5 naive");
                    std::hint::black_box(read(m.ptr(), m.len()));
                }
            },
        );
        (n, i * 1e3 / inner as f64, nv * 1e3 / inner as f64)
    });
    Shapes {
        w2_segments: w2.iovs.len(),
        w2_runs,
        w4,
        w3_interleaved: (a, b, rounds),
        w1_floor: (f1, f2, 31),
        w5_touched,
        w5_rounds,
    }
}

fn targets_table(r: &Results, s: &Shapes, out: &mut String) {
    out.push_str("| target | measured | verdict |\n|---|---|---|\n");
    let q = |k: &str| get(r, k).unwrap_or(f64::NAN);
    let w1 = q("w1_contiguous/naive/262144") / q("w1_contiguous/iovmap/262144");
    let _ = writeln!(out, "| W1: iovmap >= 1,000x faster than the naive loop | {w1:.0}x | {} |", verdict(w1 >= 1000.0));
    let (fi, ff, fr) = s.w1_floor;
    let _ = writeln!(
        out,
        "| W1: iovmap <= 1.2x the floor (one pass over the list + one clone + munmap: `iovmap_peers::floor_map`), interleaved, {fr} rounds | {:.2}x ({} vs {}) | {} |",
        fi / ff,
        human(fi * 1e6),
        human(ff * 1e6),
        verdict(fi / ff <= 1.2)
    );
    let w2 = q("w2_fragmented/naive/262144") / q("w2_fragmented/iovmap/262144");
    let w2_want = s.w2_segments as f64 / s.w2_runs as f64 * 0.8;
    let _ = writeln!(
        out,
        "| W2: iovmap faster than the naive loop by >= segments / runs x 0.8 = {} / {} x 0.8 = {w2_want:.1}x | {w2:.1}x | {} |",
        s.w2_segments,
        s.w2_runs,
        verdict(w2 >= w2_want)
    );
    let w3 = q("w3_scattered/iovmap/60000") / q("w3_scattered/naive/60000");
    let (ia, ib, rounds) = s.w3_interleaved;
    let _ = writeln!(
        out,
        "| W3: iovmap <= 1.05x the naive loop | criterion, one peer after the other: {w3:.3}x; interleaved, {rounds} rounds: {:.3}x ({ia:.1} vs {ib:.1} ms) | {} |",
        ia / ib,
        verdict(ia / ib <= 1.05)
    );
    let floor = q("placement_floor/clones_60000");
    let w3f = q("w3_scattered/iovmap/60000") / floor;
    let _ = writeln!(
        out,
        "| W3: iovmap within 1.15x of 60,000 x one single-page clone (60,000 clones in a row: {}; the naive loop: {:.3}x of it) | {w3f:.3}x | {} |",
        human(floor),
        q("w3_scattered/naive/60000") / floor,
        verdict(w3f <= 1.15)
    );
    match s.w4 {
        Some((runs, syscalls)) => {
            let _ = writeln!(
                out,
                "| W4: one syscall per run after the first refusal | {syscalls} syscalls for {runs} runs | {} |",
                verdict(syscalls == runs)
            );
        }
        None => {
            out.push_str("| W4: one syscall per run after the first refusal | no BPF array on this machine | n/a |\n")
        }
    }
    for shape in ["contiguous", "fragmented", "scattered"] {
        for (how, key) in [
            ("fresh memory", format!("planning/{shape}/1000000")),
            ("reused run list", format!("planning/{shape}_reused/1000000")),
        ] {
            let ns = q(&key) / 1e6;
            let _ = writeln!(
                out,
                "| Planning, {shape}, 1,000,000 segments, {how}: <= 20 ns per segment | {ns:.2} ns | {} |",
                verdict(ns <= 20.0)
            );
        }
    }
    for ((n, i, nv), goal) in s.w5_touched.into_iter().zip([0.85, 1.0]) {
        let what = if n == 1 { "one iovec".to_string() } else { format!("{n} scattered one-page iovecs") };
        let _ = writeln!(
            out,
            "| W5: map + first read + drop of {what} <= {goal:.2}x the naive loop, interleaved, {} rounds | {:.2}x ({i:.2} vs {nv:.2} µs) | {} |",
            s.w5_rounds,
            i / nv,
            verdict(i / nv <= goal)
        );
    }
    for (n, what) in [("1", "one iovec"), ("4", "four scattered one-page iovecs")] {
        let x = q(&format!("w5_small/iovmap/{n}")) / q(&format!("w5_small/naive/{n}"));
        let t = q(&format!("w5_small/iovmap_touched/{n}")) / q(&format!("w5_small/naive_touched/{n}"));
        let _ = writeln!(
            out,
            "| W5 (criterion, for reference): {what}, map + drop {x:.2}x, map + first read + drop {t:.2}x the naive loop | - | - |"
        );
    }
    let w5 = q("w5_small/iovmap/1") / q("w5_small/floor_reserve_clone_unmap/1");
    let _ = writeln!(
        out,
        "| W5: a 1-iovec map within 1.5x of one bare mremap + reservation + munmap ({}) | {w5:.2}x | {} |",
        cell(r, "w5_small/floor_reserve_clone_unmap/1"),
        verdict(w5 <= 1.5)
    );
}

fn other_tables(r: &Results, out: &mut String) {
    out.push_str(
        "\nTeardown (drop of the view):\n\n| workload | iovmap | naive loop | naive / iovmap |\n|---|---|---|---|\n",
    );
    for w in ["w1", "w2", "w3"] {
        let (i, n) = (format!("teardown/iovmap/{w}"), format!("teardown/naive/{w}"));
        let _ = writeln!(out, "| {} | {} | {} | {} |", w.to_uppercase(), cell(r, &i), cell(r, &n), ratio(r, &n, &i));
    }
    out.push_str("\nPlacement floor (into a reservation):\n\n| operation | median |\n|---|---|\n");
    for (op, what) in [
        ("clone_one_page", "one single-page clone (10,000 in a row)"),
        ("fd_map_one_page", "one single-page fd map (10,000 in a row)"),
        ("clones_60000", "60,000 single-page clones in a row (W3's floor)"),
    ] {
        let _ = writeln!(out, "| {what} | {} |", cell(r, &format!("placement_floor/{op}")));
    }
    out.push_str("\nPure planning, 1,000,000 segments:\n\n| list | fresh memory | reused run list |\n|---|---|---|\n");
    for shape in ["contiguous", "fragmented", "scattered"] {
        let _ = writeln!(
            out,
            "| {shape} | {} | {} |",
            cell(r, &format!("planning/{shape}/1000000")),
            cell(r, &format!("planning/{shape}_reused/1000000"))
        );
    }
}

/// One line of the plot: peer, colour, (list size, median ns) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A log-log plot of time vs list size per peer, for the two size sweeps.
fn svg(r: &Results) -> String {
    let sweeps = [
        ("w2_fragmented", "fragmented lists (runs of 1-64 pages)"),
        ("w3_scattered", "scattered lists (no two pages adjacent)"),
    ];
    let colors = [
        ("iovmap", "#d62728"),
        ("iovmap_populate", "#ff9896"),
        ("naive", "#1f77b4"),
        ("fd_arena", "#2ca02c"),
        ("bounce_copy", "#7f7f7f"),
    ];
    let (pw, ph, ml, mt, mb) = (420.0, 300.0, 70.0, 40.0, 50.0);
    let width = 2.0 * (pw + ml) + 40.0;
    let height = ph + mt + mb + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    for (panel, (group, title)) in sweeps.iter().enumerate() {
        let x0 = ml + panel as f64 * (pw + ml + 20.0);
        let series: Vec<Series> = colors
            .iter()
            .map(|(peer, color)| {
                let mut pts: Vec<(f64, f64)> = r
                    .iter()
                    .filter_map(|(k, v)| {
                        let rest = k.strip_prefix(&format!("{group}/{peer}/"))?;
                        Some((rest.parse::<f64>().ok()?, *v))
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (*peer, *color, pts)
            })
            .collect();
        let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
        if all.is_empty() {
            continue;
        }
        let lx = |v: f64| v.log10();
        let (xmin, xmax) = (
            all.iter().map(|p| lx(p.0)).fold(f64::MAX, f64::min),
            all.iter().map(|p| lx(p.0)).fold(f64::MIN, f64::max),
        );
        let (ymin, ymax) = (
            all.iter().map(|p| lx(p.1)).fold(f64::MAX, f64::min).floor(),
            all.iter().map(|p| lx(p.1)).fold(f64::MIN, f64::max).ceil(),
        );
        let px = |v: f64| x0 + (lx(v) - xmin) / (xmax - xmin).max(1e-9) * pw;
        let py = |v: f64| mt + ph - (lx(v) - ymin) / (ymax - ymin).max(1e-9) * ph;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{title}</text>",
            x0 + pw / 2.0,
            mt - 15.0
        );
        let _ =
            writeln!(s, "<rect x=\"{x0}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>");
        let mut decade = ymin;
        while decade <= ymax {
            let y = mt + ph - (decade - ymin) / (ymax - ymin).max(1e-9) * ph;
            let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>", x0 + pw);
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                x0 - 5.0,
                y + 4.0,
                human(10f64.powf(decade))
            );
            decade += 1.0;
        }
        let mut xs: Vec<f64> = all.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>", px(x), mt + ph + 18.0);
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">iovecs in the list</text>",
            x0 + pw / 2.0,
            mt + ph + 38.0
        );
        // iovmap last, on top of the lines it meets.
        for (peer, color, pts) in series.iter().rev() {
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
            let _ = writeln!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"><title>{peer}</title></polyline>",
                path.join(" ")
            );
            for &(x, y) in pts {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{peer}, {x} iovecs: {}</title></circle>",
                    px(x),
                    py(y),
                    human(y)
                );
            }
        }
    }
    // Legend.
    for (i, (peer, color)) in colors.iter().enumerate() {
        let x = ml + i as f64 * 150.0;
        let y = height - 15.0;
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"3\"/>",
            y - 4.0,
            x + 20.0,
            y - 4.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{y}\">{}</text>", x + 25.0, peer.replace('_', " "));
    }
    s.push_str("</svg>\n");
    s
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ is in the workspace").to_path_buf()
}

fn main() {
    let root = root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let mut r = Results::new();
    collect(&target.join("criterion"), "", &mut r);
    if r.is_empty() {
        eprintln!(
            "report: no criterion results under {}: run `cargo bench -p iovmap-benches` first",
            target.join("criterion").display()
        );
        std::process::exit(1);
    }
    let shapes = shapes();
    let mut out = String::new();
    out.push_str("Medians of `cargo bench -p iovmap-benches` (criterion), each row measured in the same run.\n\n");
    workload_table(&r, &mut out);
    out.push_str("\nTargets:\n\n");
    targets_table(&r, &shapes, &mut out);
    other_tables(&r, &mut out);

    let doc = root.join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_default();
    let (begin, end) = ("<!-- results:begin -->", "<!-- results:end -->");
    let updated = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => format!("{}{begin}\n{out}{}", &text[..b], &text[e..]),
        _ => format!("{text}\n{begin}\n{out}{end}\n"),
    };
    std::fs::write(&doc, updated).expect("write docs/benchmarks.md");
    std::fs::write(root.join("docs/benchmarks.svg"), svg(&r)).expect("write docs/benchmarks.svg");
    println!("{out}");
    println!("report: updated {} and docs/benchmarks.svg", doc.display());
}
