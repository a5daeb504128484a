// The packed weights of yaqa_ext's quantized layers (scalar grid, E8P): argument checks shared by the backends.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "checks.h"
#include "e8p.h"
#include "trellis.h"

namespace yaqa {

// An activation x (..., n): a float dtype and a non-empty last dimension.
inline void check_activation(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
}

// The optional random Hadamard transform around the product: sign vectors (float32, +-1, of x's n / the
// output's m entries) and small Hadamard factors (checked by the transform). A factor needs its sign vector.
inline void check_matmul_rht(const at::Tensor& x, int64_t m, const std::optional<at::Tensor>& sign_in,
                             const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                             const std::optional<at::Tensor>& had_out, const char* op) {
  for (const auto& [sign, had, size, name, side] :
       {std::tuple{&sign_in, &had_in, x.size(-1), "sign_in", "x's last dimension n"},
        std::tuple{&sign_out, &had_out, m, "sign_out", "the output's m"}}) {
    TORCH_CHECK_VALUE(sign->has_value() || !had->has_value(), op, ": a Hadamard factor was given without ", name,
                      "; pass the RHT's sign vector with it");
    if (!sign->has_value()) continue;
    const at::Tensor& s = **sign;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == size, op, ": ", name, " must be a vector of ", side, " = ", size,
                      " signs, got shape ", s.sizes());
    check_same_device(x, s, op, "x", name);
    check_no_grad(s, op, name);
  }
}


// Validates int_matmul's arguments (the RHT's too); returns n (x's last dimension, the weight's columns).
inline int64_t check_int_matmul_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                     const std::optional<at::Tensor>& sign_in, const std::optional<at::Tensor>& had_in,
                                     const std::optional<at::Tensor>& sign_out, const std::optional<at::Tensor>& had_out) {
  constexpr const char* op = "int_matmul";
  check_activation(x, op);
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(group_size >= 1 && n % group_size == 0, op, ": group_size = ", group_size,
                    " must divide x's last dimension n = ", n);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  const int64_t row_bytes = (n + 7) / 8 * bits;
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) == row_bytes, op,
                    ": qweight must be (m, ceil(n / 8) * bits) = (m, ", row_bytes, ") for n = ", n, " and ", bits,
                    " bits, got ", qweight.sizes());
  const int64_t m = qweight.size(0), groups = n / group_size;
  for (const auto& [p, name] : {std::pair{&scales, "scales"}, std::pair{&zeros, "zeros"}}) {
    TORCH_CHECK_TYPE(p->scalar_type() == at::kHalf || p->scalar_type() == at::kFloat, op, ": ", name,
                     " must be float16 or float32, got ", p->scalar_type());
    TORCH_CHECK_VALUE(p->dim() == 2 && (p->size(0) == 1 || p->size(0) == m) && p->size(1) == groups, op, ": ", name,
                      " must be (1 or m = ", m, ", n / group_size = ", groups, "), got ", p->sizes());
    check_same_device(x, *p, op, "x", name);
    check_no_grad(*p, op, name);
  }
  check_same_device(x, qweight, op, "x", "qweight");
  check_no_grad(x, op, "x");
  check_matmul_rht(x, m, sign_in, had_in, sign_out, had_out, op);
  return n;
}

// Validates e8p_matmul's arguments (the RHT's too); returns n.
inline int64_t check_e8p_matmul_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& abs_grid, int64_t bits, const std::optional<at::Tensor>& sign_in,
                                     const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                                     const std::optional<at::Tensor>& had_out) {
  constexpr const char* op = "e8p_matmul";
  check_activation(x, op);
  const int64_t stages = e8p_stages(bits, op);
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(n % 8 == 0, op, ": E8P codes 8 columns jointly; x's last dimension n = ", n,
                    " must be a multiple of 8");
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) == n / 8 * bits, op,
                    ": qweight must be (m, n / 8 * bits) = (m, ", n / 8 * bits, ") for n = ", n, " and ", bits,
                    " bits, got ", qweight.sizes());
  const int64_t m = qweight.size(0);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, op,
                   ": scales must be float16 or float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 2 && (scales.size(0) == 1 || scales.size(0) == m) && scales.size(1) == stages, op,
                    ": scales must be (1 or m = ", m, ", stages = ", stages, "), got ", scales.sizes());
  for (const auto& [t, name] : {std::pair{&qweight, "qweight"}, std::pair{&scales, "scales"}}) {
    check_same_device(x, *t, op, "x", name);
    check_no_grad(*t, op, name);
  }
  check_e8p_grid(abs_grid, x, op);
  check_no_grad(x, op, "x");
  check_matmul_rht(x, m, sign_in, had_in, sign_out, had_out, op);
  return n;
}

// Validates trellis_matmul's arguments (the RHT's too); returns L. m is scales' rows.
inline int64_t check_trellis_matmul_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                         const at::Tensor& table, int64_t bits,
                                         const std::optional<at::Tensor>& sign_in,
                                         const std::optional<at::Tensor>& had_in,
                                         const std::optional<at::Tensor>& sign_out,
                                         const std::optional<at::Tensor>& had_out) {
  constexpr const char* op = "trellis_matmul";
  check_activation(x, op);
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 4, op, ": bits must be in 1..4, got ", bits);
  const int64_t L = check_trellis_table(table, x, bits, op);
  const int64_t n = x.size(-1);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, op,
                   ": scales must be float16 or float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) > 0 && scales.size(1) == 1, op,
                    ": scales must be (m, 1), got ", scales.sizes());
  const int64_t m = scales.size(0);
  TORCH_CHECK_VALUE(n % 16 == 0 && m % 16 == 0, op, ": trellis codes 16 x 16 units: x's last dimension n = ", n,
                    " and m = ", m, " must be multiples of 16");
  // A unit's stream: 256 + (L - bits) / bits symbols, or 256 when tail-biting (its states wrap around).
  const int64_t unit_bytes = (256 + (L - bits) / bits + 7) / 8 * bits, tail_biting_bytes = 32 * bits;
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) == (m / 16) * (n / 16) &&
                        (qweight.size(1) == unit_bytes || qweight.size(1) == tail_biting_bytes),
                    op, ": qweight must be ((m / 16) (n / 16), ceil(symbols / 8) bits) = (", (m / 16) * (n / 16), ", ",
                    unit_bytes, ") or, tail-biting, (", (m / 16) * (n / 16), ", ", tail_biting_bytes, "), got ",
                    qweight.sizes());
  for (const auto& [t, name] : {std::pair{&qweight, "qweight"}, std::pair{&scales, "scales"}}) {
    check_same_device(x, *t, op, "x", name);
    check_no_grad(*t, op, name);
  }
  check_no_grad(x, op, "x");
  check_matmul_rht(x, m, sign_in, had_in, sign_out, had_out, op);
  return L;
}

}  // namespace yaqa
