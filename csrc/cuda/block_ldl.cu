// Blocked LDL on CUDA: cuSOLVER potrf on the current stream (its info stays on the device),
// one kernel for the inverses C_kk^{-1} of the diagonal blocks of the Cholesky factor, and
// batched GEMMs. Nothing here waits for the host.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <limits>

#include "../ldl.h"
#include "../ops.h"

namespace yaqa {
namespace {

// cuSOLVER's potrf for each dtype. Called on a row-major matrix with the UPPER fill mode: the
// column-major upper triangle is the row-major lower one, so the buffer, read row-major,
// receives the lower Cholesky factor C with H = C C^T (its upper triangle keeps H's entries).
template <typename T>
struct Potrf;

template <>
struct Potrf<float> {
  static int buffer_size(cusolverDnHandle_t h, int n, float* A) {
    int lwork = 0;
    TORCH_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, n, A, n, &lwork));
    return lwork;
  }
  static void run(cusolverDnHandle_t h, int n, float* A, float* work, int lwork, int* info) {
    TORCH_CUSOLVER_CHECK(cusolverDnSpotrf(h, CUBLAS_FILL_MODE_UPPER, n, A, n, work, lwork, info));
  }
};

template <>
struct Potrf<double> {
  static int buffer_size(cusolverDnHandle_t h, int n, double* A) {
    int lwork = 0;
    TORCH_CUSOLVER_CHECK(cusolverDnDpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, n, A, n, &lwork));
    return lwork;
  }
  static void run(cusolverDnHandle_t h, int n, double* A, double* work, int lwork, int* info) {
    TORCH_CUSOLVER_CHECK(cusolverDnDpotrf(h, CUBLAS_FILL_MODE_UPPER, n, A, n, work, lwork, info));
  }
};

// One thread block per diagonal block K of the (row-major, lower) Cholesky factor C; thread j
// forward-substitutes column j of C_KK^{-1} (it reads only the column it writes).
template <typename scalar_t>
__global__ void diag_block_inverse_kernel(const scalar_t* __restrict__ C, int64_t n, int64_t b,
                                          scalar_t* __restrict__ Ckk_inv) {
  const int64_t K = blockIdx.x;
  const scalar_t* Ck = C + K * b * n + K * b;  // Ck[i * n + k] = C[K*b + i, K*b + k]
  scalar_t* X = Ckk_inv + K * b * b;
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
    for (int64_t i = 0; i < j; ++i) X[i * b + j] = scalar_t(0);
    for (int64_t i = j; i < b; ++i) {
      double s = (i == j) ? 1.0 : 0.0;
      for (int64_t k = j; k < i; ++k) s -= static_cast<double>(Ck[i * n + k]) * static_cast<double>(X[k * b + j]);
      X[i * b + j] = static_cast<scalar_t>(s / static_cast<double>(Ck[i * n + i]));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cuda(const at::Tensor& H, int64_t block_size) {
  check_block_ldl_args(H, block_size);
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t n = H.size(0);
  const int64_t b = block_size;
  const int64_t nb = n / b;
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max(), "block_ldl: n = ", n, " is too large for cuSOLVER potrf");

  at::Tensor C = H.clone(at::MemoryFormat::Contiguous);
  at::Tensor info = at::zeros({}, H.options().dtype(at::kInt));
  at::Tensor Ckk_inv = at::empty({nb, b, b}, H.options());
  cusolverDnHandle_t handle = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(b, 256));

  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "block_ldl_cuda", [&] {
    const int ni = static_cast<int>(n);
    const int lwork = Potrf<scalar_t>::buffer_size(handle, ni, C.data_ptr<scalar_t>());
    at::Tensor work = at::empty({std::max(lwork, 1)}, H.options());
    Potrf<scalar_t>::run(handle, ni, C.data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), lwork, info.data_ptr<int>());
    C.tril_();
    diag_block_inverse_kernel<scalar_t><<<static_cast<unsigned>(nb), threads, 0, stream>>>(
        C.data_ptr<scalar_t>(), n, b, Ckk_inv.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // L = C blockdiag(C_kk)^{-1}: one strided-batched GEMM over the (n x b) column panels of C.
  at::Tensor L = at::bmm(C.view({n, nb, b}).permute({1, 0, 2}), Ckk_inv).permute({1, 0, 2}).reshape({n, n});
  set_identity_diagonal_blocks(L, b);
  at::Tensor status = at::where(lower_triangle_is_finite(H), info, at::full({}, -1, info.options()));
  return {L, diagonal_block_products(C, b), status};
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) { m.impl("block_ldl", &block_ldl_cuda); }

}  // namespace yaqa
