//! Run-time compilation of the embedded `.cu` sources with NVRTC, through cudarc.
//!
//! cudarc loads `libnvrtc` on first use and panics when it is missing, so every entry point
//! here checks [`available`] first and returns [`NvrtcError::Missing`] instead. The library
//! is found by the dynamic loader (`LD_LIBRARY_PATH`, the system paths): the CUDA toolkit's
//! `lib64`, or `pip install nvidia-cuda-nvrtc`, which puts `libnvrtc.so.13` under
//! `site-packages/nvidia/cu13/lib` (see `scripts/nvrtc.sh`). On a GPU machine prefer the
//! toolkit that matches the driver: PTX from a newer NVRTC can be refused by an older driver.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{self, CompileOptions, Ptx};

use super::sources::{KernelSource, COMMON, KERNELS};
use crate::KernelError;

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error(
        "the NVRTC library (libnvrtc) was not found; install the CUDA toolkit or `pip install \
         nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH (scripts/nvrtc.sh)"
    )]
    Missing,
    #[error("NVRTC could not compile {name}.cu ({code}):\n{log}")]
    Compile { name: String, code: String, log: String },
    #[error("NVRTC failed on {name}: {message}")]
    Other { name: String, message: String },
}

impl NvrtcError {
    /// NVRTC's compile log, for a compile error.
    pub fn log(&self) -> Option<&str> {
        match self {
            NvrtcError::Compile { log, .. } => Some(log),
            NvrtcError::Missing | NvrtcError::Other { .. } => None,
        }
    }
}

/// A GPU whose kernels cannot be compiled cannot be used: to callers of the backend this is
/// one more reason there is no CUDA device.
impl From<NvrtcError> for KernelError {
    fn from(e: NvrtcError) -> Self {
        KernelError::NoCuda(e.to_string())
    }
}

/// Whether the NVRTC library can be loaded (cheap after the first call of the process).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the candidate names; calls nothing from the library.
    unsafe { nvrtc::sys::is_culib_present() }
}

/// The (major, minor) version of the NVRTC library that was found.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    if !available() {
        return Err(NvrtcError::Missing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); nvrtcVersion writes two ints.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| {
        NvrtcError::Other { name: "nvrtcVersion".into(), message: format!("{e:?}") }
    })?;
    Ok((major, minor))
}

/// Compiles one embedded kernel file to PTX. `arch` is NVRTC's `--gpu-architecture`
/// (`"compute_90"` for an H100/H200); `None` takes NVRTC's default, the oldest it supports.
pub fn compile(kernel: &KernelSource, arch: Option<&'static str>) -> Result<Ptx, NvrtcError> {
    compile_source(kernel.name, kernel.source, arch)
}

/// Compiles every embedded kernel file, stopping at the first error.
pub fn compile_all(arch: Option<&'static str>) -> Result<Vec<(&'static str, Ptx)>, NvrtcError> {
    KERNELS.iter().map(|k| Ok((k.name, compile(k, arch)?))).collect()
}

/// Compiles `source` (the body of `name.cu`) after the shared helpers. NVRTC's log keeps
/// the line numbers of `name.cu`.
pub fn compile_source(
    name: &str,
    source: &str,
    arch: Option<&'static str>,
) -> Result<Ptx, NvrtcError> {
    if !available() {
        return Err(NvrtcError::Missing);
    }
    if source.contains('\0') || name.contains('\0') || name.contains('"') {
        return Err(NvrtcError::Other {
            name: format!("{name}.cu"),
            message: "the name or source holds a NUL byte or a quote".into(),
        });
    }
    let full = format!("{COMMON}\n#line 1 \"{name}.cu\"\n{source}");
    let opts = CompileOptions {
        arch,
        name: Some(format!("{name}.cu")),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    nvrtc::compile_ptx_with_opts(full, opts).map_err(|e| match e {
        nvrtc::CompileError::CompileError { nvrtc, log, .. } => NvrtcError::Compile {
            name: name.into(),
            code: format!("{nvrtc:?}"),
            log: cstr_lossy(&log),
        },
        other => NvrtcError::Other { name: format!("{name}.cu"), message: format!("{other:?}") },
    })
}

/// Machine code for one real architecture, with the assembler's report.
pub struct Cubin {
    pub image: Vec<u8>,
    /// NVRTC's log: with `--ptxas-options=-v`, each kernel's registers, shared memory and
    /// spill stores, as ptxas reports them.
    pub log: String,
}

/// Compiles one kernel file all the way to machine code for `arch` (`"sm_90"`), which runs
/// ptxas inside NVRTC: no GPU needed, and a kernel over the shared-memory limit or the
/// register file fails here rather than at launch.
pub fn compile_cubin(kernel: &KernelSource, arch: &str) -> Result<Cubin, NvrtcError> {
    if !available() {
        return Err(NvrtcError::Missing);
    }
    let name = format!("{}.cu", kernel.name);
    let other = |what: &str, e: nvrtc::result::NvrtcError| NvrtcError::Other {
        name: name.clone(),
        message: format!("{what}: {e:?}"),
    };
    let src = CString::new(format!("{COMMON}\n#line 1 \"{name}\"\n{}", kernel.source))
        .map_err(|_| NvrtcError::Other { name: name.clone(), message: "NUL in source".into() })?;
    let cname = CString::new(name.clone()).expect("kernel names hold no NUL");
    let prog = nvrtc::result::create_program(&src, Some(&cname))
        .map_err(|e| other("nvrtcCreateProgram", e))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, at the end; the buffers passed
    // to NVRTC are sized from its own answers.
    unsafe {
        let compiled = nvrtc::result::compile_program(prog, &opts);
        let log = nvrtc::result::get_program_log(prog)
            .map(|l| cstr_lossy(CStr::from_ptr(l.as_ptr())))
            .unwrap_or_default();
        let image = compiled
            .map_err(|e| NvrtcError::Compile {
                name: kernel.name.into(),
                code: format!("{e:?}"),
                log: log.clone(),
            })
            .and_then(|()| {
                let mut size = 0usize;
                nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| other("nvrtcGetCUBINSize", e))?;
                let mut image = vec![0u8; size];
                nvrtc::sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| other("nvrtcGetCUBIN", e))?;
                Ok(image)
            });
        // A failure to free the program leaks it; it must not hide the compile result.
        let _ = nvrtc::result::destroy_program(prog);
        Ok(Cubin { image: image?, log })
    }
}

fn cstr_lossy(s: &CStr) -> String {
    s.to_string_lossy().trim_end().to_string()
}
