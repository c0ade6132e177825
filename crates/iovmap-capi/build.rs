//! Gives libiovmap.so its SONAME, so that programs record `libiovmap.so.<abi>` rather
//! than the path they were linked with. The ABI version is the one in `abi-version`,
//! which install.sh reads too: it changes only when a function, code, flag or struct of
//! `include/iovmap.h` changes meaning, layout or goes away, never for additions, so that a
//! program linked against an older libiovmap keeps loading a newer one.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=abi-version");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let abi = std::fs::read_to_string("abi-version").expect("crates/iovmap-capi/abi-version");
    let abi = abi.trim();
    assert!(!abi.is_empty() && abi.chars().all(|c| c.is_ascii_digit() || c == '.'), "abi-version: {abi:?}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libiovmap.so.{abi}");
}
