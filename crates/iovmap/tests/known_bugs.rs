//! Reproducers of library bugs found by the hardening work (issue 4), reported and not
//! fixed yet. Each test asserts the behaviour iovmap promises, so it fails today; it is
//! ignored (with the reason) so that `cargo test` stays green, and runs with
//! `cargo test -p iovmap --test known_bugs -- --ignored`. Un-ignore each when fixed.

#[path = "support/race.rs"]
mod race;

use iovmap::Remapper;
use iovmap_testkit::{self as kit, BpfArray, skip};
use race::{Change, World};

/// A view returned without an error shows pages that were never mapped at their source
/// address: another thread maps a shorter mapping of another file over the start of a
/// run's source between planning and cloning, and `mremap(src, 0, len, ...)` clones
/// `len` bytes from that mapping's file, past its end (the kernel does not bound a clone
/// by the VMA: KERNEL-FACTS.md, "Traps"). With F2 over the first half of X, the second
/// half of the view shows F2's pages (never mapped there); with fresh shared anonymous
/// memory over it, pages past the end of that memory, which SIGBUS when read.
#[test]
#[ignore = "library bug reported: a racing replacement of a run's head makes the clone map another file's pages"]
fn a_head_replaced_under_map_never_shows_foreign_pages() {
    let w = World::new();
    let mut bad = Vec::new();
    for change in [Change::ReplaceHead, Change::ReplaceHeadAnon] {
        for registered in [false, true] {
            let t = w.race(change, registered, 5.0, 300);
            println!(
                "{change:?}, registered {registered}: {} changes, {} views, {} saw the change, {} with foreign pages",
                t.changes, t.views, t.disturbed, t.bad_views
            );
            if t.violations > 0 {
                bad.push(format!("{change:?} (registered: {registered}): {}", t.first_violation.unwrap()));
            }
        }
    }
    assert!(bad.is_empty(), "views with foreign pages: {bad:#?}");
}

/// Two registered regions of different anon-inode files (BPF maps here; perf events,
/// io_uring, and vfio device fds of the group interface are the same) are taken for one
/// file: `FileId` is `(st_dev, st_ino)`, and every anon-inode fd has the same ones. A list
/// that runs from page 0 of one array to page 1 of the other (contiguous "file offsets")
/// becomes one fd run of the first array, and the view shows its page 1 instead of the
/// second array's.
#[test]
#[ignore = "library bug reported: anon-inode fds share (st_dev, st_ino), so two devices' regions coalesce by offset"]
fn two_anon_inode_files_are_not_one_file() {
    let (a, b) = match (BpfArray::new(4), BpfArray::new(4)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => skip!("no BPF arrays: {e}"),
    };
    let p = kit::page();
    // SAFETY: the arrays' own writable mappings.
    unsafe {
        kit::fill(a.map.ptr(), a.map.len(), 81, 0);
        kit::fill(b.map.ptr(), b.map.len(), 82, 0);
    }
    let mut r = Remapper::new();
    r.register(a.map.ptr(), a.map.len(), a.fd(), 0).unwrap();
    r.register(b.map.ptr(), b.map.len(), b.fd(), 0).unwrap();
    let list = [a.map.iov(0, p), b.map.iov(p, p)];
    let view = r.map(&list).unwrap();
    println!("{:?}", view.stats());
    // SAFETY: the arrays are live and nothing writes them meanwhile.
    let want = unsafe { iovmap_peers::gather(&list) };
    // SAFETY: the view is live for len() bytes.
    let diff = unsafe { kit::first_difference(view.as_ptr(), want.as_ptr(), want.len()) };
    assert_eq!(diff, None, "the view shows another array's page ({:?})", view.stats());
}
