// Argument checks for the Hadamard transform, shared by the backends.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace yaqa {

// Validates x (..., n) and the optional small factor had (c x c, fp32); returns c (1 if none).
// n must be 2^k * c.
inline int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& had) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "hadamard_transform: x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "hadamard_transform: x must have a non-empty last dimension, got shape ",
                    x.sizes());
  int64_t c = 1;
  if (had.has_value()) {
    check_square(*had, "hadamard_transform", "had");
    TORCH_CHECK_TYPE(had->scalar_type() == at::kFloat, "hadamard_transform: had must be float32, got ", had->scalar_type());
    check_same_device(x, *had, "hadamard_transform", "x", "had");
    c = had->size(0);
    TORCH_CHECK_VALUE(c >= 1, "hadamard_transform: had is empty (0 x 0); pass None for no small factor");
  }
  const int64_t n = x.size(-1);
  const int64_t p = n / c;
  TORCH_CHECK_VALUE(n % c == 0 && (p & (p - 1)) == 0, "hadamard_transform: the last dimension of x (", n,
                    ") must be 2^k times the order of had (", c, ")");
  return c;
}

// float16 holds |y| <= 65504: a transform of a finite float16 x that does not fit (the rows' opmath
// results were fine) is an error, not silent infinities. One reduction, and only for float16.
inline void check_half_range(const at::Tensor& x, const at::Tensor& out) {
  if (out.scalar_type() != at::kHalf) return;
  TORCH_CHECK_VALUE(!(out.isinf().any().item<bool>() && x.isfinite().all().item<bool>()),
                    "hadamard_transform: the transform of this float16 x exceeds float16's range (|y| > 65504); pass x "
                    "as float32 or bfloat16");
}

// Whether hadamard_rows takes a small factor of order c (1: none): only the orders whose block product keeps its
// sums in registers. For the larger ones (108 - 172) it is slower than the GEMM path even for one row (measured:
// 11008 = 64 x 172, one row, 179 us against 75 us).
inline bool hadamard_rows_fits(int64_t c) {
  return c == 1 || c == 12 || c == 20 || c == 28 || c == 36 || c == 52 || c == 60;
}

// CPU: rows x n of x (contiguous, float or double) into out: out_r = Had (x_r * before) * after, the same transform
// as hadamard_transform with the small factor had (c x c, nullptr when c = 1; hadamard_rows_fits(c)); before /
// after are optional sign vectors (nullptr: none). For a few rows (csrc/cpu/hadamard.cpp); out may be x itself.
template <typename acc_t>
void hadamard_rows(const acc_t* x, acc_t* out, int64_t rows, int64_t n, const float* had, int64_t c,
                   const acc_t* before, const acc_t* after);

}  // namespace yaqa
