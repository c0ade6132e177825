//! dma-bufs out: the buffers udmabuf builds for kernel-built runs, owned by a view
//! ([`View::dmabufs`](crate::View::dmabufs)) or handed over with no CPU mapping at all
//! ([`Remapper::dmabufs`](crate::Remapper::dmabufs)), which also exports runs of vfio-pci
//! BARs through vfio-pci (Linux 6.19+).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// One dma-buf of a list: an fd, and where its bytes lie in the list's view.
///
/// Its pages are those of the guest memory it was built from (writes either way are seen
/// on the other side), pinned by the kernel for as long as the buffer lives: as long as
/// this fd, a duplicate of it, or a mapping of it exists. A dma-buf of BAR runs (from
/// [`Remapper::dmabufs`](crate::Remapper::dmabufs)) is vfio-pci's: for peer-to-peer
/// importers only (vfio gives it no CPU mapping), revoked by vfio-pci when the device is
/// reset or its memory disabled.
///
/// ```
/// fn hand_to_display(buf: &iovmap::DmaBuf) {
///     use std::os::fd::AsRawFd;
///     println!("dma-buf fd {} covers [{:#x}, +{:#x}) of the view", buf.fd().as_raw_fd(), buf.offset(), buf.len());
/// }
/// # let _ = hand_to_display;
/// ```
#[derive(Debug)]
pub struct DmaBuf {
    pub(crate) fd: OwnedFd,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

impl DmaBuf {
    /// The dma-buf's fd (close-on-exec), owned by whoever holds this value.
    ///
    /// ```
    /// # fn f(buf: &iovmap::DmaBuf) -> std::io::Result<std::os::fd::OwnedFd> {
    /// let mine = buf.fd().try_clone_to_owned()?; // keep the buffer beyond its view
    /// # Ok(mine) }
    /// ```
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the buffer's first byte lies, from the start of the view's page-aligned
    /// range (`View::mapped_range().start`; the view's first byte is
    /// `as_ptr() - mapped_range().start` into it).
    ///
    /// ```
    /// # fn f(buf: &iovmap::DmaBuf) { assert_eq!(buf.offset() % iovmap::page_size(), 0); }
    /// ```
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Its length in bytes, whole pages.
    ///
    /// ```
    /// # fn f(buf: &iovmap::DmaBuf) { assert!(buf.len() > 0); }
    /// ```
    #[allow(clippy::len_without_is_empty)] // a buffer is never empty
    pub fn len(&self) -> usize {
        self.len
    }

    /// Which kernel driver made the buffer (`exp_name` in `/proc/self/fdinfo`):
    /// `udmabuf` for kernel-built runs of guest RAM, `vfio-pci` for exported BAR runs.
    /// See [`dmabuf_exporter`].
    ///
    /// ```
    /// # fn f(buf: &iovmap::DmaBuf) -> std::io::Result<()> {
    /// println!("made by {}", buf.exporter()?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`dmabuf_exporter`].
    pub fn exporter(&self) -> std::io::Result<String> {
        dmabuf_exporter(self.fd())
    }

    /// The fd, handed over: the caller owns the buffer from now on.
    ///
    /// ```
    /// # fn f(buf: iovmap::DmaBuf) -> std::os::fd::OwnedFd {
    /// buf.into_fd()
    /// # }
    /// ```
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for DmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The dma-bufs of a whole list, built with no CPU mapping
/// ([`Remapper::dmabufs`](crate::Remapper::dmabufs)): for VMMs that only pass the memory
/// on (to a GPU, a display, an encoder). The caller owns them.
#[derive(Debug)]
pub struct DmaBufs {
    pub(crate) buffers: Vec<DmaBuf>,
    pub(crate) lead: usize,
    pub(crate) len: usize,
}

impl DmaBufs {
    /// The buffers, in list order; together they cover the list from the page boundary
    /// below its first byte to the end of its last page.
    ///
    /// ```
    /// # fn f(bufs: &iovmap::DmaBufs) { assert_eq!(bufs.buffers()[0].offset(), 0); }
    /// ```
    pub fn buffers(&self) -> &[DmaBuf] {
        &self.buffers
    }

    /// Where the list's first byte lies in the first buffer (the first segment may start
    /// mid-page).
    ///
    /// ```
    /// # fn f(bufs: &iovmap::DmaBufs) { assert!(bufs.lead() < iovmap::page_size()); }
    /// ```
    pub fn lead(&self) -> usize {
        self.lead
    }

    /// The list's length in bytes (the sum of its segments).
    ///
    /// ```
    /// # fn f(bufs: &iovmap::DmaBufs) { assert!(bufs.len() > 0); }
    /// ```
    #[allow(clippy::len_without_is_empty)] // an empty list is refused
    pub fn len(&self) -> usize {
        self.len
    }

    /// The buffers, handed over.
    ///
    /// ```
    /// # fn f(bufs: iovmap::DmaBufs) -> Vec<std::os::fd::OwnedFd> {
    /// bufs.into_buffers().into_iter().map(iovmap::DmaBuf::into_fd).collect()
    /// # }
    /// ```
    pub fn into_buffers(self) -> Vec<DmaBuf> {
        self.buffers
    }
}

/// The exporter of the dma-buf `fd`, the kernel driver that made it (`exp_name` in
/// `/proc/self/fdinfo/<fd>`): `udmabuf`, `vfio-pci`, a GPU driver's name.
///
/// ```
/// // A memfd is no dma-buf: its fdinfo has no exporter.
/// let memfd = unsafe { libc::memfd_create(c"not-a-dmabuf".as_ptr(), libc::MFD_CLOEXEC) };
/// let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(memfd) };
/// assert_eq!(iovmap::dmabuf_exporter(fd).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
/// # unsafe { libc::close(memfd) };
/// ```
///
/// # Errors
/// The read of `/proc/self/fdinfo` failing, or `InvalidData` when the fd is not a
/// dma-buf (its fdinfo names no exporter).
pub fn dmabuf_exporter(fd: BorrowedFd<'_>) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let path = std::ffi::CString::new(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).expect("no NUL in a path");
    let mut info = Vec::new();
    crate::sys::read_file(&path, &mut info)?;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("exp_name:").map(|n| n.trim().to_string()))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a dma-buf: no exp_name in its fdinfo"))
}
