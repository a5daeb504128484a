// Two-sided LDLQ adaptive rounding (ALGORITHMS.md section 6), pieces shared by the backends.
//
// W (m x n) is cut into td_x x td_y tiles (rows = outputs, columns = inputs). With E = W - W_hat over
// the tiles already rounded, tile (i, j) is rounded as
//   W_hat_ij = Q(W_ij + [E L_in]_ij + [L_out^T E]_ij + [L_out^T E L_in]_ij),
// using only the strictly block-lower parts of L_in (td_y blocks) and L_out (td_x blocks); an absent
// factor is the identity (no feedback on that side; both absent: round to nearest). Tile
// (i, j) depends exactly on the tiles below and to the right of it, so any order that respects
// that (row blocks bottom-up on the CPU, anti-diagonal wavefronts on CUDA) gives the same result.
// Both backends keep G = E (I + L_in) for the rounded tiles, so the feedback of tile (i, j) is
// G_ij + sum_{i' > i} L_out[i', i]^T G_i'j: O(mn(m + n)) work in all.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace yaqa {

// Codebook policies. The rounding loops (CPU and CUDA) are written once over a policy, the way sketch.h is
// written over a BLAS policy: a policy codes kUnitRows x kUnitCols weights jointly and provides
//   round_unit(x, ldx, row, col, value, ldv, codes): the nearest codeword of the unit whose top-left weight is
//     (row, col), from the targets x (row stride ldx); writes its values (row stride ldv) and its code(s) into
//     the codes matrix (one Code per unit, at [row / kUnitRows, col / kUnitCols] of a (m / kUnitRows) x
//     (n / kUnitCols) matrix).
// Values must be exactly what decoding the code gives, so that E = W - W_hat is the true error.

// The scalar INT grid: code = clamp(round_half_even(x / s + z), 0, 2^bits - 1), value = (code - z) * s, with a
// scale s and a zero point z per (row, column group).
struct IntGridPolicy {
  static constexpr int64_t kUnitRows = 1, kUnitCols = 1;
  using Code = uint8_t;
  const float* scales;  // (m, groups)
  const float* zeros;   // (m, groups)
  int64_t n, groups, group_size;
  float max_code;

  C10_HOST_DEVICE void round_unit(const float* x, int64_t /*ldx*/, int64_t row, int64_t col, float* value,
                                  int64_t /*ldv*/, Code* codes) const {
    const int64_t gi = row * groups + col / group_size;
    const float s = scales[gi], z = zeros[gi];
    const float q = fminf(fmaxf(nearbyintf(x[0] / s + z), 0.0f), max_code);
#ifdef __CUDA_ARCH__
    value[0] = __fmul_rn(q - z, s);  // never fused into a caller's subtraction: E = W - W_hat exactly
#else
    value[0] = (q - z) * s;
#endif
    codes[row * n + col] = static_cast<Code>(q);
  }
};

struct RoundingShape {
  int64_t m, n, groups;
};

inline RoundingShape check_ldlq_args(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                     const std::optional<at::Tensor>& L_out,
                                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                                     int64_t group_size, int64_t td_x, int64_t td_y) {
  constexpr const char* op = "ldlq_round";
  TORCH_CHECK_TYPE(W.scalar_type() == at::kFloat, op, ": W must be float32, got ", W.scalar_type(),
                   "; convert it with .float() (rounding is done in fp32)");
  TORCH_CHECK_VALUE(W.dim() == 2 && W.numel() > 0, op, ": W must be a non-empty 2-D matrix, got shape ", W.sizes());
  check_no_grad(W, op, "W");
  const int64_t m = W.size(0), n = W.size(1);
  TORCH_CHECK_VALUE(td_x >= 1 && td_y >= 1 && td_x * td_y <= 1024, op, ": tile sizes td_x = ", td_x, ", td_y = ", td_y,
                    " must be >= 1 with td_x * td_y <= 1024");
  TORCH_CHECK_VALUE(m % td_x == 0 && n % td_y == 0, op, ": W is ", m, " x ", n, ", not divisible into ", td_x, " x ",
                    td_y, " tiles; choose td_x dividing m and td_y dividing n");
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK_VALUE(group_size >= 1 && n % group_size == 0, op, ": group_size = ", group_size,
                    " must divide the number of columns n = ", n);
  const int64_t groups = n / group_size;
  // The optional factors: L_in (n x n, W's columns) and L_out (m x m, W's rows).
  for (const auto& [L, size, name, side] :
       {std::tuple{&L_in, n, "L_in", "columns"}, std::tuple{&L_out, m, "L_out", "rows"}}) {
    if (!L->has_value()) continue;
    check_square(**L, op, name);
    TORCH_CHECK_VALUE((*L)->size(0) == size, op, ": ", name, " must be ", size, " x ", size, " (W has ", size, " ", side,
                      "), got ", (*L)->sizes());
    TORCH_CHECK_TYPE((*L)->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", (*L)->scalar_type());
    check_same_device(W, **L, op, "W", name);
    check_no_grad(**L, op, name);
  }
  for (const auto& [t, name] : {std::pair{&scales, "scales"}, std::pair{&zeros, "zeros"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == m && t->size(1) == groups, op, ": ", name, " must be (", m, ", ",
                      groups, ") = (rows, n / group_size), got ", t->sizes());
    check_same_device(W, *t, op, "W", name);
    check_no_grad(*t, op, name);
  }
  TORCH_CHECK_VALUE(at::isfinite(W).all().item<bool>(), op, ": W has NaN or infinite entries");
  TORCH_CHECK_VALUE((scales > 0).logical_and_(at::isfinite(scales)).all().item<bool>(), op,
                    ": scales must be finite and > 0");
  TORCH_CHECK_VALUE(at::isfinite(zeros).all().item<bool>(), op, ": zeros has NaN or infinite entries");
  // Only the strictly block-lower parts are read, but a non-finite entry anywhere means a broken factor.
  for (const auto& [L, name] : {std::pair{&L_in, "L_in"}, std::pair{&L_out, "L_out"}}) {
    TORCH_CHECK_VALUE(!L->has_value() || at::isfinite(**L).all().item<bool>(), op, ": ", name,
                      " has NaN or infinite entries; factor a finite, damped Hessian (yaqa_ext.block_ldl)");
  }
  return {m, n, groups};
}

// The tiles must be made of whole codebook units.
template <class Codebook>
inline void check_codebook_tiles(int64_t td_x, int64_t td_y) {
  TORCH_CHECK_VALUE(td_x % Codebook::kUnitRows == 0 && td_y % Codebook::kUnitCols == 0, "ldlq_round: tiles of ", td_x,
                    " x ", td_y, " are not made of the codebook's ", Codebook::kUnitRows, " x ", Codebook::kUnitCols,
                    " units; choose td_x, td_y multiples of them");
}

// What both backends' INT-grid ldlq_round start from: checked, contiguous inputs, the outputs, the policy.
struct IntGridRounding {
  at::Tensor W, scales, zeros, W_hat, codes;
  IntGridPolicy book;
};

inline IntGridRounding prepare_int_grid_rounding(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                 const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                 const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                                 int64_t td_x, int64_t td_y) {
  const auto [m, n, groups] = check_ldlq_args(W, L_in, L_out, scales, zeros, bits, group_size, td_x, td_y);
  IntGridRounding r{W.contiguous(), scales.contiguous(), zeros.contiguous(), at::Tensor(), at::Tensor(), {}};
  r.W_hat = at::empty({m, n}, r.W.options());
  r.codes = at::empty({m, n}, r.W.options().dtype(at::kByte));
  r.book = IntGridPolicy{r.scales.data_ptr<float>(), r.zeros.data_ptr<float>(), n, groups, group_size,
                         static_cast<float>((1 << bits) - 1)};
  return r;
}

}  // namespace yaqa
