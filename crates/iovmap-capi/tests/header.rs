//! The committed `include/iovmap.h` is what cbindgen makes of the crate now, it compiles
//! as C and as C++, and it declares exactly what the library exports.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{crate_dir, include_dir, run, shared_lib};

const REGENERATE: &str = "IOVMAP_BLESS=1 cargo test -p iovmap-capi --test header";

fn generate() -> String {
    let config = cbindgen::Config::from_file(crate_dir().join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir().join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not generate the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn committed_header_is_up_to_date() {
    let path = include_dir().join("iovmap.h");
    let fresh = generate();
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if fresh == committed {
        return;
    }
    if std::env::var_os("IOVMAP_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write the header");
        eprintln!("IOVMAP_BLESS=1: rewrote {}; commit it", path.display());
        return;
    }
    let (line, old, new) = fresh
        .lines()
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(committed.lines().map(Some).chain(std::iter::repeat(None)))
        .take(fresh.lines().count().max(committed.lines().count()))
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, b.unwrap_or("(end of file)"), a.unwrap_or("(end of file)")))
        .expect("the files differ somewhere");
    panic!(
        "{} is stale: the C API changed but the committed header did not.\n\
         first difference at line {line}:\n  committed: {old}\n  generated: {new}\n\
         Regenerate it with `{REGENERATE}` and commit it.",
        path.display()
    );
}

/// A translation unit that uses every declaration of the header.
const USE_ALL: &str = r#"
#include <iovmap.h>
#include <stdio.h>
int main(void) {
    iovmap_remapper *r = iovmap_remapper_new();
    struct iovmap_view *v = NULL;
    struct iovec iov = { 0, 0 };
    iovmap_stats s;
    int rc = iovmap_register(r, NULL, 0, -1, 0);
    rc |= iovmap_unregister(r, NULL);
    rc |= iovmap_map(r, &iov, 1, IOVMAP_MAP_READ_ONLY | IOVMAP_MAP_POPULATE, &v);
    rc |= iovmap_view_stats(v, &s);
    printf("%p %zu %s %s %lld %d\n", iovmap_view_ptr(v), iovmap_view_len(v), iovmap_last_error_message(),
           iovmap_strerror(IOVMAP_E_PANIC), (long long)iovmap_last_error_index(), rc);
    iovmap_view_free(v);
    iovmap_remapper_free(r);
    return rc == IOVMAP_OK;
}
"#;

#[test]
fn header_compiles_as_strict_c_and_cpp() {
    let dir = common::scratch("header");
    let src = dir.join("use_all.c");
    std::fs::write(&src, USE_ALL).unwrap();
    for std in ["-std=c99", "-std=c11"] {
        run(common::cc()
            .args([std, "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
            .arg(include_dir())
            .arg(&src));
    }
    if !common::have("c++") {
        eprintln!("SKIP the C++ half: no c++ compiler (install g++)");
        return;
    }
    run(Command::new("c++")
        .args(["-std=c++11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c++", "-I"])
        .arg(include_dir())
        .arg(&src));
}

/// The C API, as documented in docs/c-api.md.
const API: &[&str] = &[
    "iovmap_remapper_new",
    "iovmap_remapper_free",
    "iovmap_register",
    "iovmap_unregister",
    "iovmap_map",
    "iovmap_view_ptr",
    "iovmap_view_len",
    "iovmap_view_stats",
    "iovmap_view_free",
    // 0.2: kernel-built views and dma-bufs out.
    "iovmap_view_dmabuf_count",
    "iovmap_view_dmabuf",
    "iovmap_view_kernel_built",
    "iovmap_dmabufs_new",
    "iovmap_dmabufs_count",
    "iovmap_dmabufs_lead",
    "iovmap_dmabufs_len",
    "iovmap_dmabufs_get",
    "iovmap_dmabufs_take",
    "iovmap_dmabufs_free",
    // 0.3: guest RAM a userfaultfd monitor owns.
    "iovmap_uffd_register",
    "iovmap_uffd_unregister",
    "iovmap_uffd_declare_armed",
    "iovmap_uffd_declare_disarmed",
    "iovmap_uffd_resolve",
    // 0.3: vfio region mmaps, and who made a dma-buf.
    "iovmap_register_vfio",
    "iovmap_dmabuf_exporter",
    "iovmap_last_error_message",
    "iovmap_last_error_index",
    "iovmap_strerror",
];

/// `iovmap_*` functions the header declares: names followed by `(` outside comments.
fn declared() -> BTreeSet<String> {
    let header = std::fs::read_to_string(include_dir().join("iovmap.h")).unwrap();
    let mut code = String::new();
    let mut rest = header.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("unterminated comment") + start + 2;
        rest = &rest[end..];
    }
    code.push_str(rest);
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut names = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = code[at..].find("iovmap_") {
        let start = at + i;
        let len = code[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(0);
        let name = &code[start..start + len];
        if code[start + len..].starts_with('(') {
            names.insert(name.to_string());
        }
        at = start + len.max(1);
    }
    names
}

#[test]
fn header_declares_exactly_what_the_library_exports() {
    let out = run(Command::new("nm").args(["-D", "--defined-only"]).arg(shared_lib()));
    let exported: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|s| s.starts_with("iovmap_"))
        .map(str::to_string)
        .collect();
    assert_eq!(exported, declared(), "the shared library's iovmap_* symbols and the header's functions differ");
    let api: BTreeSet<String> = API.iter().map(|s| s.to_string()).collect();
    assert_eq!(exported, api, "the C API is these functions; update API (and docs/c-api.md) when it changes");
}
