//! The mapping loop: turns a [`Plan`] into a [`View`].
//!
//! 1. Refuse a view that would grant more than its sources (a read-write view of a
//!    read-only mapping), unless asked for. Then the userfaultfd guard
//!    (`userfaultfd.rs`): refuse a view that can write over memory a monitor
//!    write-protects, and have the monitor place or approve every page of the list it
//!    owns (MISSING, MINOR) before anything is mapped.
//! 2. Check the room under vm.max_map_count (large views; see `headroom`).
//! 3. Reserve the view's range, aligned for its largest page size.
//! 4. Give the kernel the stretches of runs it builds (udmabuf, `udmabuf.rs`): all of
//!    them make their dma-bufs before any is mapped, so that automatic placement can
//!    still fall back to the remap path, with nothing to undo, when udmabuf is missing
//!    or refuses; then each buffer is mapped into the reservation with one mmap.
//! 5. Place each other run ([`Placer::place`]): a small state machine over
//!    [`strategy`](crate::strategy::strategy). Clone it with mremap; if the kernel refuses
//!    (EFAULT for VM_PFNMAP/VM_DONTEXPAND such as vfio BARs, EINVAL for hugetlbfs, EPERM
//!    for a sealed mapping), map the registered fd at the run's offset instead, and
//!    remember the refusal on the region so its later runs (in this call and later ones)
//!    go to the fd directly. Runs that cross VMAs go to the fd directly. Each run comes
//!    out as a [`Placed`]: cloned, fd-mapped, or device memory.
//! 6. Check every clone of more than one page: a clone is not bounded by the VMA at its
//!    source, so one that met a shorter mapping (another thread replaced the source under
//!    the call) shows pages never mapped there. The clone's VMA says which file and offset
//!    it maps; if that is not the source the plan saw, the view is not built
//!    (`SourceChanged`).
//! 7. mprotect the view when a clone inherited a protection other than the one asked for.
//! 8. Prefault the runs that are not device memory, if asked.
//!
//! Any error drops the reservation, which unmaps everything placed so far.
//!
//! On kernels that punch a hole at the destination of a refused clone (Linux before
//! 6.17, see `holes.rs`), step 4 never clones into the reservation unless the source is
//! known to clone: registered regions learn it when registered, other mappings once per
//! call and VMA, each by a clone to an address the kernel chooses. A clone that fails
//! anyway (the source changed under the call) may have left a hole: the reservation is
//! marked so that the kernel's VMA at the destination says whether it did. A hole is
//! refilled with MAP_FIXED_NOREPLACE, and the rollback leaves it alone.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use crate::dmabuf::{DmaBuf, DmaBufs};
use crate::error::{Error, Operation};
use crate::headroom;
use crate::holes::{self, probe_clone};
use crate::options::{Access, MapOptions, Placement};
use crate::plan::{FdSource, Plan, Run};
use crate::regions::{RegionState, Regions};
use crate::reservation::Reservation;
use crate::strategy::{Clonability, Strategy, is_refusal, strategy};
use crate::sys;
use crate::udmabuf::{self, KernelBuiltError};
use crate::userfaultfd;
use crate::view::{MapStats, View};
use crate::vma;

/// What a run became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// Cloned from its source mapping (mremap).
    Cloned,
    /// Mapped from its registered fd (mmap).
    FdMapped,
    /// Mapped from its registered fd, and device memory (VM_PFNMAP/VM_IO: the kernel
    /// refused the clone of its region with EFAULT): it cannot be prefaulted.
    Device,
    /// Part of a dma-buf udmabuf built, mapped with it (pfn-mapped: it cannot be
    /// prefaulted either).
    KernelBuilt,
}

/// Builds the view `plan` (of `iovs`) describes.
pub(crate) fn build(plan: &Plan, iovs: &[libc::iovec], regions: &Regions, opts: MapOptions) -> Result<View, Error> {
    check_access(plan, opts)?;
    let resolved = userfaultfd::guard(iovs, opts.access() == Access::ReadWrite)?;
    let kernel = kernel_built_stretches(plan, regions, opts.placement())?;
    let runs = plan.runs.len();
    headroom::check(runs)?;
    let holes = holes::kernel_punches_holes();
    // A view of one run needs no reservation: its one placement goes where the kernel
    // chooses (and, having no destination of ours to lose, needs no probe on kernels that
    // punch holes). A hugetlb file's mapping is huge-aligned by the kernel itself.
    let anywhere = runs == 1 && kernel.is_empty();
    let reservation = if anywhere { Reservation::empty() } else { Reservation::new(plan.map_len, plan.align, holes)? };
    let mut placer = Placer {
        reservation,
        anywhere,
        regions,
        prot: opts.access().prot(),
        holes,
        probed: BTreeMap::new(),
        placed: Vec::with_capacity(runs),
        dmabufs: Vec::new(),
        stats: MapStats { segments: plan.segments, runs, monitor_resolved: resolved, ..MapStats::default() },
    };
    match placer.fill(plan, opts, &kernel) {
        Ok(()) => {
            let range = placer.reservation.into_raw();
            Ok(View::new(range, plan.lead, plan.len, placer.stats, opts.access(), placer.dmabufs))
        }
        Err(err) => {
            drop(placer);
            if err.errno() == Some(libc::ENOMEM) && matches!(err, Error::Os { .. }) {
                Err(headroom::explain_enomem(runs, err))
            } else {
                Err(err)
            }
        }
    }
}

/// The stretches of runs (index ranges, in view order) to give udmabuf, as the placement
/// policy says; for `KernelBuilt`, all of the plan, or the error naming the first run
/// udmabuf cannot take.
fn kernel_built_stretches(plan: &Plan, regions: &Regions, placement: Placement) -> Result<Vec<Range<usize>>, Error> {
    let spans = regions.spans();
    match placement {
        Placement::RemapOnly => Ok(Vec::new()),
        Placement::Automatic => Ok(udmabuf::automatic(plan, spans, sys::page_size())),
        Placement::KernelBuilt => {
            for run in &plan.runs {
                let why = match run.fd() {
                    None => Err(KernelBuiltError::NotRegistered),
                    Some(fd) => regions.state(fd.region).kernel_built,
                };
                if let Err(reason) = why {
                    return Err(Error::KernelBuilt { index: run.first(), reason });
                }
            }
            Ok(std::iter::once(0..plan.runs.len()).collect())
        }
    }
}

/// The dma-bufs of a whole list, with no CPU mapping: what `Remapper::dmabufs` returns.
/// Every run must be kernel-built (a sealed memfd: udmabuf), or lie in an area of a
/// registered vfio-pci region (exported by vfio-pci, `VFIO_DEVICE_FEATURE_DMA_BUF`);
/// since an importer may write a dma-buf, every source must be writable. Consecutive runs
/// of one kind (and, for BARs, of one region) share dma-bufs; the result is in list order.
pub(crate) fn dmabufs_of(plan: &Plan, iovs: &[libc::iovec], regions: &Regions) -> Result<DmaBufs, Error> {
    check_access(plan, MapOptions::new())?;
    // An importer may write a dma-buf.
    userfaultfd::guard(iovs, true)?;
    let mut memfd: Vec<Range<usize>> = Vec::new();
    let mut bars: Vec<Range<usize>> = Vec::new();
    for (i, run) in plan.runs.iter().enumerate() {
        let fd = run.fd().ok_or(Error::KernelBuilt { index: run.first(), reason: KernelBuiltError::NotRegistered })?;
        let state = regions.state(fd.region);
        let (stretches, continues) = match (&state.kernel_built, state.vfio) {
            (Ok(()), _) => (&mut memfd, true),
            (Err(_), Some(vfio)) => {
                // Same registration and region as the run before: one export.
                let same = |r: usize| {
                    let prev = plan.runs[r].fd().map(|f| f.region);
                    prev.is_some_and(|p| {
                        regions.spans()[p].id == regions.spans()[fd.region].id
                            && regions.state(p).vfio.map(|v| v.index) == Some(vfio.index)
                    })
                };
                let open = bars.last().is_some_and(|s| s.end == i && s.len() < VFIO_RANGES_PER_DMABUF && same(i - 1));
                (&mut bars, open)
            }
            (Err(reason), None) => return Err(Error::KernelBuilt { index: run.first(), reason: *reason }),
        };
        match stretches.last_mut() {
            Some(s) if s.end == i && continues => s.end = i + 1,
            _ => stretches.push(i..i + 1),
        }
    }
    let buffers = udmabuf::buffers(plan, &memfd, udmabuf::limits(), sys::page_size());
    let fds = if buffers.is_empty() { Ok(Vec::new()) } else { make_dmabufs(&buffers, regions, &mut 0) }.map_err(
        |e| match e {
            Ok(reason) => Error::KernelBuilt { index: plan.runs[memfd[0].start].first(), reason },
            Err(e) => e,
        },
    )?;
    let mut out: Vec<DmaBuf> =
        buffers.iter().zip(fds).map(|(b, fd)| DmaBuf { fd, offset: b.dst, len: b.len }).collect();
    for stretch in bars {
        out.push(export_bar_runs(plan, regions, stretch)?);
    }
    out.sort_by_key(|b| b.offset);
    Ok(DmaBufs { buffers: out, lead: plan.lead, len: plan.len })
}

/// Ranges per vfio-pci dma-buf export, as udmabuf's default list limit.
const VFIO_RANGES_PER_DMABUF: usize = 1024;

/// Exports a stretch of runs of one vfio-pci region as one dma-buf.
fn export_bar_runs(plan: &Plan, regions: &Regions, stretch: Range<usize>) -> Result<DmaBuf, Error> {
    let runs = &plan.runs[stretch];
    let first = runs[0].fd().expect("BAR runs have a registered fd");
    let state = regions.state(first.region);
    let vfio = state.vfio.expect("BAR runs lie in vfio regions");
    let ranges: Vec<(u64, u64)> = runs
        .iter()
        .map(|r| (r.fd().expect("BAR runs have a registered fd").offset - vfio.offset, r.len() as u64))
        .collect();
    let device = state.fd().expect("mappable areas have an fd");
    let fd = sys::vfio_dmabuf(device, vfio.index, &ranges).map_err(|source| match source.raw_os_error() {
        // No such feature (before 6.19), a device without peer-to-peer DMA, ranges refused.
        Some(errno @ (libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV)) => {
            Error::KernelBuilt { index: runs[0].first(), reason: KernelBuiltError::BarExportRefused { errno } }
        }
        _ => Error::Os { op: Operation::VfioDmabuf, index: Some(runs[0].first()), source },
    })?;
    Ok(DmaBuf { fd, offset: runs[0].dst(), len: runs.iter().map(|r| r.len()).sum() })
}

/// Makes the dma-bufs of `buffers` (nothing mapped): one `UDMABUF_CREATE_LIST` each. A
/// refusal the policy may fall back from is `Err(Ok(reason))`; anything else,
/// `Err(Err(error))`. Nothing is left open on either.
pub(crate) fn make_dmabufs(
    buffers: &[udmabuf::Buffer],
    regions: &Regions,
    syscalls: &mut usize,
) -> Result<Vec<OwnedFd>, Result<KernelBuiltError, Error>> {
    let dev = open_udmabuf()?;
    let mut made = Vec::with_capacity(buffers.len());
    let mut items = Vec::new();
    for b in buffers {
        items.clear();
        for item in &b.items {
            let fd = regions.state(item.region).fd().expect("kernel-built regions have an fd");
            items.push(sys::UdmabufItem {
                memfd: fd.as_raw_fd() as u32,
                pad: 0,
                offset: item.offset,
                size: item.size as u64,
            });
        }
        *syscalls += 1;
        match sys::udmabuf_create_list(dev.as_fd_ref(), &items) {
            Ok(fd) => made.push(fd),
            // Seals (EINVAL, EBADFD for a file udmabuf does not take), limits (E2BIG,
            // EINVAL), pinning (ENOMEM): the kernel will not build this one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EBADFD | libc::E2BIG | libc::ENOMEM)) => {
                return Err(Ok(KernelBuiltError::Refused { errno: e.raw_os_error().unwrap_or(libc::EINVAL) }));
            }
            Err(source) => {
                let index = None;
                return Err(Err(Error::Os { op: Operation::UdmabufCreate, index, source }));
            }
        }
    }
    Ok(made)
}

/// `/dev/udmabuf`, opened for one map call (a device found missing is remembered for
/// the process: it does not appear while a VMM runs).
struct Device(OwnedFd);

impl Device {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}

/// Whether `/dev/udmabuf` can be opened here (tries it: cheap, and remembered when it is
/// missing).
pub(crate) fn udmabuf_present() -> bool {
    open_udmabuf().is_ok()
}

fn open_udmabuf() -> Result<Device, Result<KernelBuiltError, Error>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static MISSING: AtomicBool = AtomicBool::new(false);
    if MISSING.load(Ordering::Relaxed) {
        return Err(Ok(KernelBuiltError::NoDevice));
    }
    match sys::open_udmabuf() {
        Ok(fd) => Ok(Device(fd)),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                MISSING.store(true, Ordering::Relaxed);
                Err(Ok(KernelBuiltError::NoDevice))
            }
            Some(errno @ (libc::EACCES | libc::EPERM)) => Err(Ok(KernelBuiltError::DeviceDenied { errno })),
            _ => Err(Err(Error::Os { op: Operation::UdmabufOpen, index: None, source: e })),
        },
    }
}

/// Refuses, before anything is mapped, a view that would allow more than a source
/// mapping allows (unless the caller asked for that with `raise_source_protection`).
fn check_access(plan: &Plan, opts: MapOptions) -> Result<(), Error> {
    let wanted = opts.access().prot();
    let beyond = |prot: i32| wanted & !prot & (libc::PROT_READ | libc::PROT_WRITE) != 0;
    if opts.raises_source_protection() || !beyond(plan.prot) {
        return Ok(());
    }
    let run = plan.runs.iter().find(|r| beyond(r.prot())).expect("plan.prot is the AND of the runs' protections");
    Err(Error::ExceedsSource { index: run.first(), prot: run.prot(), wanted })
}

/// The state of one map call.
struct Placer<'r> {
    /// The range the view is built in: reserved up front, or, for a one-run view
    /// (`anywhere`), the run's own mapping once placed.
    reservation: Reservation,
    /// Whether the one run is placed where the kernel chooses, with no reservation.
    anywhere: bool,
    regions: &'r Regions,
    prot: i32,
    /// Whether this kernel punches a hole at the destination of a refused clone.
    holes: bool,
    /// On such kernels: what a probe of each source VMA (by the plan's VMA index) learned.
    probed: BTreeMap<usize, Clonability>,
    /// What each run became, in plan order.
    placed: Vec<Placed>,
    /// The dma-bufs of the kernel-built runs, mapped in the reservation.
    dmabufs: Vec<DmaBuf>,
    stats: MapStats,
}

impl Placer<'_> {
    /// Places every run, then checks clones, fixes protection and prefaults.
    fn fill(&mut self, plan: &Plan, opts: MapOptions, kernel: &[Range<usize>]) -> Result<(), Error> {
        let mut by_kernel = vec![false; if kernel.is_empty() { 0 } else { plan.runs.len() }];
        if !kernel.is_empty() {
            match self.kernel_build(plan, kernel) {
                Ok(()) => kernel.iter().flat_map(Range::clone).for_each(|i| by_kernel[i] = true),
                Err(Ok(reason)) => {
                    let needed = kernel
                        .iter()
                        .flat_map(|r| &plan.runs[r.clone()])
                        .find(|r| udmabuf::needed(r, self.regions.spans()));
                    match (opts.placement(), needed) {
                        (Placement::Automatic, None) => {
                            log::debug!("iovmap: udmabuf declined ({reason}); placing those runs by clone or fd");
                            self.stats.kernel_built_declined = Some(reason);
                        }
                        (_, needed) => {
                            let index = needed.map_or_else(|| plan.runs[kernel[0].start].first(), Run::first);
                            return Err(Error::KernelBuilt { index, reason });
                        }
                    }
                }
                Err(Err(e)) => return Err(e),
            }
        }
        for (i, run) in plan.runs.iter().enumerate() {
            let placed = if by_kernel.get(i) == Some(&true) { Placed::KernelBuilt } else { self.place(run)? };
            self.placed.push(placed);
        }
        self.check_clones(plan)?;
        let base = self.reservation.whole();
        if plan.runs.iter().zip(&self.placed).any(|(run, p)| *p == Placed::Cloned && run.prot() != self.prot) {
            protect(base, self.reservation.len(), plan, self.prot)?;
        }
        if opts.populates() {
            // A run placed from its fd before a clone of its region was refused (a run
            // across VMAs that came first) is device memory all the same.
            for (run, placed) in plan.runs.iter().zip(self.placed.iter_mut()) {
                if let (Placed::FdMapped, Some(fd)) = (*placed, run.fd()) {
                    if is_device(self.regions.state(fd.region)) {
                        *placed = Placed::Device;
                    }
                }
            }
            self.populate(plan)?;
        }
        Ok(())
    }

    /// Builds the dma-bufs of the `kernel` stretches and maps each into the reservation.
    fn kernel_build(&mut self, plan: &Plan, kernel: &[Range<usize>]) -> Result<(), Result<KernelBuiltError, Error>> {
        let buffers = udmabuf::buffers(plan, kernel, udmabuf::limits(), sys::page_size());
        let fds = make_dmabufs(&buffers, self.regions, &mut self.stats.syscalls)?;
        let index = Some(plan.runs[kernel[0].start].first());
        for (b, fd) in buffers.iter().zip(fds) {
            let dst = self.reservation.slot(b.dst, b.len).ok_or(Err(Error::TooLarge))?;
            self.stats.syscalls += 1;
            // SAFETY: `dst` comes from `Reservation::slot`, which checked that
            // `[dst, dst + b.len)` lies in the reservation, which the map path owns until it
            // becomes a view.
            unsafe { sys::map_dmabuf_fixed(dst, b.len, self.prot, std::os::fd::AsFd::as_fd(&fd)) }
                .map_err(|source| Err(Error::Os { op: Operation::DmabufMap, index, source }))?;
            self.dmabufs.push(DmaBuf { fd, offset: b.dst, len: b.len });
        }
        self.stats.dmabufs = buffers.len();
        self.stats.kernel_built = kernel.iter().map(ExactSizeIterator::len).sum();
        Ok(())
    }

    /// What is known about cloning the run's source: learned by its region (across
    /// calls) or by this call's probe of its VMA.
    fn known(&self, run: &Run, region: Option<&RegionState>) -> Clonability {
        match region.map(RegionState::clonability) {
            Some(known @ (Clonability::Clones | Clonability::Refused(_))) => known,
            _ => self.probed.get(&run.vma()).copied().unwrap_or(Clonability::Unknown),
        }
    }

    /// Places one run: asks [`strategy`] what to do, does it, and asks again with what the
    /// kernel answered, until the run is placed or nothing can place it. Every path ends
    /// within three steps: a probe or a clone only ever turns `Unknown` into something
    /// known, and nothing known leads back to a probe.
    fn place(&mut self, run: &Run) -> Result<Placed, Error> {
        // The plan lays every run out inside `map_len`, the reservation's length; `slot`
        // checks it again here, in every build, for the SAFETY arguments below. `None`:
        // where the kernel chooses (a one-run view).
        let dst = if self.anywhere {
            None
        } else {
            Some(self.reservation.slot(run.dst(), run.len()).ok_or(Error::TooLarge)?)
        };
        let fd = run.fd().map(|fd| (fd, self.regions.state(fd.region)));
        let region = fd.map(|(_, state)| state);
        let mut known = self.known(run, region);
        // A refusal can punch a hole only into a destination of ours.
        let holes = self.holes && dst.is_some();
        loop {
            match strategy(run, known, holes) {
                Strategy::Probe => known = self.probe(run, region)?,
                Strategy::Clone => match self.clone_into(run, dst, region, known)? {
                    None => return Ok(Placed::Cloned),
                    Some(refused) => known = refused,
                },
                Strategy::Fd => {
                    let (fd, state) = fd.expect("strategy chooses Fd only for a run with a registered fd");
                    let region_fd = state.fd().expect("a mappable region has an fd");
                    self.map_fd(run, dst, fd, region_fd)?;
                    return Ok(if is_device(state) { Placed::Device } else { Placed::FdMapped });
                }
                Strategy::Fail => return Err(no_fallback(run, known)),
            }
        }
    }

    /// Maps the registered fd at `dst` (`None`: where the kernel chooses).
    fn map_fd(
        &mut self,
        run: &Run,
        dst: Option<NonNull<u8>>,
        fd: FdSource,
        region_fd: BorrowedFd<'_>,
    ) -> Result<(), Error> {
        self.stats.syscalls += 1;
        let Some(dst) = dst else {
            let at = sys::map_shared(run.len(), self.prot, region_fd, fd.offset)
                .map_err(|e| self.fd_error(run, e, false))?;
            self.reservation = Reservation::adopt(at, run.len());
            self.stats.fd_mapped += 1;
            return Ok(());
        };
        let hole = self.reservation.is_hole(dst);
        let placed = if hole {
            // The kernel may have unmapped `dst` and another thread may have mapped
            // something there since: map only if the range is still free.
            sys::map_fd_noreplace(dst, run.len(), self.prot, region_fd, fd.offset)
        } else {
            // SAFETY: `dst` comes from `Reservation::slot`, which checked that
            // `[dst, dst + run.len())` lies in the reservation; the map path owns it until
            // it becomes a view, and it is not a hole another thread may have taken.
            unsafe { sys::map_fd_fixed(dst, run.len(), self.prot, region_fd, fd.offset) }
        };
        placed.map_err(|e| self.fd_error(run, e, hole))?;
        if hole {
            self.reservation.fill_hole(dst);
        }
        self.stats.fd_mapped += 1;
        Ok(())
    }

    /// The error for an fd mapping the kernel refused (`hole`: into a refused clone's hole).
    fn fd_error(&self, run: &Run, e: io::Error, hole: bool) -> Error {
        match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) if self.prot & libc::PROT_WRITE != 0 => {
                Error::NotWritable { index: run.first() }
            }
            Some(libc::ENOMEM) => Error::Os { op: Operation::FdMap, index: Some(run.first()), source: e },
            Some(libc::EEXIST) if hole => Error::Os { op: Operation::RefillHole, index: Some(run.first()), source: e },
            _ => Error::NoFallback { index: run.first(), source: e },
        }
    }

    /// Clones `run` into `dst`. `Ok(None)`: placed. `Ok(Some(refused))`: the kernel
    /// refused, and the run may still be placed from an fd.
    fn clone_into(
        &mut self,
        run: &Run,
        dst: Option<NonNull<u8>>,
        region: Option<&RegionState>,
        known: Clonability,
    ) -> Result<Option<Clonability>, Error> {
        self.stats.syscalls += 1;
        let cloned = match dst {
            // SAFETY: `dst` comes from `Reservation::slot`, which checked that
            // `[dst, dst + run.len())` lies in the reservation, which the map path owns
            // until it becomes a view.
            Some(dst) => unsafe { sys::clone_fixed(run.src(), run.len(), dst) },
            None => sys::clone_anywhere(run.src(), run.len(), Operation::Clone)
                .map(|at| self.reservation = Reservation::adopt(at, run.len())),
        };
        let e = match cloned {
            Ok(()) => {
                self.stats.cloned += 1;
                if let Some(r) = region.filter(|_| known == Clonability::Unknown) {
                    r.learn(Clonability::Clones);
                }
                return Ok(None);
            }
            Err(e) => e,
        };
        if !is_refusal(e.raw_os_error()) {
            // ENOMEM (the VMA cap) and the like come before the unmap on every kernel: the
            // destination is still ours.
            return Err(Error::Os { op: Operation::Clone, index: Some(run.first()), source: e });
        }
        if let (true, Some(dst)) = (self.holes, dst) {
            // Known to clone, yet refused: the source changed under us. On this kernel the
            // destination may be gone (refused for its kind) or not (refused because
            // nothing was mapped there), and if gone, may be someone else's by now. Until
            // the kernel says, it is a hole; if the lookup fails, it stays one (better a
            // PROT_NONE range left behind than another thread's mapping unmapped).
            self.reservation.mark_hole(dst, run.len());
            let ours = self.reservation.still_holds(dst).map_err(|source| Error::Os {
                op: Operation::VmaQuery,
                index: Some(run.first()),
                source,
            })?;
            if ours {
                self.reservation.fill_hole(dst);
            }
        }
        log::debug!("iovmap: clone of {:#x}+{:#x} refused ({e}); using the registered fd", run.src(), run.len());
        let refused = Clonability::Refused(e.raw_os_error().unwrap_or(libc::EINVAL));
        if let Some(r) = region {
            r.learn(refused);
        }
        Ok(Some(refused))
    }

    /// On kernels that punch holes: whether the run's source VMA clones, learned once per
    /// call by a clone to an address the kernel chooses, never into the reservation.
    fn probe(&mut self, run: &Run, region: Option<&RegionState>) -> Result<Clonability, Error> {
        if let Some(known) = self.probed.get(&run.vma()) {
            return Ok(*known);
        }
        self.stats.syscalls += 1;
        let known = probe_clone(run.src(), run.page_size()).map_err(|source| Error::Os {
            op: Operation::CloneProbe,
            index: Some(run.first()),
            source,
        })?;
        self.probed.insert(run.vma(), known);
        if let Some(r) = region {
            r.learn(known);
        }
        Ok(known)
    }

    /// Checks that every clone of more than one page maps the file and offset the plan saw
    /// at its source (one VMA query each, answered by the kernel: nothing cached).
    ///
    /// A clone copies `len` bytes of whatever mapping is at its source when it runs; if
    /// another thread had mapped something shorter there, the clone went on into that
    /// mapping's file: pages never mapped at the address, or past the file's end. The
    /// clone's own VMA records which file and offset it maps, whatever happened to the
    /// source since, so this catches it even if the source was put back before the check.
    /// A clone of one page cannot run past its source: every VMA holds whole pages.
    fn check_clones(&self, plan: &Plan) -> Result<(), Error> {
        let page = sys::page_size();
        let checked: Vec<&Run> = plan
            .runs
            .iter()
            .zip(&self.placed)
            .filter(|(run, p)| **p == Placed::Cloned && run.len() > page)
            .map(|(run, _)| run)
            .collect();
        if checked.is_empty() {
            return Ok(());
        }
        let base = self.reservation.whole().as_ptr() as usize;
        let dsts: Vec<usize> = checked.iter().map(|r| base + r.dst()).collect();
        let index = Some(checked[0].first());
        let seen = vma::vmas_now(&dsts).map_err(|source| Error::Os { op: Operation::VmaQuery, index, source })?;
        for ((run, &dst), seen) in checked.iter().zip(&dsts).zip(seen) {
            let planned = plan.vmas[run.vma()];
            let want = planned.offset + (run.src() - planned.start) as u64;
            let same = seen.is_some_and(|v| v.file == planned.file && v.offset + (dst - v.start) as u64 == want);
            if !same {
                log::debug!("iovmap: the clone of {:#x}+{:#x} maps {seen:?}, not {planned:?}", run.src(), run.len());
                return Err(Error::SourceChanged { index: run.first() });
            }
        }
        Ok(())
    }

    /// Prefaults the runs that are not device memory or kernel-built (the kernel refuses
    /// to prefault pfn mappings), one madvise per stretch of adjacent such runs. When a
    /// stretch fails, its runs are prefaulted one by one to name the first that fails.
    fn populate(&self, plan: &Plan) -> Result<(), Error> {
        let write = self.prot & libc::PROT_WRITE != 0;
        let one = |runs: &[Run]| -> Result<(), std::io::Error> {
            let (start, end) = (runs[0].dst(), runs[runs.len() - 1].dst() + runs[runs.len() - 1].len());
            let at = self.reservation.slot(start, end - start).ok_or(std::io::ErrorKind::InvalidInput)?;
            sys::populate(at, end - start, write)
        };
        let flush = |runs: &[Run]| -> Result<(), Error> {
            let Err(first) = (if runs.is_empty() { Ok(()) } else { one(runs) }) else { return Ok(()) };
            let culprit =
                (runs.len() > 1).then(|| runs.iter().find_map(|r| one(std::slice::from_ref(r)).err().map(|e| (r, e))));
            let (run, source) = culprit.flatten().unwrap_or((&runs[0], first));
            Err(Error::Os { op: Operation::Populate, index: Some(run.first()), source })
        };
        let mut from = 0; // first run of the open stretch
        for (i, (run, placed)) in plan.runs.iter().zip(&self.placed).enumerate() {
            let prefaults = !matches!(placed, Placed::Device | Placed::KernelBuilt);
            let continues = i > from && plan.runs[i - 1].dst() + plan.runs[i - 1].len() == run.dst();
            if !prefaults || !continues {
                flush(&plan.runs[from..i])?;
                from = if prefaults { i } else { i + 1 };
            }
        }
        flush(&plan.runs[from..])
    }
}

/// Whether a region is device memory (VM_PFNMAP/VM_IO), which cannot be prefaulted: the
/// kernel refused to clone it with EFAULT, its answer for such mappings.
fn is_device(region: &RegionState) -> bool {
    region.clonability() == Clonability::Refused(libc::EFAULT)
}

/// The error for a run nothing can place, given what the kernel said about its clone.
fn no_fallback(run: &Run, known: Clonability) -> Error {
    match known {
        Clonability::Refused(libc::EPERM) => Error::Sealed { index: run.first() },
        Clonability::Refused(errno) => {
            Error::NoFallback { index: run.first(), source: io::Error::from_raw_os_error(errno) }
        }
        // Not clonable (it crosses VMAs) and not registered: the planner refuses those,
        // so this is only reached through an inconsistent table.
        _ => Error::NoFallback { index: run.first(), source: io::Error::from_raw_os_error(libc::EINVAL) },
    }
}

/// Gives the whole view the protection asked for. A clone inherits its source's
/// protection; raising it to writable fails (EACCES) where the file was opened read-only
/// or is write-sealed, and then the run at fault is named.
fn protect(base: NonNull<u8>, len: usize, plan: &Plan, prot: i32) -> Result<(), Error> {
    // SAFETY: the range is the whole reservation being filled, owned by the map path.
    let Err(err) = (unsafe { sys::protect(base, len, prot) }) else { return Ok(()) };
    // Find the run that refuses, to name its segment.
    for run in &plan.runs {
        // The plan lays runs out inside the reservation (`len` is its length).
        if run.dst() + run.len() > len {
            continue;
        }
        // SAFETY: one run of the same reservation: `[dst, dst + len)` lies in it (checked
        // just above), owned by the map path.
        if let Err(e) = unsafe { sys::protect(base.add(run.dst()), run.len(), prot) } {
            return Err(match e.raw_os_error() {
                Some(libc::EACCES) if prot & libc::PROT_WRITE != 0 => Error::NotWritable { index: run.first() },
                _ => Error::Os { op: Operation::Protect, index: Some(run.first()), source: e },
            });
        }
    }
    Err(Error::Os { op: Operation::Protect, index: None, source: err })
}
