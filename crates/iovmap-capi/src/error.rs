//! Return codes, the per-thread last error, and the guard that keeps panics inside.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use iovmap_core::Error;

/// What a function of the C API returns: 0 for success, a negative code for each kind
/// of error. The functions return `int`; these are its values. The message and the
/// index of the iovec at fault are kept for the calling thread
/// (`iovmap_last_error_message`, `iovmap_last_error_index`).
#[repr(C)]
#[allow(non_camel_case_types)] // the C names
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IovmapCode {
    /// Success.
    IOVMAP_OK = 0,
    /// An argument is unusable: a NULL pointer, a negative count, unknown flags, a
    /// misaligned `iov`, a negative or closed fd. Nothing was done.
    IOVMAP_E_INVALID_ARGUMENT = -1,
    /// The iovec list holds no bytes (`iovcnt` is 0 or every `iov_len` is 0).
    IOVMAP_E_EMPTY = -2,
    /// The view would be larger than `PTRDIFF_MAX` bytes.
    IOVMAP_E_TOO_LARGE = -3,
    /// Two runs meet off a page boundary; the index names the segment.
    IOVMAP_E_UNALIGNED = -4,
    /// A segment covers an address that is not mapped; the index names it.
    IOVMAP_E_NOT_MAPPED = -5,
    /// A segment lies in private memory (MAP_PRIVATE, private anonymous), which cannot
    /// be aliased; the index names it.
    IOVMAP_E_NOT_SHAREABLE = -6,
    /// The kernel refused to clone a run (vfio-pci BAR, hugetlbfs, a mapping sealed with
    /// mseal) and no registered fd could be mapped in its place; the index names the
    /// run's first segment.
    IOVMAP_E_NO_FALLBACK = -7,
    /// The view needs more mappings than `vm.max_map_count` leaves room for.
    IOVMAP_E_TOO_MANY_MAPPINGS = -8,
    /// `iovmap_register` or `iovmap_unregister` refused the region (overlap,
    /// misalignment, not mapped, private, file too short, not the fd's file or offset,
    /// nothing registered there); or `iovmap_map` found that a registered region's memory
    /// was replaced without `iovmap_unregister` (the index names the segment).
    IOVMAP_E_INVALID_REGION = -9,
    /// A read-write view of memory that cannot be written (read-only fd, write-sealed
    /// memfd), or of a mapping the process made read-only without
    /// `IOVMAP_MAP_RAISE_SOURCE_PROTECTION`, was asked for: map it with
    /// `IOVMAP_MAP_READ_ONLY`. The index names the run's first segment.
    IOVMAP_E_NOT_WRITABLE = -10,
    /// A system call failed for another reason; the message names it and the errno.
    IOVMAP_E_OS = -11,
    /// An error this version of the C API has no code for (from a newer iovmap); the
    /// message and the index still describe it.
    IOVMAP_E_OTHER = -12,
    /// iovmap panicked (a bug: please report it with the message). The panic was
    /// caught at the boundary; the failed call mapped and registered nothing.
    IOVMAP_E_PANIC = -13,
    /// The mapping a run was cloned from changed while the view was being built (another
    /// thread unmapped, replaced or resized it); nothing was mapped: retry once the guest
    /// memory is stable. The index names the run's first segment.
    IOVMAP_E_SOURCE_CHANGED = -14,
    /// udmabuf cannot build (part of) the view: `IOVMAP_MAP_KERNEL_BUILT` was asked for, or
    /// the list has pieces of huge-page RAM smaller than a huge page, which only udmabuf
    /// can map, or `iovmap_dmabufs_new` was called. The message says why (not a
    /// registered sealed memfd, no `/dev/udmabuf`, refused); the index names the iovec.
    IOVMAP_E_KERNEL_BUILT = -15,
    /// A read-write view (or dma-bufs, which an importer may write) was asked of guest
    /// memory a userfaultfd monitor write-protects (a live snapshot is being taken):
    /// writes through it would not reach the monitor. Map it with `IOVMAP_MAP_READ_ONLY`,
    /// or after the snapshot ends. The index names the segment.
    IOVMAP_E_WRITE_PROTECTED = -16,
}

pub use IovmapCode::*;

impl IovmapCode {
    /// Every code, from `IOVMAP_OK` down.
    pub const ALL: [IovmapCode; 17] = [
        IOVMAP_OK,
        IOVMAP_E_INVALID_ARGUMENT,
        IOVMAP_E_EMPTY,
        IOVMAP_E_TOO_LARGE,
        IOVMAP_E_UNALIGNED,
        IOVMAP_E_NOT_MAPPED,
        IOVMAP_E_NOT_SHAREABLE,
        IOVMAP_E_NO_FALLBACK,
        IOVMAP_E_TOO_MANY_MAPPINGS,
        IOVMAP_E_INVALID_REGION,
        IOVMAP_E_NOT_WRITABLE,
        IOVMAP_E_OS,
        IOVMAP_E_OTHER,
        IOVMAP_E_PANIC,
        IOVMAP_E_SOURCE_CHANGED,
        IOVMAP_E_KERNEL_BUILT,
        IOVMAP_E_WRITE_PROTECTED,
    ];

    /// The `int` a function returns for this code.
    ///
    /// ```
    /// assert_eq!(iovmap_capi::IOVMAP_E_EMPTY.raw(), -2);
    /// ```
    pub const fn raw(self) -> c_int {
        self as c_int
    }

    /// The code an `int` stands for, if any.
    ///
    /// ```
    /// use iovmap_capi::IovmapCode;
    /// assert_eq!(IovmapCode::from_raw(-7), Some(iovmap_capi::IOVMAP_E_NO_FALLBACK));
    /// assert_eq!(IovmapCode::from_raw(1), None);
    /// ```
    pub fn from_raw(code: c_int) -> Option<IovmapCode> {
        IovmapCode::ALL.into_iter().find(|c| c.raw() == code)
    }
}

/// A failure on its way to the caller: the code to return and what to remember.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: IovmapCode,
    pub(crate) message: String,
    pub(crate) index: Option<usize>,
}

impl Failure {
    /// An unusable argument of `function`.
    pub(crate) fn argument(function: &str, what: impl std::fmt::Display) -> Self {
        Failure { code: IOVMAP_E_INVALID_ARGUMENT, message: format!("{function}: {what}"), index: None }
    }

    /// A system call of `function` that failed outside iovmap's map path (the message
    /// says which, and its errno).
    pub(crate) fn os(function: &str, what: impl std::fmt::Display) -> Self {
        Failure { code: IOVMAP_E_OS, message: format!("{function}: {what}"), index: None }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure { code: code_of(&e), message: c_message(&e), index: e.index() }
    }
}

/// What a C caller is told: iovmap's message, with the Rust names of the calls and
/// options it advises replaced by the C API's.
pub(crate) fn c_message(e: &Error) -> String {
    const C_NAMES: [(&str, &str); 8] = [
        ("Remapper::register", "iovmap_register"),
        ("MapOptions::kernel_built()", "IOVMAP_MAP_KERNEL_BUILT"),
        ("Access::ReadOnly", "IOVMAP_MAP_READ_ONLY"),
        ("MapOptions::raise_source_protection()", "IOVMAP_MAP_RAISE_SOURCE_PROTECTION"),
        ("isize::MAX", "PTRDIFF_MAX"),
        ("Remapper::unregister", "iovmap_unregister"),
        ("userfaultfd::unregister", "iovmap_uffd_unregister"),
        ("declare_disarmed", "iovmap_uffd_declare_disarmed"),
    ];
    let mut text = e.to_string();
    for (rust, c) in C_NAMES {
        text = text.replace(rust, c);
    }
    text
}

/// The code of an iovmap error: one per kind, and `IOVMAP_E_OTHER` for kinds added to
/// iovmap after this API was written.
pub(crate) fn code_of(e: &Error) -> IovmapCode {
    match e {
        Error::Empty => IOVMAP_E_EMPTY,
        Error::TooLarge => IOVMAP_E_TOO_LARGE,
        Error::Unaligned { .. } => IOVMAP_E_UNALIGNED,
        Error::NotMapped { .. } => IOVMAP_E_NOT_MAPPED,
        Error::NotShareable { .. } => IOVMAP_E_NOT_SHAREABLE,
        Error::NoFallback { .. } | Error::Sealed { .. } => IOVMAP_E_NO_FALLBACK,
        Error::TooManyMappings { .. } => IOVMAP_E_TOO_MANY_MAPPINGS,
        Error::InvalidRegion { .. } | Error::NotRegistered { .. } | Error::StaleRegion { .. } => {
            IOVMAP_E_INVALID_REGION
        }
        Error::NotWritable { .. } | Error::ExceedsSource { .. } => IOVMAP_E_NOT_WRITABLE,
        Error::Os { .. } => IOVMAP_E_OS,
        Error::SourceChanged { .. } => IOVMAP_E_SOURCE_CHANGED,
        Error::KernelBuilt { .. } => IOVMAP_E_KERNEL_BUILT,
        Error::WriteProtected { .. } => IOVMAP_E_WRITE_PROTECTED,
        _ => IOVMAP_E_OTHER,
    }
}

struct LastError {
    message: CString,
    index: Option<usize>,
}

thread_local! {
    static LAST: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Remembers `f` as this thread's last error.
fn remember(f: Failure) {
    // An interior NUL would cut the C string short; iovmap's messages have none.
    let message = CString::new(f.message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; the code still tells.
    let _ = LAST.try_with(|l| *l.borrow_mut() = Some(LastError { message, index: f.index }));
}

fn forget() {
    let _ = LAST.try_with(|l| l.borrow_mut().take());
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn panicked(function: &str, payload: Box<dyn Any + Send>) -> Failure {
    let failure = Failure {
        code: IOVMAP_E_PANIC,
        message: format!("{function}: iovmap panicked, a bug (please report it): {}", panic_text(&*payload)),
        index: None,
    };
    // Dropping the payload runs arbitrary code; a second panic there must not escape.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
    failure
}

/// Runs the body of a code-returning entry point: returns `IOVMAP_OK` and clears the
/// last error, or returns the failure's code and remembers it. A panic becomes
/// `IOVMAP_E_PANIC`; it never unwinds into C.
pub(crate) fn guard(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            forget();
            return IOVMAP_OK.raw();
        }
        Ok(Err(f)) => f,
        Err(payload) => panicked(function, payload),
    };
    let code = failure.code;
    remember(failure);
    code.raw()
}

/// Runs the body of an entry point that cannot report a code (constructors, accessors,
/// destructors): a panic returns `fallback` and is remembered as the last error.
pub(crate) fn guard_value<T>(function: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            remember(panicked(function, payload));
            fallback
        }
    }
}

/// The message of the last error on the calling thread, or an empty string when the
/// last call that returns a code succeeded (or none was made).
///
/// The string belongs to iovmap: do not free it. It stays valid until the calling
/// thread's next call to an iovmap function other than `iovmap_last_error_message`,
/// `iovmap_last_error_index` and `iovmap_strerror`; copy it to keep it. Errors are per
/// thread: another thread's calls never change it.
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_last_error_message() -> *const c_char {
    guard_value("iovmap_last_error_message", c"".as_ptr(), || {
        LAST.try_with(|l| l.borrow().as_ref().map(|e| e.message.as_ptr())).ok().flatten().unwrap_or(c"".as_ptr())
    })
}

/// The index, in the caller's iovec list, of the segment the last error on the calling
/// thread names (the bad iovec, or the first iovec of the run at fault), or -1 when the
/// last error names none or the last call succeeded.
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_last_error_index() -> i64 {
    guard_value("iovmap_last_error_index", -1, || {
        LAST.try_with(|l| l.borrow().as_ref().and_then(|e| e.index))
            .ok()
            .flatten()
            .and_then(|i| i64::try_from(i).ok())
            .unwrap_or(-1)
    })
}

/// A short, static description of a return code (`"IOVMAP_E_NO_FALLBACK: ..."`), for
/// logs. Unknown codes get `"unknown iovmap code"`. The string is static: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_strerror(code: c_int) -> *const c_char {
    guard_value("iovmap_strerror", c"unknown iovmap code".as_ptr(), || {
        IovmapCode::from_raw(code).map_or(c"unknown iovmap code", describe).as_ptr()
    })
}

/// The static description behind [`iovmap_strerror`].
pub(crate) fn describe(code: IovmapCode) -> &'static CStr {
    match code {
        IOVMAP_OK => c"IOVMAP_OK: success",
        IOVMAP_E_INVALID_ARGUMENT => {
            c"IOVMAP_E_INVALID_ARGUMENT: NULL pointer, negative count, unknown flags or bad fd"
        }
        IOVMAP_E_EMPTY => c"IOVMAP_E_EMPTY: the iovec list holds no bytes",
        IOVMAP_E_TOO_LARGE => c"IOVMAP_E_TOO_LARGE: the view would not fit in the address space",
        IOVMAP_E_UNALIGNED => c"IOVMAP_E_UNALIGNED: two runs meet off a page boundary",
        IOVMAP_E_NOT_MAPPED => c"IOVMAP_E_NOT_MAPPED: a segment covers unmapped memory",
        IOVMAP_E_NOT_SHAREABLE => c"IOVMAP_E_NOT_SHAREABLE: a segment lies in private memory",
        IOVMAP_E_NO_FALLBACK => {
            c"IOVMAP_E_NO_FALLBACK: the kernel will not clone a run and no registered fd can stand in"
        }
        IOVMAP_E_TOO_MANY_MAPPINGS => c"IOVMAP_E_TOO_MANY_MAPPINGS: not enough room under vm.max_map_count",
        IOVMAP_E_INVALID_REGION => c"IOVMAP_E_INVALID_REGION: the region cannot be registered or unregistered",
        IOVMAP_E_NOT_WRITABLE => c"IOVMAP_E_NOT_WRITABLE: read-write view of memory that cannot be written",
        IOVMAP_E_OS => c"IOVMAP_E_OS: a system call failed",
        IOVMAP_E_OTHER => c"IOVMAP_E_OTHER: an iovmap error this C API has no code for",
        IOVMAP_E_PANIC => c"IOVMAP_E_PANIC: iovmap panicked (a bug)",
        IOVMAP_E_SOURCE_CHANGED => c"IOVMAP_E_SOURCE_CHANGED: a segment's mapping changed while the view was built",
        IOVMAP_E_KERNEL_BUILT => c"IOVMAP_E_KERNEL_BUILT: udmabuf cannot build the view (the message says why)",
        IOVMAP_E_WRITE_PROTECTED => {
            c"IOVMAP_E_WRITE_PROTECTED: a writable view of memory a userfaultfd monitor write-protects"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_changed_under_the_call_has_its_own_code() {
        // Only a race makes it (crates/iovmap/tests/races.rs); its mapping is checked here.
        assert_eq!(code_of(&Error::SourceChanged { index: 3 }), IOVMAP_E_SOURCE_CHANGED);
        assert_eq!(IOVMAP_E_SOURCE_CHANGED.raw(), -14);
    }

    #[test]
    fn messages_name_c_calls_and_flags_not_rust_items() {
        use iovmap_core::{Operation, RegionContext, RegionError};
        let io = || std::io::Error::from_raw_os_error(libc::EPERM);
        let id = {
            // A real id: register a page of a memfd, then look it up.
            // SAFETY: memfd_create with a valid C string; the result is checked.
            let fd = unsafe { libc::memfd_create(c"capi".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: `fd` is the fresh memfd just made; it is closed below.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let page = iovmap_core::page_size();
            file.set_len(page as u64).unwrap();
            // SAFETY: a fresh shared mapping of our memfd, unmapped below.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
            let mut r = iovmap_core::Remapper::new();
            let id = r.register(p.cast(), page, &file, 0).unwrap();
            // SAFETY: unmaps the mapping made above.
            unsafe { libc::munmap(p, page) };
            id
        };
        let every: Vec<Error> = vec![
            Error::Empty,
            Error::TooLarge,
            Error::Unaligned { index: 1, page_size: 2 << 20 },
            Error::NotMapped { index: 1 },
            Error::NotShareable { index: 1 },
            Error::NoFallback { index: 1, source: io() },
            Error::Sealed { index: 1 },
            Error::DeviceHole { index: 1 },
            Error::NotInGuestMemory { index: 1 },
            Error::SourceChanged { index: 1 },
            Error::StaleRegion { index: 1, at: 0x1000, region: id },
            Error::TooManyMappings { needed: 2, available: 1 },
            Error::InvalidRegion {
                addr: 0x1000,
                len: 0x1000,
                offset: 0,
                context: RegionContext::Register,
                kind: RegionError::Private { at: 0x1000 },
            },
            Error::NotRegistered { id },
            Error::ExceedsSource { index: 1, prot: libc::PROT_READ, wanted: libc::PROT_READ | libc::PROT_WRITE },
            Error::NotWritable { index: 1 },
            Error::Os { op: Operation::Clone, index: Some(1), source: io() },
            Error::KernelBuilt { index: 1, reason: iovmap_core::KernelBuiltError::NotRegistered },
            Error::KernelBuilt { index: 1, reason: iovmap_core::KernelBuiltError::NotSealed },
        ];
        for e in &every {
            let c = c_message(e);
            assert!(!c.contains("::"), "a Rust path in a C message: {c}");
            // Device holes (vfio registrations) and guest lists (vm-memory) have no C API.
            let c_reachable = !matches!(e, Error::DeviceHole { .. } | Error::NotInGuestMemory { .. });
            assert!(!c_reachable || code_of(e) != IOVMAP_E_OTHER, "{e:?} has no code of its own");
        }
        assert!(c_message(&every[6]).contains("iovmap_register"), "{}", c_message(&every[6]));
        assert!(c_message(&every[2]).contains("(2 MiB)") && c_message(&every[2]).contains("IOVMAP_MAP_KERNEL_BUILT"));
        assert!(c_message(&every[14]).contains("IOVMAP_MAP_RAISE_SOURCE_PROTECTION"));
        assert!(c_message(&every[15]).contains("IOVMAP_MAP_READ_ONLY"));
    }

    fn last_message() -> String {
        // SAFETY: the pointer is a valid C string until this thread's next coded call.
        unsafe { CStr::from_ptr(iovmap_last_error_message()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        let rc = guard("iovmap_test", || panic!("boom {}", 42));
        assert_eq!(rc, IOVMAP_E_PANIC.raw());
        let msg = last_message();
        assert!(msg.starts_with("iovmap_test: iovmap panicked"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");
        assert_eq!(iovmap_last_error_index(), -1);
        // A static &str payload too.
        assert_eq!(guard("iovmap_test", || panic!("static")), IOVMAP_E_PANIC.raw());
        assert!(last_message().ends_with("static"));
    }

    #[test]
    fn a_panic_in_a_value_entry_returns_the_fallback() {
        let p: *const u8 = guard_value("iovmap_view_ptr", std::ptr::null(), || panic!("inside"));
        assert!(p.is_null());
        assert!(last_message().contains("iovmap_view_ptr: iovmap panicked"));
    }

    #[test]
    fn a_panicking_payload_drop_does_not_escape() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("payload drop");
            }
        }
        let rc = guard("iovmap_test", || std::panic::panic_any(Bomb));
        assert_eq!(rc, IOVMAP_E_PANIC.raw());
        assert!(last_message().contains("(no message)"));
    }

    #[test]
    fn success_clears_the_last_error() {
        assert!(guard("iovmap_test", || Err(Failure::argument("iovmap_test", "bad"))) < 0);
        assert_eq!(last_message(), "iovmap_test: bad");
        assert_eq!(guard("iovmap_test", || Ok(())), IOVMAP_OK.raw());
        assert_eq!(last_message(), "");
        assert_eq!(iovmap_last_error_index(), -1);
    }

    #[test]
    fn codes_are_0_then_consecutive_negatives_each_described() {
        for (i, c) in IovmapCode::ALL.into_iter().enumerate() {
            assert_eq!(c.raw(), -(i as c_int), "{c:?}");
            assert_eq!(IovmapCode::from_raw(c.raw()), Some(c));
            // SAFETY: iovmap_strerror returns a static C string.
            let d = unsafe { CStr::from_ptr(iovmap_strerror(c.raw())) }.to_str().unwrap();
            assert!(d.starts_with(&format!("{c:?}: ")), "{c:?}: {d}");
        }
        for unknown in [1, -17, c_int::MIN, c_int::MAX] {
            // SAFETY: as above.
            assert_eq!(unsafe { CStr::from_ptr(iovmap_strerror(unknown)) }.to_str().unwrap(), "unknown iovmap code");
        }
    }
}
