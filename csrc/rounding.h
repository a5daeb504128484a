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
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>

#include "checks.h"
#include "e8p.h"
#include "trellis.h"

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

// The E8P lattice codebook (e8p.h), 8 weights of a row per unit, with an optional residual stage: each stage
// rounds the remaining error to its nearest codeword times the row's scale of that stage (greedy residual VQ).
// A stage's values are a codeword (quarter-integers up to 11/4 in magnitude) times an fp16 scale, exact in
// fp32, so W_hat = v1 s1 + v2 s2 has one rounding, whichever order or fusion computes it.
struct E8PPolicy {
  static constexpr int64_t kUnitRows = 1, kUnitCols = 8;
  using Code = int32_t;
  const float* grid;       // (256, 8) patterns
  const float* norms;      // (256) their squared norms
  const int32_t* parity;   // (256)
  const float* scales;     // (m, stages)
  int64_t units, stages;   // n / 8 codes per row; 1 or 2 stages
  int64_t bits;            // 2 (E8P), 3 (E8P + signs), 4 (E8P + E8P)

  C10_HOST_DEVICE void round_unit(const float* x, int64_t /*ldx*/, int64_t row, int64_t col, float* value,
                                  int64_t /*ldv*/, Code* codes) const {
    const float* s = scales + row * stages;
    float y[8], v[8];
    for (int k = 0; k < 8; ++k) y[k] = x[k] / s[0];
    uint32_t code = e8p_nearest(y, grid, norms, parity);
    e8p_decode(code, grid, parity, v);
    for (int k = 0; k < 8; ++k) value[k] = v[k] * s[0];
    if (bits == 3) {  // the residual's signs
      uint32_t neg = 0;
      for (int k = 0; k < 8; ++k) {
        const bool below = x[k] - value[k] < 0.0f;
        neg |= static_cast<uint32_t>(below) << k;
        value[k] += below ? -s[1] : s[1];
      }
      code |= neg << 16;
    } else if (bits == 4) {  // the residual's nearest E8P codeword
      for (int k = 0; k < 8; ++k) y[k] = (x[k] - value[k]) / s[1];
      const uint32_t second = e8p_nearest(y, grid, norms, parity);
      e8p_decode(second, grid, parity, v);
      for (int k = 0; k < 8; ++k) value[k] += v[k] * s[1];
      code |= second << 16;
    }
    codes[row * units + col / 8] = static_cast<Code>(code);
  }
};

// Bitshift trellis codes (trellis.h) over 16 x 16 units (T = 256 weights, row-major), one scale per row: the
// Viterbi search minimises the unit's squared error sum_t s_r^2 (x_t / s_r - table[state_t])^2 exactly. The CPU's
// policy, one search per thread; CUDA runs each search on a whole thread block (TrellisBlockPolicy,
// csrc/cuda/rounding.cu), from the same checks and outputs (prepare_trellis_rounding).
struct TrellisPolicy {
  static constexpr int64_t kUnitRows = 16, kUnitCols = 16, kLength = kUnitRows * kUnitCols;
  using Code = uint8_t;
  const float* table;    // (2^L) state values
  const float* scales;   // (m)
  int64_t L, k, units_per_row, symbols;  // symbols per unit: T + (L - k) / k
  bool tail_biting;         // the last (L - k) / k symbols repeat the first ones (trellis_viterbi_k)
  TrellisScratch* scratch;  // one per thread of the op (row blocks may run in parallel), freed when it returns

  void round_unit(const float* x, int64_t ldx, int64_t row, int64_t col, float* value, int64_t ldv,
                  Code* codes) const {
    float y[kLength], w[kLength];
    for (int64_t r = 0; r < kUnitRows; ++r) {
      const float sr = scales[row + r];
      for (int64_t c = 0; c < kUnitCols; ++c) y[r * kUnitCols + c] = x[r * ldx + c] / sr, w[r * kUnitCols + c] = sr * sr;
    }
    Code* out = codes + ((row / kUnitRows) * units_per_row + col / kUnitCols) * symbols;
    trellis_viterbi(y, w, kLength, L, k, table, scratch[at::get_thread_num()], out, tail_biting);
    const int64_t p = symbols - kLength;
    for (int64_t t = 0; t < kLength; ++t) {
      value[(t / kUnitCols) * ldv + t % kUnitCols] = table[trellis_state(out, t, p, k)] * scales[row + t / kUnitCols];
    }
  }
};

struct RoundingShape {
  int64_t m, n, groups;
};

// The checks every codebook's rounding op shares: W, the tiles and the optional factors (op names the op).
inline RoundingShape check_rounding_args(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                         const std::optional<at::Tensor>& L_out, int64_t td_x, int64_t td_y,
                                         const char* op) {
  TORCH_CHECK_TYPE(W.scalar_type() == at::kFloat, op, ": W must be float32, got ", W.scalar_type(),
                   "; convert it with .float() (rounding is done in fp32)");
  TORCH_CHECK_VALUE(W.dim() == 2 && W.numel() > 0, op, ": W must be a non-empty 2-D matrix, got shape ", W.sizes());
  check_no_grad(W, op, "W");
  const int64_t m = W.size(0), n = W.size(1);
  TORCH_CHECK_VALUE(td_x >= 1 && td_y >= 1 && td_x * td_y <= 1024, op, ": tile sizes td_x = ", td_x, ", td_y = ", td_y,
                    " must be >= 1 with td_x * td_y <= 1024");
  TORCH_CHECK_VALUE(m % td_x == 0 && n % td_y == 0, op, ": W is ", m, " x ", n, ", not divisible into ", td_x, " x ",
                    td_y, " tiles; choose td_x dividing m and td_y dividing n");
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
  TORCH_CHECK_VALUE(at::isfinite(W).all().item<bool>(), op, ": W has NaN or infinite entries");
  // Only the strictly block-lower parts are read, but a non-finite entry anywhere means a broken factor.
  for (const auto& [L, name] : {std::pair{&L_in, "L_in"}, std::pair{&L_out, "L_out"}}) {
    TORCH_CHECK_VALUE(!L->has_value() || at::isfinite(**L).all().item<bool>(), op, ": ", name,
                      " has NaN or infinite entries; factor a finite, damped Hessian (yaqa_ext.block_ldl)");
  }
  return {m, n, 0};
}

// A float32 scale-like tensor of an exact shape on W's device, finite (and > 0 when positive).
inline void check_grid_tensor(const at::Tensor& t, const at::Tensor& W, int64_t rows, int64_t cols, bool positive,
                              const char* op, const char* name, const char* shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be (", rows, ", ",
                    cols, ") = ", shape, ", got ", t.sizes());
  check_same_device(W, t, op, "W", name);
  check_no_grad(t, op, name);
  at::Tensor ok = at::isfinite(t);
  if (positive) ok.logical_and_(t > 0);
  TORCH_CHECK_VALUE(ok.all().item<bool>(), op, ": ", name, positive ? " must be finite and > 0" : " has NaN or infinite entries");
}

inline RoundingShape check_ldlq_args(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                     const std::optional<at::Tensor>& L_out,
                                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                                     int64_t group_size, int64_t td_x, int64_t td_y) {
  constexpr const char* op = "ldlq_round";
  const RoundingShape shape = check_rounding_args(W, L_in, L_out, td_x, td_y, op);
  const int64_t m = shape.m, n = shape.n;
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK_VALUE(group_size >= 1 && n % group_size == 0, op, ": group_size = ", group_size,
                    " must divide the number of columns n = ", n);
  const int64_t groups = n / group_size;
  check_grid_tensor(scales, W, m, groups, true, op, "scales", "(rows, n / group_size)");
  check_grid_tensor(zeros, W, m, groups, false, op, "zeros", "(rows, n / group_size)");
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

// What both backends' E8P ldlq_round_e8p start from: checked, contiguous inputs, the outputs, the policy.
struct E8PRounding {
  at::Tensor W, scales, W_hat, codes;
  E8PTables tables;
  E8PPolicy book;
};

inline E8PRounding prepare_e8p_rounding(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                        const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                        const at::Tensor& abs_grid, int64_t bits, int64_t td_x, int64_t td_y) {
  constexpr const char* op = "ldlq_round_e8p";
  const int64_t stages = e8p_stages(bits, op);
  const RoundingShape shape = check_rounding_args(W, L_in, L_out, td_x, td_y, op);
  const int64_t m = shape.m, n = shape.n;
  TORCH_CHECK_VALUE(n % 8 == 0 && td_y % 8 == 0, op, ": E8P codes 8 columns jointly: n (", n, ") and td_y (", td_y,
                    ") must be multiples of 8");
  check_grid_tensor(scales, W, m, stages, true, op, "scales", "(rows, stages)");
  check_e8p_grid(abs_grid, W, op);
  E8PRounding r{W.contiguous(), scales.contiguous(), at::Tensor(), at::Tensor(), e8p_tables(abs_grid), {}};
  r.W_hat = at::empty({m, n}, r.W.options());
  r.codes = at::empty({m, n / 8}, r.W.options().dtype(at::kInt));
  r.book = E8PPolicy{r.tables.grid.data_ptr<float>(), r.tables.norms.data_ptr<float>(),
                     r.tables.parity.data_ptr<int32_t>(), r.scales.data_ptr<float>(), n / 8, stages, bits};
  return r;
}

// What both backends' ldlq_round_trellis start from: checked, contiguous inputs, the outputs, the CPU's policy (its
// scratch memory owned here; CUDA takes its fields).
struct TrellisRounding {
  at::Tensor W, scales, table, W_hat, codes;
  std::vector<TrellisScratch> scratch;
  TrellisPolicy book;
};

inline void prepare_trellis_rounding(TrellisRounding& r, const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                     const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                     const at::Tensor& table, int64_t bits, int64_t td_x, int64_t td_y,
                                     bool tail_biting) {
  constexpr const char* op = "ldlq_round_trellis";
  const RoundingShape shape = check_rounding_args(W, L_in, L_out, td_x, td_y, op);
  const int64_t m = shape.m, n = shape.n;
  constexpr int64_t u = TrellisPolicy::kUnitRows;
  TORCH_CHECK_VALUE(m % u == 0 && n % u == 0 && td_x % u == 0 && td_y % u == 0, op,
                    ": trellis codes 16 x 16 units: m (", m, "), n (", n, "), td_x (", td_x, ") and td_y (", td_y,
                    ") must be multiples of 16");
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 4, op, ": bits must be in 1..4, got ", bits);
  const int64_t L = check_trellis_table(table, W, bits, op);
  TORCH_CHECK_VALUE(at::isfinite(table).all().item<bool>(), op, ": table has NaN or infinite entries");
  check_grid_tensor(scales, W, m, 1, true, op, "scales", "(rows, 1)");
  // The search weighs each weight's squared error by its row's scale squared, which must not underflow to 0.
  TORCH_CHECK_VALUE((scales * scales > 0).all().item<bool>(), op, ": scales must be at least 1e-19 (their squares "
                    "weigh the search's errors), got ", scales.min().item<float>());
  r.W = W.contiguous(), r.scales = scales.contiguous(), r.table = table.contiguous();
  const int64_t symbols = TrellisPolicy::kLength + (L - bits) / bits;
  r.W_hat = at::empty({m, n}, r.W.options());
  r.codes = at::empty({(m / u) * (n / u), symbols}, r.W.options().dtype(at::kByte));
  r.scratch.resize(static_cast<size_t>(at::get_num_threads()));
  r.book = TrellisPolicy{r.table.data_ptr<float>(), r.scales.data_ptr<float>(), L, bits, n / u, symbols,
                         tail_biting, r.scratch.data()};
}

}  // namespace yaqa
