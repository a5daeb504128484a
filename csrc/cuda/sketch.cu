// Kronecker-factor accumulation on CUDA: the plan of sketch.h over cuBLAS on the current stream.
// Strided-batched GEMMs form the per-sequence gradients; symmetric products use SYRK (half the
// flops of a GEMM) followed by a kernel that mirrors the computed triangle. fp32 compute, or
// TF32 tensor cores when allow_tf32. Row-major tensors are handed to column-major cuBLAS as
// their transposes.
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

// A row-major fp32 operand with unit column stride: its leading dimension and batch stride.
struct Operand {
  float* ptr;
  int64_t ld;
  int64_t batch_stride;
};

// Makes a 2-D/3-D fp32 operand usable by cuBLAS: unit column stride and a row stride of at
// least one row (column-major: ld >= the number of rows of the transpose).
at::Tensor blas_ready(const at::Tensor& t) {
  const bool ok = t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) >= t.size(-1));
  // clone, not contiguous(): a tensor with a size-1 last dimension can be "contiguous" with any stride.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

Operand operand(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat && t.stride(-1) == 1, "sketch: operand layout");
  const int64_t ld = t.size(-2) > 1 ? t.stride(-2) : std::max<int64_t>(t.size(-1), 1);
  return {t.data_ptr<float>(), ld, t.dim() == 3 ? t.stride(0) : 0};
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

// C_b = beta C_b + op(A_b) op(B_b) for row-major operands, as the column-major C^T = op(B)^T op(A)^T.
void gemm_rowmajor(const at::Tensor& A_in, bool ta, const at::Tensor& B_in, bool tb, const at::Tensor& C, float beta,
                   bool tf32) {
  if (C.numel() == 0) return;
  const at::Tensor A = blas_ready(A_in), B = blas_ready(B_in);
  const Operand a = operand(A), b = operand(B), c = operand(C);
  const int64_t M = C.size(-2), N = C.size(-1), K = ta ? A.size(-2) : A.size(-1);
  const int64_t batch = C.dim() == 3 ? C.size(0) : 1;
  const float alpha = 1.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const MathMode mode(handle, tf32);
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(N, "N"), as_int(M, "M"),
      as_int(K, "K"), &alpha, b.ptr, CUDA_R_32F, as_int(b.ld, "ldb"), b.batch_stride, a.ptr, CUDA_R_32F,
      as_int(a.ld, "lda"), a.batch_stride, &beta, c.ptr, CUDA_R_32F, as_int(c.ld, "ldc"), c.batch_stride,
      as_int(batch, "batch"), tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Row-major H (n x n): copy its upper triangle onto its lower one.
__global__ void mirror_upper_kernel(float* __restrict__ H, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n && c < r) H[r * n + c] = H[c * n + r];
}

// Row-major H (n x n, fp64): its upper triangle += that of S (fp32), then mirrored onto the lower
// one, exactly what the fp32 path (SYRK into H, then mirror_upper_kernel) computes.
__global__ void add_upper_mirrored_kernel(const float* __restrict__ S, double* __restrict__ H, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < n && c >= r && c < n) {
    const double v = H[r * n + c] + static_cast<double>(S[r * n + c]);
    H[r * n + c] = v;
    H[c * n + r] = v;
  }
}

constexpr unsigned kTileX = 32, kTileY = 8;
dim3 square_grid(int64_t n) {
  return dim3(static_cast<unsigned>((n + kTileX - 1) / kTileX), static_cast<unsigned>((n + kTileY - 1) / kTileY));
}

struct CudaBlas {
  static void gemm_batched(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C, bool tf32) {
    gemm_rowmajor(A, ta, B, tb, C, 0.0f, tf32);
  }

  static void gemm_acc(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& H, bool tf32) {
    if (H.scalar_type() == at::kFloat) {
      gemm_rowmajor(A, ta, B, tb, H, 1.0f, tf32);
    } else {
      at::Tensor tmp = at::empty(H.sizes(), H.options().dtype(at::kFloat));
      gemm_rowmajor(A, ta, B, tb, tmp, 0.0f, tf32);
      H.add_(tmp);
    }
  }

  // H += A^T A (aat = false, A is K x n) or A A^T (aat = true, A is n x K). cuBLAS SYRK with the
  // column-major LOWER triangle fills the row-major upper one, which a kernel then mirrors (fp32
  // H, updated in place) or adds and mirrors (fp64 H, through an fp32 buffer).
  static void syrk_acc(const at::Tensor& A_in, bool aat, const at::Tensor& H, bool tf32) {
    if (H.numel() == 0) return;
    const at::Tensor A = blas_ready(A_in);
    const Operand a = operand(A);
    const int64_t n = H.size(0), K = aat ? A.size(1) : A.size(0);
    const bool fp32 = H.scalar_type() == at::kFloat;
    at::Tensor target = fp32 ? H : at::empty(H.sizes(), H.options().dtype(at::kFloat));
    const float alpha = 1.0f, beta = fp32 ? 1.0f : 0.0f;
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    {
      const MathMode mode(handle, tf32);
      TORCH_CUDABLAS_CHECK(cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, aat ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(n, "n"),
                                       as_int(K, "K"), &alpha, a.ptr, as_int(a.ld, "lda"), &beta,
                                       target.data_ptr<float>(), as_int(n, "n")));
    }
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (fp32) {
      mirror_upper_kernel<<<square_grid(n), dim3(kTileX, kTileY), 0, stream>>>(H.data_ptr<float>(), n);
    } else {
      add_upper_mirrored_kernel<<<square_grid(n), dim3(kTileX, kTileY), 0, stream>>>(target.data_ptr<float>(),
                                                                                      H.data_ptr<double>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void sketch_b_update_cuda(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                          const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(X.device());
  sketch_b_update_impl<CudaBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32);
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
