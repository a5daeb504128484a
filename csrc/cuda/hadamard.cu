// Orthonormal Hadamard transform on CUDA: one thread block per row, the row held in shared memory
// (in opmath), the small c x c factor as a dense product, then the fast Walsh-Hadamard butterflies
// over the 2^k factor with one barrier per stage.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../hadamard.h"
#include "../ops.h"

namespace yaqa {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxPerThread = 64;  // n <= kThreads * kMaxPerThread = 65536 (shared memory binds first)

template <typename scalar_t>
__global__ void hadamard_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                const float* __restrict__ H, int64_t n, int64_t c,
                                at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* s = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t row = blockIdx.x;
  const scalar_t* x = in + row * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[i] = static_cast<acc_t>(x[i]);
  __syncthreads();
  if (c > 1) {
    acc_t vals[kMaxPerThread];
    int cnt = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x, ++cnt) {
      const int64_t a = i / c, b = i % c;
      const acc_t* seg = s + a * c;
      acc_t acc = 0;
      for (int64_t k = 0; k < c; ++k) acc += static_cast<acc_t>(H[b * c + k]) * seg[k];
      vals[cnt] = acc;
    }
    __syncthreads();
    cnt = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x, ++cnt) s[i] = vals[cnt];
    __syncthreads();
  }
  const int64_t p = n / c;
  for (int64_t h = 1; h < p; h <<= 1) {
    for (int64_t q = threadIdx.x; q < n / 2; q += blockDim.x) {
      const int64_t b = q % c, t = q / c;
      const int64_t i0 = ((t / h) * 2 * h + t % h) * c + b;
      const int64_t i1 = i0 + h * c;
      const acc_t u = s[i0], v = s[i1];
      s[i0] = u + v;
      s[i1] = u - v;
    }
    __syncthreads();
  }
  scalar_t* y = out + row * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) y[i] = static_cast<scalar_t>(s[i] * scale);
}

}  // namespace

at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& had) {
  const int64_t c = check_hadamard_args(x, had);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = xc.numel() / n;
  if (rows == 0) return out;
  const at::Tensor hc = c > 1 ? had->contiguous() : at::Tensor();
  const int threads = static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(kThreads, ((n / 2 + 31) / 32) * 32)));
  TORCH_CHECK_VALUE(n <= static_cast<int64_t>(threads) * kMaxPerThread, "hadamard_transform: n = ", n,
                    " is above the CUDA kernel's limit of ", kThreads * kMaxPerThread);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_transform_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(n) * sizeof(acc_t);
    TORCH_CHECK_VALUE(smem <= optin, "hadamard_transform: a row of ", n, " elements needs ", smem,
                      " bytes of shared memory, more than the GPU's ", optin, "; use the CPU or split the row");
    auto kernel = hadamard_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), c > 1 ? hc.data_ptr<float>() : nullptr, n, c,
        acc_t(1) / std::sqrt(static_cast<acc_t>(n)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_half_range(xc, out);
  return out;
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) { m.impl("hadamard_transform", &hadamard_transform_cuda); }

}  // namespace yaqa
