//! The CUDA backend's entry point.
//!
//! The kernels themselves are not written yet; until they are, asking for a CUDA device
//! returns [`KernelError::NoCuda`] with the reason, so callers carry no `cfg`s and a
//! machine without CUDA gets one clear line instead of a panic.

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

/// Checks that CUDA device `ordinal` can be used.
pub fn probe(ordinal: usize) -> Result<(), KernelError> {
    Err(KernelError::NoCuda(format!(
        "cuda:{ordinal} requested, but this build of ferrite has no CUDA kernels yet; \
         use --device cpu"
    )))
}
