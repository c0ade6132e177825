fn main() {
    println!("cargo:rerun-if-changed=c/naive.c");
    cc::Build::new().file("c/naive.c").opt_level(2).warnings(true).extra_warnings(true).compile("iovmap_naive");
}
