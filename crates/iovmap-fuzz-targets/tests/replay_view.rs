//! Replays every file of `fuzz/corpus/view/` and `fuzz/regressions/view/` through the
//! `view` target, on the stable toolchain.
//!
//! The target counts the process's VMAs and fds around each map call, so this binary
//! runs without the libtest harness (`harness = false`), on the main thread alone: a
//! harness thread per test would map its stack beside the count. The target's first use
//! warms the process up (the PROCMAP_QUERY fd, malloc's arena) and pins glibc to one
//! malloc arena, as `crates/iovmap/tests/leaks.rs` does.
//!
//! `cargo test -p iovmap-fuzz-targets --test replay_view -- <dir>...` replays other
//! directories instead (a campaign's corpus, say).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        // No regression yet: git keeps no empty directory.
        Err(_) if dir.ends_with("regressions/view") => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    v.sort();
    v
}

fn main() {
    let root = iovmap_fuzz_targets::fuzz_dir();
    let args: Vec<PathBuf> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).map(PathBuf::from).collect();
    let dirs = if args.is_empty() { vec![root.join("corpus/view"), root.join("regressions/view")] } else { args };
    let world = iovmap_fuzz_targets::view_target::world();
    for m in &world.missing {
        println!("note: the arena has no {m}; inputs that pick it pick another fixture");
    }
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    let mut n = 0;
    for dir in &dirs {
        for f in files(dir) {
            let data = std::fs::read(&f).unwrap();
            let outcome = std::panic::catch_unwind(|| iovmap_fuzz_targets::view_target::check(&data))
                .unwrap_or_else(|_| panic!("view target failed on {}", f.display()));
            *tally.entry(outcome).or_default() += 1;
            n += 1;
        }
    }
    println!("replay_view: {n} inputs from {dirs:?}: {tally:?}");
    assert!(n > 0, "no inputs to replay");
    for kind in
        ["view: clones", "view: fd maps", "view: clones and fd maps", "refused", "no fallback", "injected failure"]
    {
        assert!(tally.contains_key(kind), "no input ended in {kind:?}");
    }
}
