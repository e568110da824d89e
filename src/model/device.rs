//! The `device` setting: `auto | cpu | cuda | cuda:N`, resolved once on the worker thread.

use crate::config::DeviceSpec;

/// Where the configured device is resolved: on the worker thread, which owns it.
impl DeviceSpec {
    /// The libtorch device, or why it cannot be had on this host.
    pub fn resolve(self) -> Result<tch::Device, String> {
        match self {
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Auto if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            Self::Auto => Ok(tch::Device::Cpu),
            Self::Cuda(n) => {
                let count = tch::Cuda::device_count() as usize;
                if !tch::Cuda::is_available() || n >= count {
                    Err(format!("cuda:{n} requested but libtorch sees {count} CUDA device(s)"))
                } else {
                    Ok(tch::Device::Cuda(n))
                }
            }
        }
    }
}

unsafe extern "C" {
    /// libgomp (linked by torch-sys): sets the calling thread's OpenMP thread-count ICV only.
    fn omp_set_num_threads(n: std::os::raw::c_int);
}

/// Makes libtorch CPU ops called from *this* thread run on this thread alone.
///
/// Every OS thread that runs a libtorch op gets its own OpenMP team. Once a process has more
/// OpenMP threads than cores, libgomp stops spin-waiting between parallel regions, and each of
/// the hundreds of regions in a forward pass pays a futex wake-up: measured here (2 cores), the
/// worker's attacks ran 1.6× slower for the rest of the process after one libtorch op on another
/// thread. So every thread but the worker (tokio's blocking pool, which resizes images) calls
/// this first; the worker keeps libtorch's default of one thread per core. Unlike
/// `tch::set_num_threads`, this leaves the process-wide MKL and pthreadpool settings alone.
pub fn single_threaded_torch_here() {
    // SAFETY: omp_set_num_threads only writes the calling thread's ICV; any positive value is valid.
    unsafe { omp_set_num_threads(1) }
}

/// How TorchScript runs the models on the calling thread (the worker): Triton's PyTorch backend
/// has the same two switches (`ENABLE_TENSOR_FUSER`, `DISABLE_OPTIMIZED_EXECUTION`).
///
/// TorchScript's profiling executor specialises a graph for each new input shape it meets and,
/// with the tensor-expression fuser on, compiles fused kernels for it (NVRTC on CUDA). Continuous
/// batching changes the batch size from tick to tick, so each new size stalled the worker while
/// it compiled: on an H200, /attack at 4 concurrent clients ran at 1.84 attacks/s against 4.92
/// one at a time (benches/results.md). libtorch never fuses on CPU by default, so turning the
/// fuser off changes nothing there. The fuser switch is process-wide, the optimiser's per thread.
pub fn configure_jit(fuser: bool, optimize: bool) -> Result<(), tch::TchError> {
    tch::jit::f_set_tensor_expr_fuser_enabled(fuser)?;
    tch::jit::f_set_graph_executor_optimize(optimize)
}

pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jit_switches_take_effect() {
        // The default (fuser off) is what every other test in this process runs with too.
        configure_jit(false, true).unwrap();
        assert!(!tch::jit::get_tensor_expr_fuser_enabled());
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::parse("CPU").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn cpu_always_resolves_and_absent_cuda_is_an_error() {
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), tch::Device::Cpu);
        if !tch::Cuda::is_available() {
            assert!(DeviceSpec::Cuda(0).resolve().is_err());
            assert_eq!(DeviceSpec::Auto.resolve().unwrap(), tch::Device::Cpu);
        }
    }
}
