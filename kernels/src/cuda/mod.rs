//! The CUDA backend: device names, the device probe, and [`CudaBackend`] (feature `cuda`).
//!
//! Layout:
//! - [`Device`]: `cpu`, `cuda` or `cuda:N`, as the CLI takes it.
//! - [`probe`]: checks that a CUDA device can be used, or says in one line why not.
//! - [`sources`]: the `.cu` kernels (one file per op, in `kernels/`), embedded as strings.
//! - `nvrtc` (feature `cuda`): compiles those sources to PTX at run time with NVRTC.
//! - `backend` (feature `cuda`): [`CudaBackend`]: context, stream, buffers and views, kernel
//!   modules compiled on first use and cached per module, launches, the first-error slot.
//! - `ops` (feature `cuda`): the [`crate::Backend`] ops, each launching its `.cu` kernels.
//! - `blas` (feature `cuda`): the matmuls through cuBLAS `sgemm`.
//!
//! Without the `cuda` feature nothing here touches CUDA and [`probe`] always returns
//! [`KernelError::NoCuda`] (the CLI calls it, so `--device cuda` fails in one line either
//! way; only code that builds a `CudaBackend` carries a `cfg`). With it, cudarc loads the CUDA
//! libraries at run time (dynamic loading): the binary builds and starts on a machine without
//! CUDA. cudarc panics when a library it needs is missing, so each library's presence is
//! checked before the first call into it (libcuda, libnvrtc, libcublas; libnccl in the
//! worker's NCCL collective).

pub mod sources;

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
mod blas;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;

#[cfg(feature = "cuda")]
pub use backend::{CudaBackend, CudaIBuf, CudaView, CudaViewMut};
#[cfg(feature = "cuda")]
pub use ops::ATT_HS_MAX;

/// The GPU tests' rule: device 0's backend, or `None` after printing why it is skipped
/// (`skipping: no CUDA device (…) [test]`); under `FERRITE_REQUIRE_GPU=1` (as
/// `scripts/gpu-check.sh` sets it) a missing device panics instead, so a GPU run never
/// passes by skipping.
#[cfg(feature = "cuda")]
pub fn device_for_test(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            if std::env::var("FERRITE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: FERRITE_REQUIRE_GPU=1 but no CUDA device: {e}");
            }
            eprintln!("skipping: no CUDA device ({e}) [{test}]");
            None
        }
    }
}

use crate::KernelError;

/// Parses a device name such as `cpu`, `cuda` or `cuda:1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

/// Checks that CUDA device `ordinal` can be used: in a build without the `cuda` feature it
/// never can.
#[cfg(not(feature = "cuda"))]
pub fn probe(ordinal: usize) -> Result<String, KernelError> {
    Err(KernelError::NoCuda(format!(
        "cuda:{ordinal} requested, but this build of ferrite has no CUDA support \
         (built without the `cuda` feature); use --device cpu"
    )))
}

/// Checks that CUDA device `ordinal` can be used: the driver library loads, the driver
/// starts, a device with that ordinal exists, and the NVRTC and cuBLAS libraries the backend
/// needs can be loaded. Returns the device's name. [`CudaBackend::new`] checks the same
/// before it touches the device.
#[cfg(feature = "cuda")]
pub fn probe(ordinal: usize) -> Result<String, KernelError> {
    let name = driver::device_name(ordinal)?;
    if !nvrtc::available() {
        return Err(KernelError::NoCuda(format!(
            "cuda:{ordinal} ({name}) found, but {}",
            nvrtc::NvrtcError::Missing
        )));
    }
    // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KernelError::NoCuda(format!(
            "cuda:{ordinal} ({name}) found, but the cuBLAS library (libcublas) was not; put \
             the CUDA toolkit's lib64 on LD_LIBRARY_PATH"
        )));
    }
    Ok(name)
}

#[cfg(feature = "cuda")]
mod driver {
    use cudarc::driver::{result, sys};

    use crate::KernelError;

    fn no_cuda(what: &str, e: result::DriverError) -> KernelError {
        let reason = e.error_string().map(|s| s.to_string_lossy().into_owned());
        KernelError::NoCuda(format!("{what}: {}", reason.unwrap_or_else(|_| format!("{e:?}"))))
    }

    /// The name of device `ordinal`, once the driver is known to be usable.
    pub fn device_name(ordinal: usize) -> Result<String, KernelError> {
        // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::NoCuda(format!(
                "cuda:{ordinal} requested, but the NVIDIA driver library (libcuda) was not \
                 found on this machine; use --device cpu"
            )));
        }
        result::init()
            .map_err(|e| no_cuda(&format!("cuda:{ordinal}: the CUDA driver did not start"), e))?;
        let count = result::device::get_count()
            .map_err(|e| no_cuda(&format!("cuda:{ordinal}: could not count CUDA devices"), e))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(KernelError::NoCuda(format!(
                "cuda:{ordinal} requested, but this machine has {count} CUDA device(s)"
            )));
        }
        let dev = result::device::get(ordinal as i32)
            .map_err(|e| no_cuda(&format!("cuda:{ordinal} could not be opened"), e))?;
        result::device::get_name(dev)
            .map_err(|e| no_cuda(&format!("cuda:{ordinal}: could not read the device name"), e))
    }
}
