// Kronecker-factor accumulation on CUDA: the plan of sketch.h over cuBLAS on the current stream.
// Strided-batched GEMMs form the per-sequence gradients or Gram matrices; symmetric products use
// SYRKX (half the flops of a GEMM) followed by a kernel that mirrors the computed triangle. fp32
// or fp64 compute (the type of the operands), TF32 tensor cores for fp32 only when allow_tf32.
// Row-major tensors are handed to column-major cuBLAS as their transposes.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <limits>

#include "../ops.h"
#include "../sketch.h"

namespace yaqa {
namespace {

int as_int(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= std::numeric_limits<int>::max(), "sketch: ", what, " = ", v, " exceeds cuBLAS's int range");
  return static_cast<int>(v);
}

// Makes a 2-D/3-D operand usable by cuBLAS: unit column stride and a row stride of at least one
// row (column-major: ld >= the number of rows of the transpose).
at::Tensor blas_ready(const at::Tensor& t) {
  const bool ok = t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) >= t.size(-1));
  // clone, not contiguous(): a tensor with a size-1 last dimension can be "contiguous" with any stride.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// A row-major operand with unit column stride: its leading dimension and batch stride.
struct Operand {
  void* ptr;
  int64_t ld;
  int64_t batch_stride;
};

Operand operand(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT((t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.stride(-1) == 1,
                        "sketch: operand layout");
  const int64_t ld = t.size(-2) > 1 ? t.stride(-2) : std::max<int64_t>(t.size(-1), 1);
  return {t.data_ptr(), ld, t.dim() == 3 ? t.stride(0) : 0};
}

// Sets the handle's math mode (TF32 tensor cores or strict fp32) for one call, then restores it.
class MathMode {
 public:
  MathMode(cublasHandle_t handle, bool tf32) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &previous_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  }
  ~MathMode() { cublasSetMathMode(handle_, previous_); }
  MathMode(const MathMode&) = delete;
  MathMode& operator=(const MathMode&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t previous_;
};

// C_b = op(A_b) op(B_b) for row-major operands of one type (fp32 or fp64), as the column-major
// C^T = op(B)^T op(A)^T. TF32 applies to fp32 only.
void gemm_rowmajor(const at::Tensor& A_in, bool ta, const at::Tensor& B_in, bool tb, const at::Tensor& C, bool tf32) {
  if (C.numel() == 0) return;
  const at::Tensor A = blas_ready(A_in), B = blas_ready(B_in);
  const Operand a = operand(A), b = operand(B), c = operand(C);
  const int64_t M = C.size(-2), N = C.size(-1), K = ta ? A.size(-2) : A.size(-1);
  const int64_t batch = C.dim() == 3 ? C.size(0) : 1;
  const bool fp64 = C.scalar_type() == at::kDouble;
  const float alpha32 = 1.0f, beta32 = 0.0f;
  const double alpha64 = 1.0, beta64 = 0.0;
  const cudaDataType type = fp64 ? CUDA_R_64F : CUDA_R_32F;
  const cublasComputeType_t compute = fp64 ? CUBLAS_COMPUTE_64F : tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const MathMode mode(handle, tf32 && !fp64);
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(N, "N"), as_int(M, "M"),
      as_int(K, "K"), fp64 ? static_cast<const void*>(&alpha64) : &alpha32, b.ptr, type, as_int(b.ld, "ldb"),
      b.batch_stride, a.ptr, type, as_int(a.ld, "lda"), a.batch_stride, fp64 ? static_cast<const void*>(&beta64) : &beta32,
      c.ptr, type, as_int(c.ld, "ldc"), c.batch_stride, as_int(batch, "batch"), compute, CUBLAS_GEMM_DEFAULT));
}

// Row-major H (n x n): copy its upper triangle onto its lower one.
template <typename T>
__global__ void mirror_upper_kernel(T* __restrict__ H, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n && c < r) H[r * n + c] = H[c * n + r];
}

// Row-major H (n x n): its upper triangle += that of S (another type), then mirrored onto the lower
// one, exactly what the same-type path (SYRKX into H, then mirror_upper_kernel) computes.
template <typename TS, typename TH>
__global__ void add_upper_mirrored_kernel(const TS* __restrict__ S, TH* __restrict__ H, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n && c >= r && c < n) {
    const TH v = H[r * n + c] + static_cast<TH>(S[r * n + c]);
    H[r * n + c] = v;
    H[c * n + r] = v;
  }
}

constexpr unsigned kTileX = 32, kTileY = 8;
dim3 square_grid(int64_t n) {
  return dim3(static_cast<unsigned>((n + kTileX - 1) / kTileX), static_cast<unsigned>((n + kTileY - 1) / kTileY));
}

// C (n x n, column-major lower = row-major upper) = alpha op(A) op(B)^T + beta C in A's type.
void syrkx(cublasHandle_t handle, bool trans, int64_t n, int64_t K, const Operand& a, const Operand& b,
           const at::Tensor& C, bool accumulate) {
  const cublasOperation_t op = trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ni = as_int(n, "n"), ki = as_int(K, "K"), lda = as_int(a.ld, "lda"), ldb = as_int(b.ld, "ldb");
  if (C.scalar_type() == at::kDouble) {
    const double alpha = 1.0, beta = accumulate ? 1.0 : 0.0;
    TORCH_CUDABLAS_CHECK(cublasDsyrkx(handle, CUBLAS_FILL_MODE_LOWER, op, ni, ki, &alpha,
                                      static_cast<const double*>(a.ptr), lda, static_cast<const double*>(b.ptr), ldb,
                                      &beta, C.data_ptr<double>(), ni));
  } else {
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    TORCH_CUDABLAS_CHECK(cublasSsyrkx(handle, CUBLAS_FILL_MODE_LOWER, op, ni, ki, &alpha,
                                      static_cast<const float*>(a.ptr), lda, static_cast<const float*>(b.ptr), ldb,
                                      &beta, C.data_ptr<float>(), ni));
  }
}

struct CudaBlas {
  static void gemm_batched(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C, bool tf32) {
    gemm_rowmajor(A, ta, B, tb, C, tf32);
  }

  // H += A^T B (aat = false, A and B are K x n) or A B^T (aat = true, n x K), a product known to be
  // symmetric. cuBLAS SYRKX with the column-major LOWER triangle fills the row-major upper one, which
  // a kernel then mirrors (H of the operands' type, updated in place) or adds and mirrors (H of the
  // other type, through a buffer of the operands' type).
  static void syrkx_acc(const at::Tensor& A_in, const at::Tensor& B_in, bool aat, const at::Tensor& H, bool tf32) {
    if (H.numel() == 0) return;
    const at::Tensor A = blas_ready(A_in), B = blas_ready(B_in);
    const int64_t n = H.size(0), K = aat ? A.size(1) : A.size(0);
    const bool same = H.scalar_type() == A.scalar_type();
    at::Tensor target = same ? H : at::empty(H.sizes(), H.options().dtype(A.scalar_type()));
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    {
      const MathMode mode(handle, tf32 && A.scalar_type() == at::kFloat);
      syrkx(handle, /*trans=*/aat, n, K, operand(A), operand(B), target, /*accumulate=*/same);
    }
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid = square_grid(n), block(kTileX, kTileY);
    if (same) {
      AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "mirror_upper", [&] {
        mirror_upper_kernel<scalar_t><<<grid, block, 0, stream>>>(H.data_ptr<scalar_t>(), n);
      });
    } else if (H.scalar_type() == at::kDouble) {
      add_upper_mirrored_kernel<float, double><<<grid, block, 0, stream>>>(target.data_ptr<float>(), H.data_ptr<double>(), n);
    } else {
      add_upper_mirrored_kernel<double, float><<<grid, block, 0, stream>>>(target.data_ptr<double>(), H.data_ptr<float>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void sketch_b_update_cuda(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                          const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32,
                          std::string_view contraction) {
  const c10::cuda::CUDAGuard guard(X.device());
  sketch_b_update_impl<CudaBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32, contraction);
}

void sketch_a_update_cuda(const at::Tensor& X, const at::Tensor& G, std::optional<at::Tensor> H_in,
                          std::optional<at::Tensor> H_out, const std::optional<at::Tensor>& P_in,
                          const std::optional<at::Tensor>& P_out, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(X.device());
  sketch_a_update_impl<CudaBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32);
}

void input_moment_update_cuda(const at::Tensor& X, at::Tensor& H, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(X.device());
  input_moment_update_impl<CudaBlas>(X, H, allow_tf32);
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) {
  m.impl("sketch_b_update", &sketch_b_update_cuda);
  m.impl("sketch_a_update", &sketch_a_update_cuda);
  m.impl("input_moment_update", &input_moment_update_cuda);
}

}  // namespace yaqa
