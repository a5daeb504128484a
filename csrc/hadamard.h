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
  }
  const int64_t n = x.size(-1);
  const int64_t p = n / c;
  TORCH_CHECK_VALUE(n % c == 0 && (p & (p - 1)) == 0, "hadamard_transform: the last dimension of x (", n,
                    ") must be 2^k times the order of had (", c, ")");
  return c;
}

}  // namespace yaqa
