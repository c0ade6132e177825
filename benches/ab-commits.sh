#!/usr/bin/env bash
# Compares iovmap at two commits on the map fast path, interleaved in one process (both
# versions linked side by side), so the drift of a shared machine cancels out:
#
#   bash benches/ab-commits.sh OLD [NEW] [ROUNDS]
#
# OLD and NEW are commits (NEW defaults to the working tree). Each version of
# crates/iovmap is extracted to target/ab/, given its own package version, and linked
# into a small tool built there; it prints a markdown table of medians (W1, W3, W5 as in
# docs/benchmarks.md) with the NEW/OLD ratio. Nothing outside target/ab is written.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
old=${1:?usage: ab-commits.sh OLD [NEW] [ROUNDS]}
new=${2:-}
rounds=${3:-15}
ab=${CARGO_TARGET_DIR:-$root/target}/ab
rm -rf "$ab"
mkdir -p "$ab/old" "$ab/new" "$ab/tool/src"

extract() { # commit-or-empty dest version
  if [ -n "$1" ]; then
    git -C "$root" archive "$1" crates/iovmap | tar -x -C "$2" --strip-components=2
  else
    cp -r "$root/crates/iovmap/." "$2/"
  fi
  rm -rf "$2/tests" "$2/benches" "$2/examples"
  # A manifest of its own: the workspace inheritance of the original does not apply here.
  cat > "$2/Cargo.toml" <<TOML
[package]
name = "iovmap"
version = "$3"
edition = "2024"

[features]
default = []
vm-memory = ["dep:vm-memory"]
vfio = ["dep:vfio-ioctls"]
unstable-internals = []
fault-injection = []

[dependencies]
libc = "0.2"
log = "0.4"
thiserror = "2"
vm-memory = { version = "0.18", optional = true }
vfio-ioctls = { version = "0.10", default-features = false, optional = true }
TOML
}
extract "$old" "$ab/old" 0.0.1
extract "$new" "$ab/new" 0.0.2

cat > "$ab/tool/Cargo.toml" <<TOML
[package]
name = "iovmap-ab"
version = "0.0.0"
edition = "2024"

[workspace]

[dependencies]
old = { package = "iovmap", path = "../old", version = "0.0.1" }
new = { package = "iovmap", path = "../new", version = "0.0.2" }
iovmap-testkit = { path = "$root/crates/iovmap-testkit" }
libc = "0.2"

[profile.release]
debug = "line-tables-only"
TOML
cat > "$ab/tool/src/main.rs" <<'RUST'
use std::time::Instant;
use iovmap_testkit::{workloads, GuestRam};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn human(ms: f64) -> String {
    if ms >= 1.0 { format!("{ms:.2} ms") } else { format!("{:.2} µs", ms * 1e3) }
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(15);
    let page = iovmap_testkit::page();
    let ram = GuestRam::new(1 << 30).unwrap();
    ram.fill(1);
    let w1 = workloads::page_iovecs(ram.ptr(), &[workloads::Chunk { page: 0, pages: 262_144 }], page);
    let w3 = workloads::page_iovecs(ram.ptr(), &workloads::scattered(60_000, 3), page);
    let w5 = workloads::page_iovecs(ram.ptr(), &workloads::scattered(1, 3), page);
    let (ro, rn) = (old::Remapper::new(), new::Remapper::new());
    println!("| workload | before (median) | after (median) | after / before |");
    println!("|---|---|---|---|");
    for (name, list, inner) in [("W1 contiguous, 262,144 iovecs", &w1, 1usize), ("W3 scattered, 60,000 iovecs", &w3, 1), ("W5, 1 iovec", &w5, 1000)] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            for _ in 0..inner { drop(ro.map(list).unwrap()); }
            a.push(t.elapsed().as_secs_f64() * 1e3 / inner as f64);
            let t = Instant::now();
            for _ in 0..inner { drop(rn.map(list).unwrap()); }
            b.push(t.elapsed().as_secs_f64() * 1e3 / inner as f64);
        }
        let (ma, mb) = (median(a), median(b));
        println!("| {name} | {} | {} | {:.3}x |", human(ma), human(mb), mb / ma);
    }
}
RUST
cargo build --release --quiet --manifest-path "$ab/tool/Cargo.toml" --target-dir "$ab/target"
echo "iovmap ${old} (before) against ${new:-the working tree} (after), ${rounds} interleaved rounds (map and drop timed):"
"$ab/target/release/iovmap-ab" "$rounds"
