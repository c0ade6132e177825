fn main() {
    println!("cargo:rerun-if-changed=c/naive.c");
    println!("cargo:rerun-if-changed=c/floor.c");
    cc::Build::new().file("c/naive.c").opt_level(2).warnings(true).extra_warnings(true).compile("iovmap_naive");
    // The floor is a yardstick: its one pass over the list is compiled to run as fast as
    // gcc makes it (the loop is bound by its branches and loads, and unrolling cuts a
    // third of its time on this project's machines).
    cc::Build::new()
        .file("c/floor.c")
        .opt_level(2)
        .flag("-funroll-loops")
        .warnings(true)
        .extra_warnings(true)
        .compile("iovmap_floor");
}
