//! The `.cu` sources of the CUDA kernels, embedded in the binary, one per op. They are
//! plain strings here (no CUDA needed to build); `nvrtc` compiles them at run time.

/// Helpers every kernel uses (warp and block reductions, constants). NVRTC compiles without
/// system headers and cudarc passes no header list, so this is prepended to each source.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// One `.cu` file: its name (without `.cu`), its source, and the `extern "C"` kernels it
/// defines, which the backend loads by name from the compiled module.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

macro_rules! kernel {
    ($name:literal, [$($entry:literal),+ $(,)?]) => {
        KernelSource {
            name: $name,
            source: include_str!(concat!("kernels/", $name, ".cu")),
            entries: &[$($entry),+],
        }
    };
}

/// Every kernel file, in the order of the ops in [`crate::Backend`].
pub const KERNELS: &[KernelSource] = &[
    kernel!("encoder", ["encoder_forward", "encoder_backward_wpe", "encoder_backward_wte"]),
    kernel!(
        "layernorm",
        ["layernorm_forward", "layernorm_backward_dinp", "layernorm_backward_params"]
    ),
    kernel!("bias", ["bias_broadcast", "bias_backward"]),
    kernel!("attention", ["attention_forward", "attention_backward_dq", "attention_backward_dkv"]),
    kernel!("gelu", ["gelu_forward", "gelu_backward", "gelu_forward_bf16", "gelu_backward_bf16"]),
    kernel!("residual", ["residual_forward", "residual_forward_bf16"]),
    kernel!("crossentropy", ["crossentropy_forward", "crossentropy_backward"]),
    kernel!("global_norm", ["sum_squares_partial", "sum_squares_final"]),
    kernel!("adamw", ["adamw"]),
];

/// The kernel file named `name`, if there is one.
pub fn kernel(name: &str) -> Option<&'static KernelSource> {
    KERNELS.iter().find(|k| k.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs without CUDA: the table and the sources agree, so the backend never asks a
    /// module for a kernel it does not define.
    #[test]
    fn every_listed_entry_is_defined_once_in_its_source() {
        for k in KERNELS {
            for e in k.entries {
                let decl = format!("__global__ void {e}(");
                let n = k.source.matches(&decl).count();
                assert_eq!(n, 1, "{}.cu defines {e} {n} times", k.name);
                let at = k.source.find(&decl).unwrap();
                let before = &k.source[..at];
                assert!(before.trim_end().ends_with("extern \"C\""), "{e} is not extern \"C\"");
            }
            let defined = k.source.matches("__global__ void ").count();
            assert_eq!(defined, k.entries.len(), "{}.cu defines kernels not listed", k.name);
        }
    }

    #[test]
    fn every_kernel_documents_its_launch_geometry() {
        for k in KERNELS {
            let launches = k.source.matches("Launch:").count();
            assert!(launches >= 1, "{}.cu has no launch comment", k.name);
        }
    }
}
