//! The CUDA device: one context and stream per GPU, the hand-written kernels in `kernels/cuda/*.cu`
//! compiled by NVRTC for the GPU's own architecture (PTX cached on disk), and cuBLAS for dense GEMMs.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): this crate builds and its CPU ops run with no
//! CUDA anywhere. Asking for `cuda:N` where the driver, NVRTC or cuBLAS cannot be loaded, or where there is
//! no such GPU, is a [`KernelError::Unavailable`] naming what is missing, never a panic (cudarc panics on a
//! missing library, so presence is checked before any call).
//!
//! All work of one GPU goes to one stream, in order, so no kernel needs cross-stream events; cudarc's
//! per-buffer event tracking is switched off for that reason (it costs two event records per launch).

pub mod nccl;
pub(crate) mod ops;

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use cudarc::{
    cublas::CudaBlas,
    driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig},
    nvrtc::{CompileOptions, Ptx},
};

use crate::{device::Device, error::KernelError, error::Result};

/// The kernel sources, each compiled as one module with the shared header in front.
pub const SOURCES: &[(&str, &str)] = &[
    ("norm", include_str!("../../cuda/norm.cu")),
    ("rope", include_str!("../../cuda/rope.cu")),
    ("elementwise", include_str!("../../cuda/elementwise.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
    ("sampling", include_str!("../../cuda/sampling.cu")),
    ("gemv", include_str!("../../cuda/gemv.cu")),
    ("quant", include_str!("../../cuda/quant.cu")),
];

const COMMON: &str = include_str!("../../cuda/common.cuh");

/// Every `extern "C" __global__` function of `src`, in order.
fn kernel_names(src: &str) -> Vec<&str> {
    src.split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect()
}

/// The full text NVRTC compiles for module `name`.
pub fn module_source(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

/// Whether NVRTC can be loaded in this process.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one module's source to PTX for `arch` (e.g. `compute_90`), with the compiler log on error.
pub fn compile_ptx(name: &str, src: &str, arch: &str) -> Result<String> {
    if !nvrtc_available() {
        return Err(KernelError::Compile {
            module: name.to_string(),
            log: "NVRTC (libnvrtc.so) cannot be loaded; put its directory on LD_LIBRARY_PATH".into(),
        });
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(module_source(src), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(KernelError::Compile { module: name.to_string(), log: log.to_string_lossy().into_owned() })
        }
        Err(e) => Err(KernelError::Compile { module: name.to_string(), log: e.to_string() }),
    }
}

/// Where compiled PTX is kept between runs: `$TESSERA_CACHE_DIR/ptx`, else `$XDG_CACHE_HOME/tessera/ptx`,
/// else `~/.cache/tessera/ptx`.
fn ptx_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("TESSERA_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tessera")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/tessera")))?;
    Some(base.join("ptx"))
}

/// PTX for a module, from the disk cache when the same source was compiled for the same architecture by
/// the same NVRTC before. A cache that cannot be read or written only costs a compile.
fn cached_ptx(name: &str, src: &str, arch: &str) -> Result<String> {
    let mut h = std::hash::DefaultHasher::new();
    (COMMON, src, arch, nvrtc_version()).hash(&mut h);
    let file = ptx_cache_dir().map(|d| d.join(format!("{name}-{arch}-{:016x}.ptx", h.finish())));
    if let Some(f) = &file
        && let Ok(ptx) = std::fs::read_to_string(f)
    {
        return Ok(ptx);
    }
    let ptx = compile_ptx(name, src, arch)?;
    if let Some(f) = &file {
        // Write-then-rename, so a concurrent worker never reads half a file.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let ok = f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &ptx).is_ok()
            && std::fs::rename(&tmp, f).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC presence was checked by the caller path (compile) or the version stays (0, 0).
    if nvrtc_available() {
        unsafe {
            cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor);
        }
    }
    (major, minor)
}

/// An index array as uploaded: the host copy it was made from, and the device copy.
type Upload = (Vec<u32>, Arc<CudaSlice<u32>>);
type UploadF32 = (Vec<f32>, Arc<CudaSlice<f32>>);

/// One GPU in use by this process.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// Small index arrays (positions, slots, attention metadata) uploaded for one op and reused by the next
    /// call with the same contents: every layer of a forward pass passes the same ones.
    uploads: Mutex<HashMap<&'static str, Upload>>,
    uploads_f32: Mutex<HashMap<&'static str, UploadF32>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{} {})", self.ordinal, self.name)
    }
}

static GPUS: Mutex<Vec<(usize, Arc<Gpu>)>> = Mutex::new(Vec::new());

/// The GPU `ordinal`, initialised on first use (context, cuBLAS, kernels).
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    let mut gpus = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, g)) = gpus.iter().find(|(o, _)| *o == ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::init(ordinal)?);
    gpus.push((ordinal, g.clone()));
    Ok(g)
}

fn unavailable(ordinal: usize, why: impl Into<String>) -> KernelError {
    KernelError::Unavailable(Device::Cuda(ordinal), why.into())
}

impl Gpu {
    fn init(ordinal: usize) -> Result<Gpu> {
        // SAFETY: each only tries to dlopen the candidate names of its library.
        let (driver, blas) =
            unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) };
        if !driver {
            return Err(unavailable(ordinal, "no CUDA driver (libcuda.so.1 cannot be loaded)"));
        }
        if !nvrtc_available() {
            return Err(unavailable(
                ordinal,
                "NVRTC (libnvrtc.so) cannot be loaded; add its directory to LD_LIBRARY_PATH",
            ));
        }
        if !blas {
            return Err(unavailable(
                ordinal,
                "cuBLAS (libcublas.so) cannot be loaded; add its directory to LD_LIBRARY_PATH",
            ));
        }
        let count = CudaContext::device_count().map_err(|e| unavailable(ordinal, format!("cuInit: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(ordinal, format!("this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(ordinal, e.to_string()))?;
        // SAFETY: all of this GPU's work goes to one stream, so no cross-stream tracking is needed; nothing
        // has been allocated yet.
        unsafe { ctx.disable_event_tracking() };
        // Keep freed memory in the stream-ordered pool across synchronisations: by default it is returned to
        // the driver at every sync, so each decode step (which ends by copying tokens back) would map its
        // activation buffers afresh.
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver calls on this context's device with valid out-pointers.
        unsafe {
            use cudarc::driver::sys;
            let dev = ctx.cu_device();
            if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) == sys::CUresult::CUDA_SUCCESS {
                let mut keep = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep) as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable(ordinal, format!("cuBLAS: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let capability = ctx.compute_capability().map_err(|e| unavailable(ordinal, e.to_string()))?;
        let arch = format!("compute_{}{}", capability.0, capability.1);
        let mut kernels = HashMap::new();
        for &(module, src) in SOURCES {
            let ptx = cached_ptx(module, src, &arch)?;
            let m = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| unavailable(ordinal, format!("{module}: {e}")))?;
            for k in kernel_names(src) {
                let f = m.load_function(k).map_err(|e| unavailable(ordinal, format!("{module}.{k}: {e}")))?;
                kernels.insert(k, f);
            }
        }
        tracing::info!(device = ordinal, name = %name, capability = ?capability, "CUDA device ready");
        Ok(Gpu {
            ordinal,
            name,
            capability,
            ctx,
            stream,
            blas,
            kernels,
            uploads: Mutex::new(HashMap::new()),
            uploads_f32: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn kernel(&self, name: &'static str) -> Result<&CudaFunction> {
        self.kernels.get(name).ok_or_else(|| self.err(name, "kernel missing from the compiled modules"))
    }

    pub(crate) fn err(&self, what: &str, e: impl std::fmt::Display) -> KernelError {
        KernelError::Cuda { device: Device::Cuda(self.ordinal), detail: format!("{what}: {e}") }
    }

    /// Waits for all queued work, reporting any error a kernel raised.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))?;
        self.ctx.mem_get_info().map_err(|e| self.err("mem_get_info", e))
    }

    pub(crate) fn upload_u32(&self, data: &[u32]) -> Result<CudaSlice<u32>> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<u32>(1).map_err(|e| self.err("alloc", e));
        }
        self.stream.clone_htod(data).map_err(|e| self.err("copy to device", e))
    }

    /// `data` on the device, reusing the upload of the previous call under `key` when it was the same.
    pub(crate) fn upload_cached(&self, key: &'static str, data: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut up = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = up.get(key)
            && host.as_slice() == data
        {
            return Ok(dev.clone());
        }
        let dev = Arc::new(self.upload_u32(data)?);
        up.insert(key, (data.to_vec(), dev.clone()));
        Ok(dev)
    }

    /// [`Gpu::upload_cached`] for f32 data (RoPE frequency tables).
    pub(crate) fn upload_cached_f32(&self, key: &'static str, data: &[f32]) -> Result<Arc<CudaSlice<f32>>> {
        let mut up = self.uploads_f32.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = up.get(key)
            && host.as_slice() == data
        {
            return Ok(dev.clone());
        }
        let dev = Arc::new(self.stream.clone_htod(data).map_err(|e| self.err("copy to device", e))?);
        up.insert(key, (data.to_vec(), dev.clone()));
        Ok(dev)
    }

    /// A launch over `n` elements with a grid-stride kernel.
    pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Device memory of a tensor. Clones share the memory (weights are shared read-only, e.g. tied
/// embeddings); an in-place op on a shared buffer is refused rather than silently writing through.
#[derive(Clone)]
pub(crate) struct Buffer {
    pub gpu: Arc<Gpu>,
    pub data: Arc<DeviceData>,
}

pub(crate) enum DeviceData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<half::bf16>),
    /// A weight matrix in one of llama.cpp's block formats, its rows whole blocks (`ops::quant`).
    Quant(tessera_gguf::GgmlType, CudaSlice<u8>),
}

impl Drop for Buffer {
    /// cudarc frees device memory in `CudaSlice`'s drop without making the context current, and a free
    /// on a thread where it is not (a tensor handed back from the compute pool and dropped by its
    /// caller) fails, leaving a sticky error that the next operation on the device reports. The last
    /// holder of the memory binds the context first, whatever thread it is on.
    fn drop(&mut self) {
        if Arc::strong_count(&self.data) == 1 {
            let _ = self.gpu.ctx.bind_to_thread();
        }
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer(cuda:{}, {:?})", self.gpu.ordinal, self.dtype())
    }
}

impl Buffer {
    pub fn new(gpu: Arc<Gpu>, data: DeviceData) -> Self {
        Buffer { gpu, data: Arc::new(data) }
    }

    pub fn dtype(&self) -> crate::dtype::DType {
        match *self.data {
            DeviceData::F32(_) => crate::dtype::DType::F32,
            DeviceData::BF16(_) => crate::dtype::DType::BF16,
            DeviceData::Quant(ty, _) => crate::dtype::DType::Quant(ty),
        }
    }

    pub fn bf16(&self, op: &'static str) -> Result<&CudaSlice<half::bf16>> {
        match &*self.data {
            DeviceData::BF16(s) => Ok(s),
            _ => Err(KernelError::DType { op, expected: crate::dtype::DType::BF16, got: self.dtype() }),
        }
    }

    pub fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &*self.data {
            DeviceData::F32(s) => Ok(s),
            _ => Err(KernelError::DType { op, expected: crate::dtype::DType::F32, got: self.dtype() }),
        }
    }

    pub fn bf16_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<half::bf16>> {
        let got = self.dtype();
        match Arc::get_mut(&mut self.data) {
            Some(DeviceData::BF16(s)) => Ok(s),
            Some(_) => Err(KernelError::DType { op, expected: crate::dtype::DType::BF16, got }),
            None => {
                Err(KernelError::Shape { op, detail: "in-place op on a CUDA tensor whose memory is shared".into() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_declares_kernels_with_unique_names() {
        let mut all: Vec<&str> = SOURCES.iter().flat_map(|(_, s)| kernel_names(s)).collect();
        assert!(all.contains(&"attention_prefill_bf16") && all.contains(&"rms_norm_bf16"));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate kernel names");
    }
}
