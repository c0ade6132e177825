fn main() {
    println!("cargo:rerun-if-changed=c/naive.c");
    println!("cargo:rerun-if-changed=c/floor.c");
    cc::Build::new()
        .file("c/naive.c")
        .file("c/floor.c")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .compile("iovmap_peers");
}
