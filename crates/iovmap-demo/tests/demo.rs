//! The demo runs and verifies its views, in both modes and with JSON output (on smaller
//! guests than the default, to keep `cargo test` quick; `.ci/run` runs the default,
//! argument-free demo in release).

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_iovmap-demo")).args(args).output().expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "demo {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn memfd_mode_maps_verifies_and_compares() {
    let out = demo(&["--ram-mib", "64", "--blob-mib", "16", "--seed", "3"]);
    assert!(out.contains("segments 4096"), "{out}");
    assert!(out.contains("verified:   16777216 bytes"), "{out}");
    assert!(out.contains("naive loop:"), "{out}");
    // The kernel-built line: the view through udmabuf, or one line saying why not.
    match iovmap_testkit::udmabuf() {
        Ok(()) => assert!(out.contains("kernel-built (udmabuf): runs ") && out.contains("bytes verified"), "{out}"),
        Err(_) => assert!(out.contains("kernel-built (udmabuf): not here: /dev/udmabuf does not exist"), "{out}"),
    }
}

#[test]
fn vm_memory_mode_reports_json() {
    let out = demo(&["--mode", "vm-memory", "--ram-mib", "64", "--blob-mib", "8", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    assert_eq!(v["mode"], "vm-memory");
    assert_eq!(v["iovmap"]["verified_bytes"], v["guest"]["blob_bytes"], "{out}");
    let stats = &v["iovmap"]["stats"];
    assert_eq!(stats["segments"], v["guest"]["entries"], "{out}");
    if v["guest"]["hugetlb"] == true {
        assert_eq!(stats["fd_mapped"], 3, "the three huge pages come from their file: {out}");
        assert!(v["naive"]["error"].is_string(), "the naive loop cannot clone hugetlb: {out}");
    }
    assert!(v.get("error").is_none(), "{out}");
}
