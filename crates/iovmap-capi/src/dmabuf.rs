//! Kernel-built views and dma-bufs out, in C: the dma-bufs of a view, what automatic
//! placement did with udmabuf, and dma-bufs of a list without any CPU mapping.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::ptr;

use iovmap_core::{DmaBuf, KernelBuiltError};

use crate::error::{Failure, IovmapCode, guard, guard_value};
use crate::{IovmapRemapper, IovmapView, iov_slice};

/// One dma-buf: its fd and where its bytes lie in the view (from the page boundary below
/// the view's first byte; `iovmap_view_ptr` is `lead` bytes into the first buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IovmapDmabuf {
    /// The dma-buf's fd (close-on-exec); owned as the function that filled this in says.
    pub fd: c_int,
    /// Offset of the buffer's first byte from the page boundary below the list's first byte.
    pub offset: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

/// Why automatic placement did not give runs to udmabuf (`iovmap_kernel_built.declined`).
#[repr(C)]
#[allow(non_camel_case_types)] // the C names
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IovmapDeclined {
    /// It did, or had nothing for it.
    IOVMAP_DECLINED_NONE = 0,
    /// There is no `/dev/udmabuf` (no CONFIG_UDMABUF, or the module is not loaded).
    IOVMAP_DECLINED_NO_DEVICE = 1,
    /// `/dev/udmabuf` cannot be opened (`declined_errno` says why).
    IOVMAP_DECLINED_DEVICE_DENIED = 2,
    /// The kernel refused to build a buffer (`declined_errno`: seals, limits, pinning).
    IOVMAP_DECLINED_REFUSED = 3,
}

/// What a view's kernel-built runs took (`iovmap_view_kernel_built`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovmapKernelBuilt {
    /// Runs placed through udmabuf.
    pub runs: u64,
    /// dma-bufs made (`iovmap_view_dmabuf_count`).
    pub dmabufs: u64,
    /// Why automatic placement fell back to remapping, if it did (`IovmapDeclined`).
    pub declined: IovmapDeclined,
    /// The errno behind `declined`, or 0.
    pub declined_errno: i32,
}

/// `index`, if it names one of the `count` dma-bufs of `whose` ("the view", "the list").
fn in_range(f: &'static str, index: usize, count: usize, whose: &str) -> Result<usize, Failure> {
    if index < count {
        Ok(index)
    } else {
        Err(Failure::argument(f, format!("index {index} is out of range: {whose} has {count} dma-bufs")))
    }
}

fn to_c(buf: &DmaBuf) -> IovmapDmabuf {
    IovmapDmabuf { fd: buf.fd().as_raw_fd(), offset: buf.offset() as u64, len: buf.len() as u64 }
}

/// The number of dma-bufs of the view's kernel-built runs (0 when nothing was
/// kernel-built, or `v` is NULL).
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_dmabuf_count(v: *const IovmapView) -> usize {
    guard_value("iovmap_view_dmabuf_count", 0, || {
        // SAFETY: `v` is NULL or a live view (contract).
        unsafe { v.as_ref() }.map_or(0, |v| v.inner.dmabufs().len())
    })
}

/// Stores dma-buf `index` of the view in `*out`. Its fd belongs to the view: it is closed
/// by `iovmap_view_free`; `dup` it (F_DUPFD_CLOEXEC) to keep the buffer longer.
///
/// Returns `IOVMAP_OK`, or `IOVMAP_E_INVALID_ARGUMENT` (NULL `v` or `out`, `index` out of
/// range).
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_dmabuf(v: *const IovmapView, index: usize, out: *mut IovmapDmabuf) -> c_int {
    const F: &str = "iovmap_view_dmabuf";
    guard(F, || {
        // SAFETY: `v` is NULL or a live view (contract).
        let v = unsafe { v.as_ref() }.ok_or_else(|| Failure::argument(F, "the view is NULL"))?;
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        let bufs = v.inner.dmabufs();
        *out = to_c(&bufs[in_range(F, index, bufs.len(), "the view")?]);
        Ok(())
    })
}

/// Stores what the view's kernel-built runs took in `*out`.
///
/// Returns `IOVMAP_OK`, or `IOVMAP_E_INVALID_ARGUMENT` when `v` or `out` is NULL.
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_kernel_built(v: *const IovmapView, out: *mut IovmapKernelBuilt) -> c_int {
    const F: &str = "iovmap_view_kernel_built";
    guard(F, || {
        // SAFETY: `v` is NULL or a live view (contract).
        let v = unsafe { v.as_ref() }.ok_or_else(|| Failure::argument(F, "the view is NULL"))?;
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        let s = v.inner.stats();
        let (declined, declined_errno) = match s.kernel_built_declined {
            None => (IovmapDeclined::IOVMAP_DECLINED_NONE, 0),
            Some(KernelBuiltError::NoDevice) => (IovmapDeclined::IOVMAP_DECLINED_NO_DEVICE, libc::ENOENT),
            Some(KernelBuiltError::DeviceDenied { errno }) => (IovmapDeclined::IOVMAP_DECLINED_DEVICE_DENIED, errno),
            Some(KernelBuiltError::Refused { errno }) => (IovmapDeclined::IOVMAP_DECLINED_REFUSED, errno),
            // Automatic placement declines only for the device or the kernel's refusal.
            Some(_) => (IovmapDeclined::IOVMAP_DECLINED_REFUSED, 0),
        };
        *out = IovmapKernelBuilt { runs: s.kernel_built as u64, dmabufs: s.dmabufs as u64, declined, declined_errno };
        Ok(())
    })
}

/// The dma-bufs of a list, made with no CPU mapping (opaque): `iovmap_dmabufs_new` makes
/// them, `iovmap_dmabufs_free` closes those not taken.
#[derive(Debug)]
pub struct IovmapDmabufs {
    /// The buffers; `None` once taken.
    buffers: Vec<Option<DmaBuf>>,
    lead: usize,
    len: usize,
}

/// Builds the dma-bufs of the `iovcnt` iovecs at `iov`, with no CPU mapping, for VMMs
/// that only pass guest memory on (to a GPU, a display, an encoder), and stores the list
/// in `*out`. Every iovec must lie in a region registered with a memfd udmabuf takes
/// (F_SEAL_SHRINK set, F_SEAL_WRITE not: made through udmabuf) or in a vfio-pci region
/// registered with `iovmap_register_vfio` (exported by vfio-pci, Linux 6.19+), mapped
/// writable. Consecutive runs of one kind share a buffer, so a list that fits one buffer
/// (udmabuf's `list_limit` entries and `size_limit_mb`; one BAR mmap) gives one dma-buf.
/// The kernel keeps the pages pinned while a buffer lives.
///
/// Returns `IOVMAP_OK`, or a negative code with `*out` set to NULL and nothing left open:
/// `IOVMAP_E_KERNEL_BUILT` names the iovec that cannot be made a dma-buf and why (not
/// registered, not a sealed memfd, no `/dev/udmabuf`, vfio-pci will not export it), and
/// the list errors of `iovmap_map` apply (`IOVMAP_E_WRITE_PROTECTED` included).
///
/// # Safety
/// As `iovmap_map`: `r` is NULL or a live remapper not being changed meanwhile, `iov` is
/// NULL or `iovcnt` readable iovecs, `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_new(
    r: *const IovmapRemapper,
    iov: *const libc::iovec,
    iovcnt: c_int,
    out: *mut *mut IovmapDmabufs,
) -> c_int {
    const F: &str = "iovmap_dmabufs_new";
    guard(F, || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        *out = ptr::null_mut();
        // SAFETY: `r` is NULL or a live remapper not being changed meanwhile (contract).
        let r = unsafe { r.as_ref() }.ok_or_else(|| Failure::argument(F, "the remapper is NULL"))?;
        // SAFETY: forwarded (contract).
        let iovs = unsafe { iov_slice(F, iov, iovcnt) }?;
        let made = r.inner.dmabufs(iovs)?;
        let (lead, len) = (made.lead(), made.len());
        let buffers = made.into_buffers().into_iter().map(Some).collect();
        *out = Box::into_raw(Box::new(IovmapDmabufs { buffers, lead, len }));
        Ok(())
    })
}

/// The number of dma-bufs in the list (0 for NULL).
///
/// # Safety
/// `l` is NULL or a live list, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_count(l: *const IovmapDmabufs) -> usize {
    guard_value("iovmap_dmabufs_count", 0, || {
        // SAFETY: `l` is NULL or a live list (contract).
        unsafe { l.as_ref() }.map_or(0, |l| l.buffers.len())
    })
}

/// Where the list's first byte lies in its first buffer (the first iovec may start
/// mid-page), or 0 for NULL.
///
/// # Safety
/// `l` is NULL or a live list, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_lead(l: *const IovmapDmabufs) -> usize {
    guard_value("iovmap_dmabufs_lead", 0, || {
        // SAFETY: `l` is NULL or a live list (contract).
        unsafe { l.as_ref() }.map_or(0, |l| l.lead)
    })
}

/// The list's length in bytes (the sum of the iovec lengths), or 0 for NULL.
///
/// # Safety
/// `l` is NULL or a live list, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_len(l: *const IovmapDmabufs) -> usize {
    guard_value("iovmap_dmabufs_len", 0, || {
        // SAFETY: `l` is NULL or a live list (contract).
        unsafe { l.as_ref() }.map_or(0, |l| l.len)
    })
}

/// Stores dma-buf `index` of the list in `*out`; its fd is -1 once taken. The fd belongs
/// to the list until `iovmap_dmabufs_take`.
///
/// Returns `IOVMAP_OK`, or `IOVMAP_E_INVALID_ARGUMENT` (NULL `l` or `out`, `index` out of
/// range).
///
/// # Safety
/// `l` is NULL or a live list, not being freed meanwhile; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_get(l: *const IovmapDmabufs, index: usize, out: *mut IovmapDmabuf) -> c_int {
    const F: &str = "iovmap_dmabufs_get";
    guard(F, || {
        // SAFETY: `l` is NULL or a live list (contract).
        let l = unsafe { l.as_ref() }.ok_or_else(|| Failure::argument(F, "the list is NULL"))?;
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        let slot = &l.buffers[in_range(F, index, l.buffers.len(), "the list")?];
        *out = slot.as_ref().map_or(IovmapDmabuf { fd: -1, ..IovmapDmabuf::default() }, to_c);
        Ok(())
    })
}

/// Takes dma-buf `index` out of the list: returns its fd, which the caller owns from now
/// on (and must close), or a negative `IOVMAP_E_*` code (NULL `l`, `index` out of range,
/// already taken: `IOVMAP_E_INVALID_ARGUMENT`).
///
/// # Safety
/// `l` is NULL or a live list that no other call uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_take(l: *mut IovmapDmabufs, index: usize) -> c_int {
    const F: &str = "iovmap_dmabufs_take";
    let mut fd = -1;
    let rc = guard(F, || {
        // SAFETY: `l` is NULL or a live list used by nobody else meanwhile (contract).
        let l = unsafe { l.as_mut() }.ok_or_else(|| Failure::argument(F, "the list is NULL"))?;
        let index = in_range(F, index, l.buffers.len(), "the list")?;
        let slot = &mut l.buffers[index];
        let buf = slot.take().ok_or_else(|| Failure::argument(F, format!("dma-buf {index} was taken already")))?;
        fd = buf.into_fd().into_raw_fd();
        Ok(())
    });
    if rc == IovmapCode::IOVMAP_OK.raw() { fd } else { rc }
}

/// Frees the list and closes the dma-bufs not taken. NULL is ignored.
///
/// # Safety
/// `l` is NULL or a list from `iovmap_dmabufs_new` not yet freed; no other call may use it
/// during or after this one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabufs_free(l: *mut IovmapDmabufs) {
    guard_value("iovmap_dmabufs_free", (), || {
        if !l.is_null() {
            // SAFETY: `l` came from `Box::into_raw` in `iovmap_dmabufs_new` and the caller
            // hands it back exactly once, with no other user left (contract).
            drop(unsafe { Box::from_raw(l) });
        }
    })
}

/// Writes the name of the kernel driver that exported the dma-buf `fd` (`exp_name` in
/// `/proc/self/fdinfo`: `udmabuf` for kernel-built runs of guest RAM, `vfio-pci` for BAR
/// runs) into `buf`, NUL-terminated, truncated to `size` bytes.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (NULL `buf`, `size` 0, a negative or
/// closed fd) or `IOVMAP_E_OS` (fdinfo unreadable, or the fd is no dma-buf).
///
/// # Safety
/// `buf` is NULL or points to `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_dmabuf_exporter(fd: c_int, buf: *mut std::ffi::c_char, size: usize) -> c_int {
    const F: &str = "iovmap_dmabuf_exporter";
    guard(F, || {
        if buf.is_null() || size == 0 {
            return Err(Failure::argument(F, "buf is NULL or size is 0"));
        }
        // SAFETY: the caller keeps the fd open during the call (contract).
        let fd = unsafe { crate::open_fd(F, fd) }?;
        let name = iovmap_core::dmabuf_exporter(fd).map_err(|e| Failure::os(F, e))?;
        let n = name.len().min(size - 1);
        // SAFETY: `buf` has `size` writable bytes (contract) and `n + 1 <= size`.
        unsafe {
            ptr::copy_nonoverlapping(name.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
        Ok(())
    })
}
