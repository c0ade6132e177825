//! The steady state of a process that counts its VMAs and fds around iovmap calls.

use iovmap::Remapper;
use iovmap::fault::Faults;
use iovmap_testkit::{self as kit, Counts, GuestRam};

/// Makes iovmap open what it keeps for the life of the process before any baseline is
/// taken: the PROCMAP_QUERY fd (Linux 6.11+), the result of the hole probe, and the
/// marker memfd of reservations on kernels that punch holes (emulated here where the
/// kernel does not, as the hole tests do).
pub fn warm_up() {
    let p = kit::page();
    let ram = GuestRam::new(16 * p).unwrap();
    let mut r = Remapper::new();
    r.register(ram.ptr(), ram.len(), ram.fd(), 0).unwrap();
    drop(r.map(&[ram.iov(0, p), ram.iov(4 * p, p)]).unwrap());
    {
        let _holes = Faults::new().assume_holes(true);
        drop(r.map(&[ram.iov(0, p), ram.iov(4 * p, p)]).unwrap());
    }
    let _ = Counts::now();
}
