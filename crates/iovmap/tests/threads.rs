//! iovmap never starts a thread of its own: a VMM confines its threads (per-thread
//! seccomp filters that kill a thread calling clone, thread accounting), and a library
//! must not add one behind its back. The one-time probe of the kernel used to run on a
//! thread of its own, which had ended before any count of /proc/self/task could see it;
//! so this binary counts threads *created*: it defines `pthread_create` itself (the
//! definition in the executable is the one std's calls bind to), counts each call and
//! hands it on to the C library's. `harness = false`: the libtest harness would start
//! threads of its own.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use iovmap::{MapOptions, Remapper};
use iovmap_testkit::{self as kit, GuestRam};

static CREATED: AtomicUsize = AtomicUsize::new(0);

type Start = extern "C" fn(*mut c_void) -> *mut c_void;
type Create = unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, Start, *mut c_void) -> c_int;

/// Counts, then creates the thread with the C library's `pthread_create`.
///
/// # Safety
/// As `pthread_create(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: Start,
    arg: *mut c_void,
) -> c_int {
    CREATED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the caller's arguments, as they came, to the C library's pthread_create.
    unsafe { real_pthread_create()(thread, attr, start, arg) }
}

/// The C library's `pthread_create`. Linked dynamically: the next definition of the
/// symbol. Linked statically (the guest matrix's builds), glibc's `pthread_create` is a
/// weak alias this definition replaces, and the function itself is `__pthread_create`.
#[cfg(not(target_feature = "crt-static"))]
fn real_pthread_create() -> Create {
    // SAFETY: looks up the next definition of the symbol, the C library's.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
    assert!(!real.is_null(), "no pthread_create after this one");
    // SAFETY: that symbol is pthread_create, with this signature.
    unsafe { std::mem::transmute::<*mut c_void, Create>(real) }
}

#[cfg(target_feature = "crt-static")]
fn real_pthread_create() -> Create {
    unsafe extern "C" {
        fn __pthread_create(
            t: *mut libc::pthread_t,
            a: *const libc::pthread_attr_t,
            s: Start,
            arg: *mut c_void,
        ) -> c_int;
    }
    __pthread_create
}

fn created() -> usize {
    CREATED.load(Ordering::SeqCst)
}

fn main() {
    let page = kit::page();
    assert_eq!(created(), 0, "a thread before main's first line");
    // The first view of two runs measures the kernel (whether a refused clone punches a
    // hole in its destination), once per process: that probe had a thread of its own.
    let ram = GuestRam::sealed(64 * page).unwrap();
    ram.fill(5);
    let list = [ram.iov(3 * page, page), ram.iov(9 * page, 2 * page)];
    drop(iovmap::map(&list).expect("a view of two runs"));
    assert_eq!(created(), 0, "mapping a view (and the kernel probe) started a thread");
    // Registration (which learns clone refusals on kernels that punch holes), every
    // placement policy, populate, read-only, kernel-built attempts, dma-bufs.
    let mut r = Remapper::new();
    let id = r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    for opts in [
        MapOptions::new(),
        MapOptions::new().populate(),
        MapOptions::new().read_only(),
        MapOptions::new().remap_only(),
        MapOptions::new().kernel_built(),
    ] {
        let _ = r.map_with(&list, opts);
    }
    let _ = r.dmabufs(&list);
    if let Ok(huge) = GuestRam::huge(kit::HUGE_2M) {
        r.register(huge.ptr(), huge.len(), huge.fd(), 0).unwrap();
        drop(r.map(&[huge.iov(0, kit::HUGE_2M)]).unwrap());
    }
    r.unregister(id).unwrap();
    // The userfaultfd record and guard.
    iovmap::userfaultfd::declare_armed(ram.ptr(), ram.len(), iovmap::userfaultfd::Modes::MISSING);
    drop(r.map(&list).unwrap());
    iovmap::userfaultfd::declare_disarmed(ram.ptr(), ram.len());
    let made = created();
    assert_eq!(made, 0, "iovmap started {made} thread(s) of its own");
    // The count sees threads: one started here is counted.
    std::thread::spawn(|| ()).join().unwrap();
    assert_eq!(created(), 1, "pthread_create is not interposed: this test would see nothing");
    println!("threads: iovmap started none (mapping, registering, the kernel probe); one started by the test was seen");
}
