//! Where a tensor lives.

use std::{fmt, str::FromStr};

use crate::KernelError;

/// A compute device. `cuda:N` needs the `cuda` feature (on by default) and, at run time, a CUDA driver,
/// NVRTC and cuBLAS; where any is missing, asking for it is a clear [`KernelError::Unavailable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Checks that this device can be used in this process.
    pub fn ensure_available(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::gpu(i).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::Unavailable(
                self,
                "this build of tessera has no CUDA backend; use --device cpu".into(),
            )),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| KernelError::BadDevice(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad} should not parse");
        }
        assert!(Device::Cuda(0).ensure_available().unwrap_err().to_string().contains("cuda:0"));
    }
}
