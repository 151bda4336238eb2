//! NCCL all-reduce between GPU ranks, through `cudarc::nccl` (feature `cuda`).
//!
//! Rendezvous: rank 0 makes an [`NcclId`] ([`NcclId::new`]), whose 128 bytes
//! ([`NcclId::to_bytes`]) reach every other rank through the coordinator (rank 0's worker
//! reports them as `NcclUniqueId`, the coordinator relays them to the other ranks' workers as
//! `Rendezvous`, see `agent.rs`); each rank then calls [`NcclCollective::new`] (or
//! [`NcclCollective::from_id_bytes`]) with its rank, the world size and the id. That call
//! returns once all `world` ranks have joined.
//!
//! Stopping: the communicator is non-blocking (`blocking = 0` in its `ncclConfig_t`), so no
//! NCCL call holds the rank's thread; joining and every enqueue are polled
//! ([`poll_until`]) with the rank's stop flag in view. A watchdog thread looks at the stop
//! flag and at NCCL's asynchronous error state every [`WATCH_EVERY`]; on either it aborts the
//! communicator (`ncclCommAbort`), which also ends collective kernels that wait for a peer
//! that will never come, so a rank stuck in a stream synchronisation behind them is
//! released. A cancelled job's GPU ranks therefore stop within a fraction of a second even
//! when a peer died mid-collective, and the next NCCL call of an aborted communicator is an
//! error naming why it was aborted.
//!
//! The collective runs on the backend's stream, so it is ordered after the backward kernels
//! that wrote the gradients and before the optimizer kernels that read them, without a host
//! synchronisation. NCCL's ring all-reduce leaves every rank with the same bits.
//!
//! libnccl is loaded at run time; cudarc panics when it is missing, so its presence is
//! checked first and a missing library is one clear error.

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys};
use ferrite_kernels::cuda::CudaBackend;

use super::rendezvous::{poll_until, Progress};
use super::Collective;
use crate::WorkerError;

/// How often the watchdog looks at the stop flag and the communicator's error state.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long joining, or the enqueue of one collective (which may set up connections), may
/// take.
pub const NCCL_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a rank polls an NCCL operation in progress.
const POLL_EVERY: Duration = Duration::from_millis(1);

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`), as the wire carries it.
pub const NCCL_ID_BYTES: usize = ferrite_proto::v1::NCCL_UNIQUE_ID_BYTES;

fn nccl_err(what: &str, e: result::NcclError) -> WorkerError {
    WorkerError::Collective(format!("NCCL: {what}: {}", describe(e.0, None)))
}

/// An NCCL result code as words: its name, NCCL's text for it, and the communicator's last
/// error message when there is one.
fn describe(code: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: both return pointers to static or communicator-owned NUL-terminated strings
    // (or null), read before any other NCCL call on this thread.
    let text = |p: *const c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let mut out = format!("{code:?}");
    if let Some(t) = text(unsafe { sys::ncclGetErrorString(code) }) {
        out.push_str(&format!(" ({t})"));
    }
    if let Some(last) = comm.and_then(|c| text(unsafe { sys::ncclGetLastError(c) })) {
        if !last.is_empty() {
            out.push_str(&format!(": {last}"));
        }
    }
    out
}

/// Whether libnccl can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn require_nccl() -> Result<(), WorkerError> {
    if nccl_available() {
        Ok(())
    } else {
        Err(WorkerError::Collective(
            "the NCCL library was not found: cudarc loads libnccl.so, while NCCL installs \
             libnccl.so.2 (link libnccl.so to it in a folder on LD_LIBRARY_PATH; \
             scripts/gpu-check.sh does)"
                .into(),
        ))
    }
}

/// The rendezvous token of one NCCL communicator, made by rank 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}…)", &self.0[..8])
    }
}

impl NcclId {
    /// A fresh id (rank 0 only): NCCL's bootstrap listens on this host and writes its
    /// address into the id.
    pub fn new() -> Result<Self, WorkerError> {
        require_nccl()?;
        let id = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// The id as bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The id from the bytes rank 0 sent; exactly [`NCCL_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WorkerError> {
        let arr: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            WorkerError::Collective(format!(
                "an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(NcclId(arr))
    }

    fn to_nccl(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: self.0.map(|b| b as c_char) }
    }
}

/// A non-blocking communicator's config: everything NCCL's initializer leaves undefined, but
/// `blocking = 0`. NCCL reads `size` bytes of it (at most its own struct's), checks `magic`,
/// and takes the fields of the header version the bindings were made from.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 30, 0): the header cudarc's `nccl` feature binds.
        version: 2 * 10_000 + 30 * 100,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The communicator handle, or why it was aborted. Every NCCL call on the handle holds the
/// lock, so the watchdog never aborts it under a call in flight and nothing touches it after.
enum State {
    Live(sys::ncclComm_t),
    Aborted(String),
}

struct Shared {
    state: Mutex<State>,
}

// SAFETY: the raw handle is only used under the mutex, one NCCL call at a time; NCCL lets a
// communicator be used from any thread.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Runs `f` on the live handle, or fails with why it was aborted.
    fn with_live<T>(&self, f: impl FnOnce(sys::ncclComm_t) -> T) -> Result<T, WorkerError> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Live(comm) => Ok(f(*comm)),
            State::Aborted(why) => Err(WorkerError::Collective(format!("NCCL: {why}"))),
        }
    }

    /// The state of the communicator's operations in flight (`ncclCommGetAsyncError`); an
    /// error aborts the communicator.
    fn progress(&self, what: &str) -> Result<Progress, WorkerError> {
        let seen = self.with_live(|comm| {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live handle, under the lock.
            let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            let code = if r == sys::ncclResult_t::ncclSuccess { state } else { r };
            match code {
                sys::ncclResult_t::ncclSuccess => Ok(Progress::Done),
                sys::ncclResult_t::ncclInProgress => Ok(Progress::Pending),
                _ => Err(describe(code, Some(comm))),
            }
        })?;
        seen.map_err(|why| self.fail(what, &why))
    }

    /// Aborts the communicator because `what` failed with `why`; the error to return.
    fn fail(&self, what: &str, why: &str) -> WorkerError {
        let why = format!("{what}: {why}");
        self.abort(&why);
        WorkerError::Collective(format!("NCCL: {why}"))
    }

    /// Aborts the communicator (once) and remembers why.
    fn abort(&self, why: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Live(comm) = *state {
            // SAFETY: a live handle, under the lock; it is never used again.
            let r = unsafe { sys::ncclCommAbort(comm) };
            if r != sys::ncclResult_t::ncclSuccess {
                tracing::warn!(code = ?r, "ncclCommAbort failed");
            }
            *state = State::Aborted(format!("the communicator was aborted: {why}"));
        }
    }

    /// Enqueues with `call` on the live handle, then polls until NCCL has taken it.
    fn enqueue(
        &self,
        what: &str,
        stop: &AtomicBool,
        call: impl FnOnce(sys::ncclComm_t) -> sys::ncclResult_t,
    ) -> Result<(), WorkerError> {
        let r = self.with_live(|comm| {
            let r = call(comm);
            match r {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
                _ => Err(describe(r, Some(comm))),
            }
        })?;
        r.map_err(|why| self.fail(what, &why))?;
        self.wait(what, stop)
    }

    /// In-place average over ranks of `len` elements of `ty` at `ptr`, on `stream`.
    fn all_reduce_avg(
        &self,
        what: &str,
        stop: &AtomicBool,
        stream: &CudaStream,
        ptr: cudarc::driver::sys::CUdeviceptr,
        len: usize,
        ty: sys::ncclDataType_t,
    ) -> Result<(), WorkerError> {
        let stream = stream.cu_stream() as sys::cudaStream_t;
        let p = ptr as *mut std::ffi::c_void;
        self.enqueue(what, stop, |comm| {
            // SAFETY: `len` elements of `ty` at `p` on this communicator's device, ordered on
            // `stream` after their writers by the caller's `device_ptr_mut`.
            unsafe { sys::ncclAllReduce(p, p, len, ty, sys::ncclRedOp_t::ncclAvg, comm, stream) }
        })
    }

    /// Polls the communicator until its operations in flight are taken, aborting it on a
    /// stop, a timeout or an error.
    fn wait(&self, what: &str, stop: &AtomicBool) -> Result<(), WorkerError> {
        poll_until(what, stop, NCCL_TIMEOUT, POLL_EVERY, || self.progress(what)).inspect_err(|e| {
            self.abort(&format!("{what}: {e}"));
        })
    }
}

/// Aborts the communicator when the rank is stopped or NCCL reports an asynchronous error
/// (a peer gone, a network failure), until told to quit.
struct Watchdog {
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(shared: Arc<Shared>, stop: Arc<AtomicBool>, rank: usize) -> Result<Self, WorkerError> {
        let quit = Arc::new(AtomicBool::new(false));
        let q = quit.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nccl-watch-{rank}"))
            .spawn(move || {
                while !q.load(Ordering::Relaxed) {
                    if stop.load(Ordering::Relaxed) {
                        shared.abort("the rank was stopped");
                        return;
                    }
                    if let Err(e) = shared.progress("asynchronous error") {
                        tracing::warn!(rank, error = %e, "NCCL communicator aborted");
                        return;
                    }
                    std::thread::sleep(WATCH_EVERY);
                }
            })
            .map_err(WorkerError::io("starting the NCCL watchdog"))?;
        Ok(Watchdog { quit, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One rank of an NCCL communicator on a [`CudaBackend`]'s device and stream.
pub struct NcclCollective {
    shared: Arc<Shared>,
    stream: Arc<CudaStream>,
    stop: Arc<AtomicBool>,
    rank: usize,
    world: usize,
    /// One f64 on the device, for [`Collective::mean_scalar`].
    scalar: CudaSlice<f64>,
    /// Taken (stopped) on drop before the communicator is closed.
    watchdog: Option<Watchdog>,
}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world` on `be`'s device; returns once every
    /// rank has joined, or with [`WorkerError::Stopped`] once `stop` is set, or an error after
    /// [`NCCL_TIMEOUT`]. While the collective lives, setting `stop` aborts it.
    pub fn new(
        be: &CudaBackend,
        rank: usize,
        world: usize,
        id: &NcclId,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, WorkerError> {
        if world == 0 || rank >= world {
            return Err(WorkerError::Collective(format!("rank {rank} of a world of {world}")));
        }
        require_nccl()?;
        // NCCL picks the device from the calling thread's current context.
        be.context().bind_to_thread().map_err(|e| {
            WorkerError::Collective(format!("binding the CUDA context for NCCL: {e:?}"))
        })?;
        let scalar = be
            .stream()
            .alloc_zeros::<f64>(1)
            .map_err(|e| WorkerError::Collective(format!("allocating NCCL scratch: {e:?}")))?;
        let what = format!("joining as rank {rank} of {world}");
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; rank < world, both small.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                world as c_int,
                id.to_nccl(),
                rank as c_int,
                &mut config,
            )
        };
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            if !comm.is_null() {
                // SAFETY: the handle NCCL returned, never used again.
                unsafe { sys::ncclCommAbort(comm) };
            }
            return Err(WorkerError::Collective(format!("NCCL: {what}: {}", describe(r, None))));
        }
        let shared = Arc::new(Shared { state: Mutex::new(State::Live(comm)) });
        shared.wait(&what, &stop)?;
        let watchdog = Watchdog::start(shared.clone(), stop.clone(), rank)
            .inspect_err(|_| shared.abort("no watchdog thread"))?;
        Ok(NcclCollective {
            shared,
            stream: be.stream().clone(),
            stop,
            rank,
            world,
            scalar,
            watchdog: Some(watchdog),
        })
    }

    /// [`NcclCollective::new`] from the id bytes rank 0 sent.
    pub fn from_id_bytes(
        be: &CudaBackend,
        rank: usize,
        world: usize,
        id: &[u8],
        stop: Arc<AtomicBool>,
    ) -> Result<Self, WorkerError> {
        Self::new(be, rank, world, &NcclId::from_bytes(id)?, stop)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        self.shared.abort("closed");
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(
        &mut self,
        be: &CudaBackend,
        buf: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<(), WorkerError> {
        if len > buf.len() {
            return Err(WorkerError::Collective(format!(
                "all-reduce of {len} floats from a buffer of {}",
                buf.len()
            )));
        }
        be.check()?;
        be.context()
            .bind_to_thread()
            .map_err(|e| WorkerError::Collective(format!("binding the CUDA context: {e:?}")))?;
        let mut view = buf.slice_mut(..len);
        let (ptr, _record) = view.device_ptr_mut(&self.stream);
        let f32 = sys::ncclDataType_t::ncclFloat32;
        self.shared.all_reduce_avg("all-reduce", &self.stop, &self.stream, ptr, len, f32)
    }

    fn mean_scalar(&mut self, x: f64) -> Result<f64, WorkerError> {
        let stream = self.stream.clone();
        let err = |what: &str, e: cudarc::driver::DriverError| {
            WorkerError::Collective(format!("NCCL scalar {what}: {e:?}"))
        };
        stream.memcpy_htod(&[x], &mut self.scalar).map_err(|e| err("upload", e))?;
        {
            let (ptr, _record) = self.scalar.device_ptr_mut(&stream);
            let (what, f64) = ("all-reduce of a scalar", sys::ncclDataType_t::ncclFloat64);
            self.shared.all_reduce_avg(what, &self.stop, &stream, ptr, 1, f64)?;
        }
        let mut out = [0.0f64];
        stream.memcpy_dtoh(&self.scalar, &mut out).map_err(|e| err("download", e))?;
        let synced = stream.synchronize();
        // An abort while this rank waited (stopped, or a peer gone) leaves the kernels cut
        // short: what they left is not a mean.
        self.shared.with_live(|_| ())?;
        synced.map_err(|e| err("synchronize", e))?;
        Ok(out[0])
    }
}
