//! Compiles every embedded `.cu` kernel with NVRTC (no GPU needed, only `libnvrtc`).
//!
//! Run with `scripts/nvrtc.sh`, which installs NVRTC and points the loader at it. Without
//! the library the tests print `SKIPPED: …` and pass, except under `CI=true`, where they fail:
//! CI must install it.
#![cfg(feature = "cuda")]

use ferrite_kernels::cuda::nvrtc::{self, NvrtcError};
use ferrite_kernels::cuda::sources::KERNELS;
use ferrite_kernels::KernelError;

/// Whether NVRTC can be loaded; if not, skips the calling test (or fails it on CI).
fn nvrtc_present(test: &str) -> bool {
    if nvrtc::available() {
        return true;
    }
    let why = "libnvrtc not found on the loader's path (LD_LIBRARY_PATH); run scripts/nvrtc.sh";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}. CI=true: CI must install NVRTC");
    }
    eprintln!("SKIPPED: {why} ({test})");
    false
}

#[test]
fn every_kernel_compiles_with_nvrtc_and_defines_its_entries() {
    if !nvrtc_present("every_kernel_compiles_with_nvrtc_and_defines_its_entries") {
        return;
    }
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    eprintln!("NVRTC {major}.{minor}");
    // NVRTC's default (oldest) architecture, and the H100/H200 the GPU runs use.
    for arch in [None, Some("compute_90")] {
        for k in KERNELS {
            let ptx = match nvrtc::compile(k, arch) {
                Ok(p) => p.to_src(),
                Err(e) => panic!("{}.cu for {arch:?}: {e}", k.name),
            };
            for e in k.entries {
                assert!(
                    ptx.contains(&format!(".entry {e}(")),
                    "{}.cu compiled for {arch:?}, but its PTX has no kernel {e}",
                    k.name
                );
            }
        }
    }
}

#[test]
fn broken_source_returns_nvrtc_log() {
    if !nvrtc_present("broken_source_returns_nvrtc_log") {
        return;
    }
    let src = "extern \"C\" __global__ void broken(float* x) {\n    x[0] = not_declared;\n}\n";
    let err = nvrtc::compile_source("broken", src, None).expect_err("must not compile");
    let log = err.log().unwrap_or_else(|| panic!("expected a compile error, got {err}"));
    assert!(log.contains("not_declared"), "log does not name the identifier: {log}");
    // The log points into broken.cu itself, not into the prepended helpers.
    assert!(log.contains("broken.cu(2)"), "log does not point at broken.cu line 2: {log}");
    assert!(matches!(err, NvrtcError::Compile { .. }));
    let as_kernel_error: KernelError = err.into();
    assert!(as_kernel_error.to_string().contains("not_declared"));
}

/// The driver probe never panics: without libcuda (this machine, CI) it is a one-line error;
/// with a GPU it names the device.
#[test]
fn probe_without_a_usable_device_is_one_clear_line() {
    match ferrite_kernels::cuda::probe(0) {
        Ok(name) => eprintln!("probe(0): {name}"),
        Err(err) => {
            let msg = err.to_string();
            eprintln!("probe(0): {msg}");
            assert!(msg.contains("cuda:0") && !msg.contains('\n'), "{msg}");
        }
    }
    let far = ferrite_kernels::cuda::probe(4096).expect_err("no machine has 4097 GPUs");
    assert!(far.to_string().contains("cuda:4096"), "{far}");
}

/// NVRTC runs ptxas for a real architecture: every kernel must fit the H100/H200 (sm_90)
/// limits, 48 KB of static shared memory per block included, and none may spill registers.
#[test]
fn every_kernel_assembles_for_sm90_without_spills() {
    if !nvrtc_present("every_kernel_assembles_for_sm90_without_spills") {
        return;
    }
    for k in KERNELS {
        let cubin = nvrtc::compile_cubin(k, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.image.is_empty(), "{}.cu: empty CUBIN", k.name);
        eprintln!("{}.cu (sm_90):\n{}", k.name, cubin.log);
        for e in k.entries {
            assert!(cubin.log.contains(e), "{}.cu: ptxas reports nothing for {e}", k.name);
        }
        for line in cubin.log.lines().filter(|l| l.contains("spill")) {
            assert!(line.contains(" 0 bytes spill stores"), "{}.cu spills: {line}", k.name);
        }
    }
}
