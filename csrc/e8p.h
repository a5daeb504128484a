// The E8P lattice codebook (after QuIP#, arXiv 2402.04396; our construction, see
// python/yaqa_ext/codebooks/e8p.py): 2^16 codewords of 8 weights, each a point of E8 + 1/4:
//   value = sign * a + shift,
// a one of 256 "absolute" patterns (rows of abs_grid: positive half-integer 8-vectors), sign a +-1 pattern whose
// number of negative entries has the pattern's parity (so that sign * a has an even sum: a point of E8's
// half-integer coset), shift +1/4 or -1/4. The 16-bit code: bits 0-7 the pattern, bits 8-14 the signs of entries
// 0-6 (1 = negative; entry 7's sign follows from the parity), bit 15 the shift (0: +1/4, 1: -1/4).
// Residual stages (3 and 4 bits) put a second code at bits 16-31: 8 signs of a +-1 code (3 bits) or a second
// E8P code (4 bits), each stage scaled by its own scale.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "checks.h"

namespace yaqa {

constexpr int64_t kE8PPatterns = 256;

C10_HOST_DEVICE inline int popcount8(uint32_t v) {
  int count = 0;
  for (int k = 0; k < 8; ++k) count += (v >> k) & 1u;
  return count;
}

// The values of a 16-bit E8P code (pattern table g (256 x 8), parity (256) of each pattern).
C10_HOST_DEVICE inline void e8p_decode(uint32_t code, const float* g, const int32_t* parity, float* v) {
  const uint32_t a = code & 255u, low = (code >> 8) & 127u;
  const uint32_t signs = low | (static_cast<uint32_t>((popcount8(low) + parity[a]) & 1) << 7);
  const float shift = (code >> 15) & 1u ? -0.25f : 0.25f;
  for (int k = 0; k < 8; ++k) v[k] = ((signs >> k) & 1u ? -g[a * 8 + k] : g[a * 8 + k]) + shift;
}

// The nearest E8P codeword of y (8 values): its 16-bit code. For each shift and pattern the best signs are those
// of y - shift; if their parity is wrong, the entry whose flip costs least (4 |z_k| a_k) is flipped. Exact over
// the codebook (up to fp32 rounding of the distances).
C10_HOST_DEVICE inline uint32_t e8p_nearest(const float* y, const float* g, const float* norms, const int32_t* parity) {
  float best = INFINITY;
  uint32_t best_code = 0;
  for (uint32_t half = 0; half < 2; ++half) {
    const float shift = half ? -0.25f : 0.25f;
    float az[8], zz = 0.0f;
    uint32_t neg = 0;
    for (int k = 0; k < 8; ++k) {
      const float z = y[k] - shift;
      az[k] = fabsf(z);
      zz += z * z;
      neg |= static_cast<uint32_t>(z < 0.0f) << k;
    }
    const int odd = popcount8(neg) & 1;
    for (uint32_t a = 0; a < kE8PPatterns; ++a) {
      const float* ga = g + a * 8;
      float dot = 0.0f;
      for (int k = 0; k < 8; ++k) dot += az[k] * ga[k];
      float d = zz - 2.0f * dot + norms[a];
      if (d >= best) continue;
      uint32_t signs = neg;
      if (odd != parity[a]) {  // flip the cheapest entry
        float cost = INFINITY;
        int flip = 0;
        for (int k = 0; k < 8; ++k) {
          const float c = az[k] * ga[k];
          if (c < cost) cost = c, flip = k;
        }
        d += 4.0f * cost;
        if (d >= best) continue;
        signs ^= 1u << flip;
      }
      best = d;
      best_code = a | ((signs & 127u) << 8) | (half << 15);
    }
  }
  return best_code;
}

// Validates the pattern table: (256, 8) float32, every entry a positive odd multiple of 1/2, on x's device.
inline void check_e8p_grid(const at::Tensor& abs_grid, const at::Tensor& like, const char* op) {
  TORCH_CHECK_TYPE(abs_grid.scalar_type() == at::kFloat, op, ": abs_grid must be float32, got ",
                   abs_grid.scalar_type());
  TORCH_CHECK_VALUE(abs_grid.dim() == 2 && abs_grid.size(0) == kE8PPatterns && abs_grid.size(1) == 8, op,
                    ": abs_grid must be the (256, 8) E8P pattern table (yaqa_ext.codebooks.e8p_abs_grid()), got ",
                    abs_grid.sizes());
  check_same_device(like, abs_grid, op, "W or x", "abs_grid");
  const at::Tensor twice = abs_grid * 2;
  TORCH_CHECK_VALUE((twice > 0).logical_and_(at::fmod(twice, 2) == 1).all().item<bool>(), op,
                    ": abs_grid entries must be positive half-integers (1/2, 3/2, ...); pass "
                    "yaqa_ext.codebooks.e8p_abs_grid()");
}

// Per pattern: the squared norm and the parity of a codeword's number of negative entries.
struct E8PTables {
  at::Tensor grid, norms, parity;
};

inline E8PTables e8p_tables(const at::Tensor& abs_grid) {
  const at::Tensor g = abs_grid.contiguous();
  const at::Tensor half_sum = (g * 2).sum(1).div(2);  // sum of the odd numbers 2 a_k, halved: an integer
  return {g, (g * g).sum(1).contiguous(), at::fmod(half_sum, 2).to(at::kInt).contiguous()};
}

inline int64_t e8p_stages(int64_t bits, const char* op) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 4, op, ": the E8P codebook has 2, 3 or 4 bits per weight, got ", bits);
  return bits == 2 ? 1 : 2;
}

}  // namespace yaqa
