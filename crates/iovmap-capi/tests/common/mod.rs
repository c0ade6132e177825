//! What the tests that build C need: where the library and the header are, and the
//! system C compiler.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate's directory.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory of the header.
pub fn include_dir() -> PathBuf {
    crate_dir().join("include")
}

/// The static library as cargo names it in the build tree; installed as `libiovmap.a`.
pub const STATIC_LIB: &str = "libiovmap_capi.a";

/// The shared library as cargo names it in the build tree; installed as
/// `libiovmap.so.<abi>` (its SONAME) with the `libiovmap.so` link.
pub const SHARED_LIB: &str = "libiovmap_capi.so";

/// Where `cargo test` left `libiovmap_capi.a` and `libiovmap_capi.so`: beside this test
/// binary (`target/<profile>/deps`). Cargo builds the library with all its crate types
/// there before the tests that depend on it, but does not copy them up to
/// `target/<profile>` as `cargo build` does, so the files there may be stale.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the test binary has a directory").to_path_buf();
    for lib in [STATIC_LIB, SHARED_LIB] {
        assert!(dir.join(lib).is_file(), "{lib} was not built beside the test binary in {}", dir.display());
    }
    dir
}

/// The static library cargo built (`libiovmap_capi.a`).
pub fn static_lib() -> PathBuf {
    lib_dir().join(STATIC_LIB)
}

/// The shared library cargo built (`libiovmap_capi.so`).
pub fn shared_lib() -> PathBuf {
    lib_dir().join(SHARED_LIB)
}

/// Makes `dir` (a scratch directory) a library directory with the C names of the
/// libraries cargo built, as symlinks to them: `libiovmap.a`, `libiovmap.so` for
/// `-liovmap` at link time, and the SONAME, `libiovmap.so.<abi>`, that programs linked
/// with it look for at run time. Returns the SONAME.
pub fn c_named_libs(dir: &Path) -> String {
    let so = shared_lib();
    let soname = soname(&so);
    assert!(soname.starts_with("libiovmap.so."), "SONAME {soname}");
    std::os::unix::fs::symlink(static_lib(), dir.join("libiovmap.a")).expect("symlink libiovmap.a");
    for name in ["libiovmap.so", soname.as_str()] {
        std::os::unix::fs::symlink(&so, dir.join(name)).unwrap_or_else(|e| panic!("symlink {name}: {e}"));
    }
    soname
}

/// What a Rust staticlib needs from the system on Linux (`rustc --print
/// native-static-libs`), the same list as `Libs.private` in `iovmap.pc.in`.
pub const NATIVE_STATIC_LIBS: &[&str] = &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

/// A scratch directory of this test binary under `target/tmp`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("iovmap-capi").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The system C compiler (`$CC`, else `cc`).
pub fn cc() -> Command {
    Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
}

/// Runs `cmd`, panicking with its output unless it succeeds.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether `program` can be started (`program --version` runs).
pub fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The values of the dynamic section entries of type `tag` (`NEEDED`, `SONAME`) of an
/// ELF file, from `readelf -d`.
pub fn dynamic_entries(elf: &Path, tag: &str) -> Vec<String> {
    let out = run(Command::new("readelf").arg("-d").arg(elf));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("({tag})")))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

/// The SONAME of a shared library.
pub fn soname(lib: &Path) -> String {
    let names = dynamic_entries(lib, "SONAME");
    assert_eq!(names.len(), 1, "{} has no single SONAME: {names:?}", lib.display());
    names.into_iter().next().unwrap()
}
