// Every yaqa operator schema, in one place. Kernels are registered per backend in
// csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
#include <torch/library.h>

TORCH_LIBRARY(yaqa, m) {
  // H (n x n, fp32/fp64, lower triangle read) = L @ blockdiag(D) @ L^T with L unit
  // block-lower-triangular (n x n) and D the (n/b, b, b) diagonal blocks. info (int32, 0-d):
  // 0 success, k > 0 the leading minor of order k is not positive definite, -1 the lower
  // triangle of H holds a NaN or infinity. Never synchronises with the host on CUDA.
  m.def("block_ldl(Tensor H, int block_size) -> (Tensor L, Tensor D, Tensor info)");

  // y = (Had_{2^k} kron had) x / sqrt(n) along the last dimension of x (n = 2^k * c), with had the
  // c x c +-1 factor (fp32; None for c = 1). Same dtype as x, computed in fp32 (fp64 for fp64).
  m.def("hadamard_transform(Tensor x, Tensor? had) -> Tensor");
}
