//! The demo runs and verifies its view (on a smaller guest than the default, to keep
//! `cargo test` quick; `.ci/run` runs the default, argument-free demo in release).

use std::process::Command;

#[test]
fn demo_maps_verifies_and_compares() {
    let out = Command::new(env!("CARGO_BIN_EXE_iovmap-demo"))
        .args(["--ram-mib", "64", "--blob-mib", "16", "--seed", "3"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("segments 4096"), "{stdout}");
    assert!(stdout.contains("verified:   16777216 bytes"), "{stdout}");
    assert!(stdout.contains("naive loop:"), "{stdout}");
}
