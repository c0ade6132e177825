//! Gives libiovmap.so its SONAME, so that programs record `libiovmap.so.<abi>` rather
//! than the path they were linked with. The ABI version is the major version, or
//! `0.<minor>` before 1.0 (where every minor release may break it, as in Rust's semver).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets CARGO_PKG_VERSION_MAJOR");
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets CARGO_PKG_VERSION_MINOR");
    let abi = if major == "0" { format!("0.{minor}") } else { major };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libiovmap.so.{abi}");
}
