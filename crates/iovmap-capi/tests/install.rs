//! `install.sh` into a scratch prefix, the `iovmap.pc` it writes, and the Makefile and
//! meson file of docs/c-api.md building `examples/c/remap.c` against that install.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{NATIVE_STATIC_LIBS, crate_dir, have, lib_dir, run, scratch, shared_lib, soname, static_lib};
use iovmap_testkit::skip;

/// Where `install.sh --prefix <scratch>/usr` put things.
struct Install {
    prefix: PathBuf,
}

impl Install {
    fn new(name: &str) -> Self {
        let prefix = scratch(name).join("usr");
        run(Command::new(crate_dir().join("install.sh")).arg("--prefix").arg(&prefix).arg("--from").arg(lib_dir()));
        Install { prefix }
    }

    fn libdir(&self) -> PathBuf {
        self.prefix.join("lib")
    }

    fn pc_dir(&self) -> PathBuf {
        self.libdir().join("pkgconfig")
    }

    /// `pkg-config` looking only at this install.
    fn pkg_config(&self) -> Command {
        let mut c = Command::new("pkg-config");
        c.env("PKG_CONFIG_PATH", self.pc_dir()).env_remove("PKG_CONFIG_LIBDIR");
        c
    }

    fn pkg_config_says(&self, args: &[&str]) -> String {
        String::from_utf8(run(self.pkg_config().args(args)).stdout).unwrap().trim().to_string()
    }
}

/// The shared library's file name once installed: its SONAME, which carries the ABI
/// version of `abi-version` (not the crate's version: the C ABI only grows).
fn installed_so_name() -> String {
    let so = soname(&shared_lib());
    let abi = std::fs::read_to_string(crate_dir().join("abi-version")).unwrap();
    assert_eq!(so, format!("libiovmap.so.{}", abi.trim()));
    so
}

/// The names in a directory, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn install_sh_installs_the_header_the_libraries_and_the_pc_file() {
    let i = Install::new("install-files");
    let header = std::fs::read(i.prefix.join("include/iovmap.h")).unwrap();
    assert_eq!(header, std::fs::read(crate_dir().join("include/iovmap.h")).unwrap());
    let lib = i.libdir();
    // Cargo's libiovmap_capi.* are installed under their C names, and only those.
    let so = installed_so_name();
    assert_eq!(names_in(&lib), ["libiovmap.a", "libiovmap.so", so.as_str(), "pkgconfig"]);
    assert_eq!(std::fs::read(lib.join("libiovmap.a")).unwrap(), std::fs::read(static_lib()).unwrap());
    assert!(lib.join(&so).is_file(), "{so} installed under its SONAME");
    assert_eq!(std::fs::read(lib.join(&so)).unwrap(), std::fs::read(shared_lib()).unwrap());
    assert_eq!(soname(&lib.join(&so)), so);
    assert_eq!(std::fs::read_link(lib.join("libiovmap.so")).unwrap(), Path::new(&so));
    assert_eq!(names_in(&i.pc_dir()), ["iovmap.pc"]);
}

#[test]
fn destdir_stages_the_files_but_the_pc_file_names_the_prefix() {
    let stage = scratch("install-destdir");
    run(Command::new(crate_dir().join("install.sh"))
        .args(["--prefix", "/opt/iovmap", "--destdir"])
        .arg(&stage)
        .arg("--from")
        .arg(lib_dir()));
    assert!(stage.join("opt/iovmap/include/iovmap.h").is_file());
    assert!(stage.join("opt/iovmap/lib/libiovmap.a").is_file());
    let pc = parse_pc(&std::fs::read_to_string(stage.join("opt/iovmap/lib/pkgconfig/iovmap.pc")).unwrap());
    assert_eq!(pc.vars["prefix"], "/opt/iovmap");
    assert_eq!(pc.vars["libdir"], "${prefix}/lib");
}

#[test]
fn install_sh_refuses_what_it_cannot_do() {
    let empty = scratch("install-refusals");
    let out = Command::new(crate_dir().join("install.sh"))
        .arg("--prefix")
        .arg(empty.join("usr"))
        .arg("--from")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo build --release -p iovmap-capi"));
    let out = Command::new(crate_dir().join("install.sh")).args(["--prefix", "relative"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an absolute path"));
    let out = Command::new(crate_dir().join("install.sh")).arg("--bogus").output().unwrap();
    assert!(!out.status.success());
}

/// A pkg-config file: its variables and its fields, in order of appearance.
struct Pc {
    vars: BTreeMap<String, String>,
    fields: BTreeMap<String, String>,
}

/// Parses a .pc file the way pkg-config does, checking as it goes that every line is a
/// comment, a variable or a field, that nothing is defined twice, and that every
/// `${var}` was defined above its use.
fn parse_pc(text: &str) -> Pc {
    let mut pc = Pc { vars: BTreeMap::new(), fields: BTreeMap::new() };
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        assert!(!line.contains('@'), "line {n} has an unfilled template field: {line}");
        let var = line.find('=');
        let field = line.find(':');
        let (name, value, is_var) = match (var, field) {
            (Some(v), Some(f)) if v < f => (&line[..v], &line[v + 1..], true),
            (Some(v), None) => (&line[..v], &line[v + 1..], true),
            (_, Some(f)) => (&line[..f], &line[f + 1..], false),
            (None, None) => panic!("line {n} is neither a variable nor a field: {line}"),
        };
        let name = name.trim();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'), "line {n}: bad name {name}");
        let mut rest = value;
        while let Some(at) = rest.find("${") {
            let end = rest[at..].find('}').unwrap_or_else(|| panic!("line {n}: unterminated ${{"));
            let used = &rest[at + 2..at + end];
            assert!(pc.vars.contains_key(used), "line {n} uses ${{{used}}} before defining it");
            rest = &rest[at + end..];
        }
        let map = if is_var { &mut pc.vars } else { &mut pc.fields };
        assert!(map.insert(name.to_string(), value.trim().to_string()).is_none(), "line {n}: {name} twice");
    }
    pc
}

#[test]
fn the_pc_file_is_well_formed() {
    let i = Install::new("install-pc");
    let pc = parse_pc(&std::fs::read_to_string(i.pc_dir().join("iovmap.pc")).unwrap());
    for f in ["Name", "Description", "Version", "Libs", "Libs.private", "Cflags", "URL"] {
        assert!(pc.fields.contains_key(f), "no {f} field");
    }
    assert_eq!(pc.fields["Name"], "iovmap");
    assert_eq!(pc.fields["Version"], env!("CARGO_PKG_VERSION"), "install.sh read the workspace version");
    assert_eq!(pc.fields["Libs"], "-L${libdir} -liovmap");
    assert_eq!(pc.fields["Libs.private"], NATIVE_STATIC_LIBS.join(" "));
    assert_eq!(pc.fields["Cflags"], "-I${includedir}");
    assert_eq!(pc.vars["prefix"], i.prefix.to_str().unwrap());
    assert_eq!(pc.vars["libdir"], "${prefix}/lib");
    assert_eq!(pc.vars["includedir"], "${prefix}/include");
    assert_eq!(pc.vars["static_libs"], format!("${{libdir}}/libiovmap.a {}", NATIVE_STATIC_LIBS.join(" ")));

    if !have("pkg-config") {
        skip!("no pkg-config: the .pc file was checked by parsing only (install pkg-config)");
    }
    run(i.pkg_config().args(["--validate", "iovmap"]));
    let p = i.prefix.display();
    assert_eq!(i.pkg_config_says(&["--modversion", "iovmap"]), env!("CARGO_PKG_VERSION"));
    assert_eq!(i.pkg_config_says(&["--cflags", "iovmap"]), format!("-I{p}/include"));
    assert_eq!(i.pkg_config_says(&["--libs", "iovmap"]), format!("-L{p}/lib -liovmap"));
    assert_eq!(
        i.pkg_config_says(&["--static", "--libs", "iovmap"]),
        format!("-L{p}/lib -liovmap {}", NATIVE_STATIC_LIBS.join(" "))
    );
    assert_eq!(
        i.pkg_config_says(&["--variable=static_libs", "iovmap"]),
        format!("{p}/lib/libiovmap.a {}", NATIVE_STATIC_LIBS.join(" "))
    );
}

/// The first fenced block of `lang` in docs/c-api.md.
fn doc_block(lang: &str) -> String {
    let doc = std::fs::read_to_string(crate_dir().join("../../docs/c-api.md")).unwrap();
    let fence = format!("```{lang}\n");
    let start = doc.find(&fence).unwrap_or_else(|| panic!("docs/c-api.md has no {lang} block")) + fence.len();
    let len = doc[start..].find("```\n").expect("the block ends");
    doc[start..start + len].to_string()
}

/// A project directory with remap.c and `file` = the docs' `lang` block.
fn doc_project(name: &str, lang: &str, file: &str) -> PathBuf {
    let dir = scratch(&format!("{name}-project"));
    std::fs::copy(crate_dir().join("examples/c/remap.c"), dir.join("remap.c")).unwrap();
    std::fs::write(dir.join(file), doc_block(lang)).unwrap();
    dir
}

/// Runs the two programs a documented build made and checks how they were linked.
#[track_caller]
fn run_both(shared: &Path, static_: &Path) {
    let so = installed_so_name();
    let needed = common::dynamic_entries(shared, "NEEDED");
    assert!(needed.contains(&so), "{} needs {so}: {needed:?}", shared.display());
    let needed = common::dynamic_entries(static_, "NEEDED");
    assert!(!needed.iter().any(|n| n.contains("libiovmap")), "{} is static: {needed:?}", static_.display());
    for exe in [shared, static_] {
        let out = run(&mut Command::new(exe));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.ends_with("remap: ok\n"), "{}:\n{stdout}", exe.display());
    }
}

#[test]
fn the_documented_makefile_builds_the_example_against_the_install() {
    if !have("pkg-config") || !Command::new("make").arg("--version").output().is_ok_and(|o| o.status.success()) {
        skip!("needs make and pkg-config (install make pkg-config)");
    }
    let i = Install::new("install-make");
    let dir = doc_project("install-make", "make", "Makefile");
    run(Command::new("make").arg("-C").arg(&dir).env("PKG_CONFIG_PATH", i.pc_dir()).env_remove("PKG_CONFIG_LIBDIR"));
    run_both(&dir.join("remap"), &dir.join("remap-static"));
}

#[test]
fn the_documented_meson_file_builds_the_example_against_the_install() {
    if !have("pkg-config") || !have("meson") || !have("ninja") {
        skip!("needs meson, ninja and pkg-config (install meson ninja-build pkg-config)");
    }
    let i = Install::new("install-meson");
    let dir = doc_project("install-meson", "meson", "meson.build");
    let build = dir.join("build");
    run(Command::new("meson")
        .arg("setup")
        .arg(&build)
        .arg(&dir)
        .env("PKG_CONFIG_PATH", i.pc_dir())
        .env_remove("PKG_CONFIG_LIBDIR"));
    run(Command::new("ninja").arg("-C").arg(&build));
    run_both(&build.join("remap"), &build.join("remap-static"));
}
