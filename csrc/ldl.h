// Pieces of the blocked LDL factorisation (ALGORITHMS.md section 5) shared by the backends:
// from the lower Cholesky factor C (H = C C^T) with diagonal blocks C_kk,
//   D_k = C_kk C_kk^T,   L = C blockdiag(C_kk)^{-1}   (unit block-lower-triangular).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace yaqa {

inline void check_block_ldl_args(const at::Tensor& H, int64_t block_size) {
  check_real_float(H, "block_ldl", "H");
  check_square(H, "block_ldl", "H");
  check_no_grad(H, "block_ldl", "H");
  TORCH_CHECK_VALUE(H.size(0) > 0, "block_ldl: H is empty (0 x 0)");
  TORCH_CHECK_VALUE(block_size >= 1, "block_ldl: block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(H.size(0) % block_size == 0, "block_ldl: n = ", H.size(0),
                    " is not divisible by block_size = ", block_size,
                    "; choose a block_size that divides n");
}

// The (n/b, b, b) diagonal blocks of an n x n matrix, as a view.
inline at::Tensor diagonal_blocks(const at::Tensor& A, int64_t b) {
  const int64_t nb = A.size(0) / b;
  return A.view({nb, b, nb, b}).diagonal(0, 0, 2).permute({2, 0, 1});
}

// D_k = C_kk C_kk^T for the (n/b, b, b) diagonal blocks of the Cholesky factor C.
inline at::Tensor diagonal_block_products(const at::Tensor& C, int64_t b) {
  at::Tensor Ckk = diagonal_blocks(C, b);
  return at::bmm(Ckk, Ckk.transpose(1, 2));
}

// Overwrites the diagonal blocks of L with exactly I.
inline void set_identity_diagonal_blocks(at::Tensor& L, int64_t b) {
  diagonal_blocks(L, b).copy_(at::eye(b, L.options()).expand({L.size(0) / b, b, b}));
}

// A 0-d bool tensor: true when the lower triangle of H (all that is read) is finite.
inline at::Tensor lower_triangle_is_finite(const at::Tensor& H) { return at::isfinite(H.tril()).all(); }

}  // namespace yaqa
