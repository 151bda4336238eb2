//! [`CudaBackend`]: one device, one stream, buffers, views, copies, and launching the NVRTC
//! kernels. The ops themselves are in `ops.rs`; the matmuls in `blas.rs`.
//!
//! Every op runs on one non-blocking stream, in call order, so no event tracking is needed:
//! cudarc's per-buffer events are switched off before the first allocation. Views are raw
//! device pointers with a borrow of their buffer, so they are `Copy` like `&[f32]`.
//!
//! The [`Backend`](crate::Backend) ops cannot return errors. A failed launch (or a kernel
//! module that does not compile) is recorded as the backend's first error, which every later
//! fallible call (`alloc`, `upload`, `download`) returns: the model downloads the losses after
//! every forward, so an error surfaces within one step. An asynchronous fault inside a kernel
//! surfaces at the same place, from the synchronising copy.

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, sys, CudaContext, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;

use super::nvrtc;
use super::sources::{KernelSource, KERNELS};
use crate::{KernelError, Result};

/// One CUDA device with its stream, cuBLAS handle and compiled kernel modules.
pub struct CudaBackend {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    ordinal: usize,
    device_name: String,
    /// NVRTC's `--gpu-architecture` for this device, e.g. `compute_90`.
    arch: &'static str,
    /// One slot per entry of [`KERNELS`], compiled and loaded on first use.
    modules: Vec<OnceLock<std::result::Result<Module, String>>>,
    /// Reused device scratch (encoder buckets, norm partials): nothing is allocated per step.
    pub(super) scratch: Mutex<Scratch>,
    /// Blocks used by the first pass of `sum_squares` (2 per SM), fixed for determinism.
    pub(super) norm_blocks: u32,
    /// The first error of an op that could not report it.
    error: Mutex<Option<String>>,
}

/// A compiled `.cu` file and the functions it defines.
struct Module {
    _module: Arc<CudaModule>,
    funcs: Vec<(&'static str, Func)>,
}

/// A kernel handle; valid while its module (kept in [`CudaBackend::modules`]) is loaded.
#[derive(Clone, Copy)]
pub(super) struct Func(sys::CUfunction);
// SAFETY: a CUfunction is an immutable handle that the driver allows on any thread.
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

/// Device scratch that grows on demand and is then reused.
pub(super) struct Scratch {
    /// Positions bucketed by token, and bucket starts, for the embedding backward.
    pub order: Option<CudaSlice<i32>>,
    pub starts: Option<CudaSlice<i32>>,
    /// Host side of the same, kept to avoid allocating per step.
    pub host_order: Vec<i32>,
    pub host_starts: Vec<i32>,
    /// Per-block partial sums (f64) of `sum_squares`, then the total in the last slot.
    pub norm: CudaSlice<f64>,
}

/// An owned device buffer of `i32` (tokens, targets), with the host copy it was uploaded
/// from: the embedding backward buckets positions by token on the host.
pub struct CudaIBuf {
    pub(super) dev: CudaSlice<i32>,
    pub(super) host: Vec<i32>,
}

/// A read-only range of a device buffer.
#[derive(Clone, Copy)]
pub struct CudaView<'a> {
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) len: usize,
    _buf: PhantomData<&'a CudaSlice<f32>>,
}

/// A writable range of a device buffer.
pub struct CudaViewMut<'a> {
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) len: usize,
    _buf: PhantomData<&'a mut CudaSlice<f32>>,
}

impl CudaView<'_> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaViewMut<'_> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A kernel parameter: a pointer to the value, as `cuLaunchKernel` takes them. The value must
/// outlive the launch call (temporaries in the call's argument list do).
#[inline(always)]
pub(super) fn p<T>(x: &T) -> *mut c_void {
    x as *const T as *mut c_void
}

fn driver_msg(e: &result::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{} ({:?})", s.to_string_lossy(), e.0),
        Err(_) => format!("{:?}", e.0),
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`: checks that the driver, NVRTC and cuBLAS libraries can be
    /// loaded (cudarc panics on a missing one), creates a context, a stream and a cuBLAS handle.
    /// Kernels are compiled later, each module on first use. `FERRITE_CUDA_TF32=1` in the
    /// environment turns on [`CudaBackend::set_tf32`] (faster matmuls, not bit-for-bit f32).
    pub fn new(ordinal: usize) -> Result<Self> {
        let device_name = super::driver::device_name(ordinal)?;
        if !nvrtc::available() {
            return Err(nvrtc::NvrtcError::Missing.into());
        }
        // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::NoCuda(format!(
                "cuda:{ordinal} ({device_name}) found, but the cuBLAS library (libcublas) was \
                 not; put the CUDA toolkit's lib64 on LD_LIBRARY_PATH"
            )));
        }
        let cuda = |what: &str, e: result::DriverError| {
            KernelError::NoCuda(format!("cuda:{ordinal}: {what}: {}", driver_msg(&e)))
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda("creating a context", e))?;
        // SAFETY: every buffer of this backend is used on its one stream only, in call order;
        // no buffer exists yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::NoCuda(format!("cuda:{ordinal}: starting cuBLAS: {e:?}")))?;
        let (major, minor) =
            ctx.compute_capability().map_err(|e| cuda("reading the compute capability", e))?;
        // NVRTC takes a &'static str; one small string per backend.
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda("reading the SM count", e))?;
        let norm_blocks = (2 * sms.max(1)) as u32;
        // SAFETY: written by the kernels before it is read.
        let norm = unsafe { stream.alloc::<f64>(norm_blocks as usize + 1) }
            .map_err(|e| cuda("allocating scratch", e))?;
        let be = CudaBackend {
            ctx,
            stream,
            blas,
            ordinal,
            device_name,
            arch,
            modules: KERNELS.iter().map(|_| OnceLock::new()).collect(),
            scratch: Mutex::new(Scratch {
                order: None,
                starts: None,
                host_order: Vec::new(),
                host_starts: Vec::new(),
                norm,
            }),
            norm_blocks,
            error: Mutex::new(None),
        };
        if std::env::var("FERRITE_CUDA_TF32").is_ok_and(|v| v == "1") {
            be.set_tf32(true)?;
        }
        Ok(be)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// NVRTC's architecture for this device (`compute_90` on an H100/H200).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The cudarc stream every op runs on (for the NCCL collective).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Lets cuBLAS use TF32 tensor cores for the f32 matmuls (10-bit mantissa inputs, f32
    /// accumulation). Off by default: the f32 reference mode matches the CPU backend.
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        use cudarc::cublas::sys::cublasMath_t as M;
        let mode = if on { M::CUBLAS_TF32_TENSOR_OP_MATH } else { M::CUBLAS_DEFAULT_MATH };
        self.bind()?;
        // SAFETY: the handle is alive for the life of `self`.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*self.blas.handle(), mode) }
            .result()
            .map_err(|e| KernelError::Cuda(format!("cublasSetMathMode: {e:?}")))
    }

    /// Waits for every queued op; returns the first error of any op so far.
    pub fn synchronize(&self) -> Result<()> {
        self.check()?;
        self.stream.synchronize().map_err(|e| self.driver_err("synchronize", e))?;
        Ok(())
    }

    /// The backend's first recorded error, if any.
    pub fn check(&self) -> Result<()> {
        match &*self.error.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(msg) => Err(KernelError::Cuda(msg.clone())),
            None => Ok(()),
        }
    }

    /// Records `msg` as the first error (later ones are dropped: they usually follow from it).
    pub(super) fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(format!("cuda:{}: {msg}", self.ordinal));
        }
    }

    pub(super) fn driver_err(&self, what: &str, e: result::DriverError) -> KernelError {
        let msg = format!("{what}: {}", driver_msg(&e));
        self.fail(msg.clone());
        KernelError::Cuda(format!("cuda:{}: {msg}", self.ordinal))
    }

    /// Makes this backend's context current on the calling thread (the trainer may run on
    /// any thread; raw driver and cuBLAS calls use the current context).
    pub(super) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| self.driver_err("binding the context", e))
    }

    /// The kernel `entry` of `module.cu`, compiling and loading the module on first use.
    pub(super) fn func(&self, module: &str, entry: &str) -> std::result::Result<Func, String> {
        let Some(idx) = KERNELS.iter().position(|k| k.name == module) else {
            return Err(format!("no kernel file {module}.cu"));
        };
        let loaded = self.modules[idx].get_or_init(|| {
            let k = &KERNELS[idx];
            let ptx = cached_ptx(k, self.arch)?;
            let m = self
                .ctx
                .load_module(ptx)
                .map_err(|e| format!("loading {}.cu: {}", k.name, driver_msg(&e)))?;
            let mut funcs = Vec::with_capacity(k.entries.len());
            for &e in k.entries {
                let f = m.load_function(e).map_err(|err| {
                    format!("{}.cu has no kernel {e}: {}", k.name, driver_msg(&err))
                })?;
                funcs.push((e, Func(f.cu_function())));
            }
            Ok(Module { _module: m, funcs })
        });
        let m = loaded.as_ref().map_err(Clone::clone)?;
        m.funcs
            .iter()
            .find(|(n, _)| *n == entry)
            .map(|(_, f)| *f)
            .ok_or_else(|| format!("{module}.cu has no kernel {entry}"))
    }

    /// Compiles and loads every kernel module now (otherwise each is compiled on first use).
    pub fn load_all(&self) -> Result<()> {
        for k in KERNELS {
            self.func(k.name, k.entries[0]).map_err(KernelError::Cuda)?;
        }
        Ok(())
    }

    /// Queues `module.cu`'s `entry` on the stream. Errors are recorded (see the module doc).
    pub(super) fn launch(
        &self,
        module: &str,
        entry: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: &mut [*mut c_void],
    ) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return; // nothing to do (an empty batch)
        }
        let f = match self.func(module, entry) {
            Ok(f) => f,
            Err(msg) => return self.fail(msg),
        };
        if self.bind().is_err() {
            return;
        }
        // SAFETY: `f` belongs to a loaded module; the callers pass parameters that match the
        // kernel's signature in `module.cu`, pointing at values alive for this call, and
        // device pointers of views whose bounds they checked.
        let r =
            unsafe { result::launch_kernel(f.0, grid, block, 0, self.stream.cu_stream(), params) };
        if let Err(e) = r {
            self.fail(format!("launching {entry}: {}", driver_msg(&e)));
        }
    }

    /// The device address of `buf[0]`.
    pub(super) fn base<T>(&self, buf: &CudaSlice<T>) -> sys::CUdeviceptr {
        // Event tracking is off, so the returned guard records nothing.
        buf.device_ptr(&self.stream).0
    }

    pub(super) fn view_of<'a>(&self, buf: &'a CudaSlice<f32>, range: Range<usize>) -> CudaView<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "range {range:?} out of a buffer of {}",
            buf.len()
        );
        CudaView {
            ptr: self.base(buf) + 4 * range.start as u64,
            len: range.len(),
            _buf: PhantomData,
        }
    }

    pub(super) fn view_mut_of<'a>(
        &self,
        buf: &'a mut CudaSlice<f32>,
        range: Range<usize>,
    ) -> CudaViewMut<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "range {range:?} out of a buffer of {}",
            buf.len()
        );
        let ptr = self.base(buf) + 4 * range.start as u64;
        CudaViewMut { ptr, len: range.len(), _buf: PhantomData }
    }

    pub(super) fn split_of<'a, const N: usize>(
        &self,
        buf: &'a mut CudaSlice<f32>,
        ranges: [Range<usize>; N],
    ) -> [CudaViewMut<'a>; N] {
        for (i, a) in ranges.iter().enumerate() {
            assert!(
                a.start <= a.end && a.end <= buf.len(),
                "range {a:?} out of a buffer of {}",
                buf.len()
            );
            for b in &ranges[i + 1..] {
                assert!(a.end <= b.start || b.end <= a.start, "overlapping {a:?} and {b:?}");
            }
        }
        let base = self.base(buf);
        ranges.map(|r| CudaViewMut {
            ptr: base + 4 * r.start as u64,
            len: r.len(),
            _buf: PhantomData,
        })
    }

    pub(super) fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.check()?;
        // SAFETY: zeroed right below, as the CPU backend's buffers are.
        let mut buf = unsafe { self.stream.alloc::<f32>(len) }
            .map_err(|e| self.driver_err(&format!("allocating {len} floats"), e))?;
        self.stream.memset_zeros(&mut buf).map_err(|e| self.driver_err("zeroing", e))?;
        Ok(buf)
    }

    pub(super) fn alloc_i32_buf(&self, len: usize) -> Result<CudaIBuf> {
        self.check()?;
        let dev = self
            .stream
            .alloc_zeros::<i32>(len)
            .map_err(|e| self.driver_err(&format!("allocating {len} ints"), e))?;
        Ok(CudaIBuf { dev, host: vec![0; len] })
    }

    pub(super) fn upload_f32(&self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        check_len(dst.len(), src.len())?;
        self.check()?;
        self.bind()?;
        let ptr = self.base(dst);
        // SAFETY: dst holds src.len() floats; from pageable memory the call returns once
        // `src` has been staged, so it may be reused at once.
        unsafe { result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(|e| self.driver_err("copying to the device", e))
    }

    pub(super) fn upload_i32_buf(&self, dst: &mut CudaIBuf, src: &[i32]) -> Result<()> {
        check_len(dst.dev.len(), src.len())?;
        self.check()?;
        self.bind()?;
        dst.host.copy_from_slice(src);
        let ptr = self.base(&dst.dev);
        // SAFETY: as in upload_f32.
        unsafe { result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(|e| self.driver_err("copying to the device", e))
    }

    pub(super) fn download_f32(&self, src: CudaView<'_>, dst: &mut [f32]) -> Result<()> {
        check_len(dst.len(), src.len)?;
        self.check()?;
        self.bind()?;
        // SAFETY: src covers dst.len() floats of a live buffer (the view borrows it).
        unsafe { result::memcpy_dtoh_async(dst, src.ptr, self.stream.cu_stream()) }
            .map_err(|e| self.driver_err("copying from the device", e))?;
        self.stream.synchronize().map_err(|e| self.driver_err("copying from the device", e))?;
        self.check()
    }

    pub(super) fn fill_f32(&self, dst: CudaViewMut<'_>, value: f32) {
        if dst.len == 0 || self.bind().is_err() {
            return;
        }
        // SAFETY: the view covers dst.len 4-byte words of a live buffer.
        let r = unsafe {
            sys::cuMemsetD32Async(dst.ptr, value.to_bits(), dst.len, self.stream.cu_stream())
        }
        .result();
        if let Err(e) = r {
            self.fail(format!("fill: {}", driver_msg(&e)));
        }
    }

    /// Copies `src` into the reusable device buffer `slot`, growing it if needed; returns its
    /// device address.
    pub(super) fn stage_i32(
        &self,
        slot: &mut Option<CudaSlice<i32>>,
        src: &[i32],
    ) -> std::result::Result<sys::CUdeviceptr, String> {
        if slot.as_ref().is_none_or(|s| s.len() < src.len()) {
            *slot = None;
            // SAFETY: the first src.len() entries are written below before any use.
            let s = unsafe { self.stream.alloc::<i32>(src.len().next_power_of_two()) }
                .map_err(|e| format!("allocating scratch: {}", driver_msg(&e)))?;
            *slot = Some(s);
        }
        let ptr = self.base(slot.as_ref().expect("just set"));
        // SAFETY: the slot holds at least src.len() ints.
        unsafe { result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(|e| format!("copying to the device: {}", driver_msg(&e)))?;
        Ok(ptr)
    }
}

/// NVRTC output of one kernel file for one architecture, compiled once per process (each
/// backend still loads its own module into its own context).
fn cached_ptx(k: &'static KernelSource, arch: &'static str) -> std::result::Result<Ptx, String> {
    type Cache = Mutex<HashMap<(&'static str, &'static str), Ptx>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(k.name, arch)) {
        return Ok(p.clone());
    }
    // Compiled outside the lock; two threads racing compile twice and keep one.
    let ptx = nvrtc::compile(k, Some(arch)).map_err(|e| e.to_string())?;
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert((k.name, arch), ptx.clone());
    Ok(ptx)
}

fn check_len(expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Size { expected, got })
    }
}
