// Blocked LDL on the CPU: LAPACK Cholesky (through ATen), then the block assembly of ldl.h.
#include <torch/library.h>

#include "../ldl.h"
#include "../ops.h"

namespace yaqa {

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cpu(const at::Tensor& H, int64_t block_size) {
  check_block_ldl_args(H, block_size);
  const int64_t n = H.size(0);
  const int64_t b = block_size;
  const int64_t nb = n / b;
  auto [C, info] = at::linalg_cholesky_ex(H, /*upper=*/false, /*check_errors=*/false);
  int status = info.item<int>();
  // A NaN or infinity of the lower triangle is reported as such (-1), like the CUDA backend does: LAPACK
  // turns some into a failed minor and factors others (an infinite diagonal) into info 0 with NaN or
  // infinite D. One O(n^2) pass beside the O(n^3) factorisation.
  if (!lower_triangle_is_finite(H).item<bool>()) status = -1;

  at::Tensor D = diagonal_block_products(C, b);
  at::Tensor eye = at::eye(b, H.options()).expand({nb, b, b});
  at::Tensor Ckk_inv = at::linalg_solve_triangular(diagonal_blocks(C, b), eye, /*upper=*/false);
  // C becomes L in place, one block column at a time: only the rows below the diagonal block
  // need work (no second n x n buffer; new pages are the dominant cost of large outputs).
  for (int64_t J = 0; J + 1 < nb; ++J) {
    at::Tensor below = C.narrow(0, (J + 1) * b, n - (J + 1) * b).narrow(1, J * b, b);
    below.copy_(at::mm(below, Ckk_inv[J]));
  }
  set_identity_diagonal_blocks(C, b);
  return {C, D, at::scalar_tensor(status, H.options().dtype(at::kInt))};
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) { m.impl("block_ldl", &block_ldl_cpu); }

}  // namespace yaqa
