//! `examples/c/remap.c` compiled with the system C compiler against the library cargo
//! just built (`libiovmap_capi.a`, then `libiovmap_capi.so` as `-liovmap`), run, and its
//! output checked.

mod common;

use std::path::Path;
use std::process::Command;

use common::{NATIVE_STATIC_LIBS, c_named_libs, cc, crate_dir, include_dir, run, scratch, static_lib};

/// Warnings are errors: the example is what C users copy.
const CFLAGS: &[&str] = &["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pedantic"];

fn example() -> std::path::PathBuf {
    crate_dir().join("examples/c/remap.c")
}

/// Runs the built example and checks what it says it did.
fn run_example(exe: &Path) {
    let out = run(&mut Command::new(exe));
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!("{}", stdout.trim_end());
    let lines: Vec<&str> = stdout.lines().collect();
    // Six pages and 100 bytes (24,676 bytes with 4 KiB pages).
    let bytes = 6 * iovmap_testkit::page() + 100;
    let first = format!("guest RAM: 7 iovecs -> 4 runs (4 cloned, 0 fd-mapped, 4 syscalls), {bytes} bytes match");
    assert!(lines[0].starts_with(&first), "{stdout}");
    match iovmap_testkit::PerfRing::new(2) {
        Ok(_) => {
            let want = [
                "pfnmap unregistered: refused at iovec 1 as expected: IOVMAP_E_NO_FALLBACK",
                "pfnmap: 4 iovecs -> 3 runs (2 cloned, 1 fd-mapped, 4 syscalls), bytes match",
                "pfnmap again: 2 iovecs -> 1 runs (0 cloned, 1 fd-mapped, 1 syscalls)",
            ];
            for (i, w) in want.into_iter().enumerate() {
                assert!(lines[1 + i].starts_with(w), "line {} should start with {w:?}:\n{stdout}", 2 + i);
            }
        }
        Err(e) => {
            eprintln!("SKIP the PFNMAP half: {e}");
            assert!(lines[1].starts_with("pfnmap: skipped"), "{stdout}");
        }
    }
    let kernel_built: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("kernel-built: ")).collect();
    match iovmap_testkit::udmabuf() {
        Ok(()) => assert_eq!(
            kernel_built,
            [
                "kernel-built: 8 iovecs -> 1 dma-buf of ".to_string()
                    + &(8 * iovmap_testkit::page()).to_string()
                    + " bytes, bytes match",
                "kernel-built: the dma-buf, handed over and mapped by its owner, shows the same pages".to_string(),
            ]
        ),
        Err(e) => {
            eprintln!("SKIP the kernel-built half: {e}");
            assert_eq!(kernel_built.len(), 2, "{stdout}");
            assert!(kernel_built[0].contains("/dev/udmabuf does not exist"), "{stdout}");
            assert!(
                kernel_built[1].starts_with("kernel-built: automatic placement remapped instead (declined 1,"),
                "{stdout}"
            );
        }
    }
    assert_eq!(lines.last(), Some(&"remap: ok"));
}

/// The shared objects `exe` needs (DT_NEEDED).
fn needed(exe: &Path) -> Vec<String> {
    common::dynamic_entries(exe, "NEEDED")
}

#[test]
fn c_example_runs_linked_with_the_static_library() {
    let dir = scratch("c-example-static");
    let exe = dir.join("remap");
    run(cc()
        .args(CFLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg(example())
        .arg(static_lib())
        .args(NATIVE_STATIC_LIBS)
        .arg("-o")
        .arg(&exe));
    assert!(!needed(&exe).iter().any(|n| n.starts_with("libiovmap")), "linked statically: {:?}", needed(&exe));
    run_example(&exe);
}

#[test]
fn c_example_runs_linked_with_the_shared_library() {
    let dir = scratch("c-example-shared");
    let exe = dir.join("remap");
    // The in-tree library is libiovmap_capi.so; C users link it as -liovmap, and programs
    // record its SONAME (build.rs), which only an install creates as a file: stand up
    // both names, as links to it, in a directory beside the program.
    let libs = dir.join("lib");
    std::fs::create_dir(&libs).unwrap();
    let soname = c_named_libs(&libs);
    run(cc()
        .args(CFLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg(example())
        .arg("-L")
        .arg(&libs)
        .arg("-liovmap")
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .arg("-o")
        .arg(&exe));
    assert!(needed(&exe).contains(&soname), "linked with the .so: {:?}", needed(&exe));
    assert!(!needed(&exe).iter().any(|n| n.contains("capi")), "the in-tree name leaked: {:?}", needed(&exe));
    run_example(&exe);
}
