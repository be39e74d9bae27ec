//! The cuBLAS GEMMs (bf16 inputs, f32 accumulation): the unsafe raw-pointer calls live here so that the
//! projection and attention code above them deals only in shapes.

use cudarc::{
    cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t},
    driver::{CudaSlice, DevicePtr, DevicePtrMut},
};
use half::bf16;

use crate::{
    cuda::{DeviceData, Gpu},
    error::Result,
};

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` into `y` (bf16 or f32), dimensions already checked to fit cuBLAS's `i32`.
pub(super) fn gemm_x_wt(
    g: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    y: &mut DeviceData,
    (mi, ki, ni): (i32, i32, i32),
) -> Result<()> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (a_ptr, _a) = w.device_ptr(&g.stream);
    let (b_ptr, _b) = x.device_ptr(&g.stream);
    let (c_ptr, c_type, _c) = match y {
        DeviceData::BF16(c) => {
            let (p, s) = c.device_ptr_mut(&g.stream);
            (p, cudaDataType_t::CUDA_R_16BF, s)
        }
        DeviceData::F32(c) => {
            let (p, s) = c.device_ptr_mut(&g.stream);
            (p, cudaDataType_t::CUDA_R_32F, s)
        }
        DeviceData::Quant(..) => return Err(g.err("cublasGemmEx", "the output cannot be in a block format")),
    };
    // Row-major y[m, n] is column-major yᵀ[n, m] = W[n, k] (column-major Wᵀ, transposed) · xᵀ[k, m].
    // SAFETY: pointers cover w (n·k), x (m·k) and y (m·n) elements, as the leading dimensions say.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *g.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const _,
            a_ptr as *const _,
            cudaDataType_t::CUDA_R_16BF,
            ki,
            b_ptr as *const _,
            cudaDataType_t::CUDA_R_16BF,
            ki,
            (&beta) as *const f32 as *const _,
            c_ptr as *mut _,
            c_type,
            ni,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| g.err("cublasGemmEx", e))
}

/// One strided-batched GEMM on raw device pointers (bf16 inputs, f32 accumulation), column-major as cuBLAS
/// sees it: `C[m, n] = op(A)[m, k] · op(B)[k, n]` for `batch` matrices `stride_*` elements apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_batched(
    g: &Gpu,
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    (a, lda, stride_a): (u64, usize, usize),
    (b, ldb, stride_b): (u64, usize, usize),
    (c, c_f32, ldc, stride_c): (u64, bool, usize, usize),
    batch: usize,
) -> Result<()> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let op_a = if trans_a { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let c_type = if c_f32 { cudaDataType_t::CUDA_R_32F } else { cudaDataType_t::CUDA_R_16BF };
    let i = |v: usize| v as i32;
    // SAFETY: the caller passes pointers to buffers that hold every element the dimensions, leading
    // dimensions and strides address.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *g.blas.handle(),
            op_a,
            cublasOperation_t::CUBLAS_OP_N,
            i(m),
            i(n),
            i(k),
            (&alpha) as *const f32 as *const _,
            a as *const _,
            cudaDataType_t::CUDA_R_16BF,
            i(lda),
            stride_a as i64,
            b as *const _,
            cudaDataType_t::CUDA_R_16BF,
            i(ldb),
            stride_b as i64,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            c_type,
            i(ldc),
            stride_c as i64,
            i(batch),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| g.err("cublasGemmStridedBatchedEx", e))
}
