// Two-sided LDLQ on the CPU (see rounding.h). Row blocks are rounded bottom-up; each starts from the
// output-side feedback R_i = sum_{i' > i} L_out[i', i]^T G_i', then its tiles are rounded right to
// left with GPTQ-style lazy updates of the input-side feedback: exact within a group of tiles, and
// one GEMM for the columns left of the group once it is done. R_i is built lazily as well. The loop is one
// template over the codebook policy (rounding.h), which rounds each tile unit by unit.
//
// No multiply-add is contracted in this file, whatever the target or flags (-march=native, aarch64): the values
// (W - W_hat) and the trellis search's costs must round as CUDA's unfused __fmul_rn / __fadd_rn do, so that both
// backends choose the same codes from the same targets.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "../rounding.h"

namespace yaqa {

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 without FMA: the search's costs must round as the scalar loop's do (an FMA would contract
// best + w * d * d and change which sequence wins on some units).
#define YAQA_AVX2 __attribute__((target("avx2")))
#define YAQA_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

// trellis_best_predecessors with AVX2, 8 groups of Q = 2^K consecutive costs at a time: the groups transposed so
// that vector q holds element q of each group (natural group order after `order`), then the first minimum over q
// (a later q only if strictly lower: the scalar rule). K = 4 first halves each group (q and q + 8, the lower q on
// ties) and then needs the index on ties across the halves' survivors. Groups beyond a multiple of 8: scalar.
template <int K>
struct TrellisAvx2Best {
  YAQA_AVX2_INLINE static __m256 natural_k1(__m256 x) {  // [g0 g1 g4 g5 | g2 g3 g6 g7] -> g0 .. g7
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(x), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  YAQA_AVX2_INLINE static void transpose8(__m256* v) {  // v[i][q] -> v[q][i]
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int q = 0; q < 4; ++q) {
      v[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
      v[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
    }
  }
  YAQA_AVX2 void operator()(const float* cost, int64_t J, float* best, uint8_t* back) const {
    constexpr int Q = 1 << K, R = K == 4 ? 8 : Q;  // R: candidate vectors after the transpose
    const int64_t vec_end = J / 8 * 8;
    alignas(32) int32_t arg_out[8];
    for (int64_t j0 = 0; j0 < vec_end; j0 += 8) {
      const float* c = cost + (j0 << K);
      __m256 r[R], idx[R];
      if constexpr (K == 1) {
        const __m256 a = _mm256_loadu_ps(c), b = _mm256_loadu_ps(c + 8);
        r[0] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        r[1] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      } else if constexpr (K == 2) {
        __m256 v[4], t[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(c + 8 * i);
        t[0] = _mm256_unpacklo_ps(v[0], v[1]), t[1] = _mm256_unpackhi_ps(v[0], v[1]);
        t[2] = _mm256_unpacklo_ps(v[2], v[3]), t[3] = _mm256_unpackhi_ps(v[2], v[3]);
        r[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0));
        r[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
        r[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0));
        r[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
      } else if constexpr (K == 3) {
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(c + 8 * i);
        transpose8(r);
      } else {  // each group's halves first: q or q + 8, the lower q on ties
        const __m256 lo_q = _mm256_castsi256_ps(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 hi_q = _mm256_castsi256_ps(_mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
        for (int i = 0; i < 8; ++i) {
          const __m256 lo = _mm256_loadu_ps(c + 16 * i), hi = _mm256_loadu_ps(c + 16 * i + 8);
          const __m256 lower = _mm256_cmp_ps(hi, lo, _CMP_LT_OQ);
          r[i] = _mm256_blendv_ps(lo, hi, lower);
          idx[i] = _mm256_blendv_ps(lo_q, hi_q, lower);
        }
        transpose8(r);
        transpose8(idx);
      }
      if constexpr (K != 4) {
        for (int q = 0; q < R; ++q) idx[q] = _mm256_castsi256_ps(_mm256_set1_epi32(q));
      }
      __m256 b = r[0], arg = idx[0];
      for (int q = 1; q < R; ++q) {
        __m256 lower = _mm256_cmp_ps(r[q], b, _CMP_LT_OQ);
        if constexpr (K == 4) {  // candidates of slots out of q order: equal values go to the lower q
          const __m256i qi = _mm256_castps_si256(idx[q]), ai = _mm256_castps_si256(arg);
          const __m256 tie = _mm256_and_ps(_mm256_cmp_ps(r[q], b, _CMP_EQ_OQ),
                                           _mm256_castsi256_ps(_mm256_cmpgt_epi32(ai, qi)));
          lower = _mm256_or_ps(lower, tie);
        }
        b = _mm256_blendv_ps(b, r[q], lower);
        arg = _mm256_blendv_ps(arg, idx[q], lower);
      }
      if constexpr (K == 1) {
        b = natural_k1(b), arg = natural_k1(arg);
      } else if constexpr (K == 2) {  // [g0 g2 g4 g6 | g1 g3 g5 g7] -> g0 .. g7
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        b = _mm256_permutevar8x32_ps(b, order), arg = _mm256_permutevar8x32_ps(arg, order);
      }
      _mm256_storeu_ps(best + j0, b);
      _mm256_store_si256(reinterpret_cast<__m256i*>(arg_out), _mm256_castps_si256(arg));
      for (int i = 0; i < 8; ++i) back[j0 + i] = static_cast<uint8_t>(arg_out[i]);
    }
    trellis_best_predecessors<K>(cost + (vec_end << K), J - vec_end, best + vec_end, back + vec_end);
  }
};

YAQA_AVX2 void trellis_viterbi_avx2(const float* y, const float* w, int64_t T, int64_t L, int64_t k,
                                    const float* table, TrellisScratch& s, uint8_t* symbols, bool tb) {
  switch (k) {
    case 1: return trellis_viterbi_k<1>(y, w, T, L, table, s, symbols, tb, TrellisAvx2Best<1>{});
    case 2: return trellis_viterbi_k<2>(y, w, T, L, table, s, symbols, tb, TrellisAvx2Best<2>{});
    case 3: return trellis_viterbi_k<3>(y, w, T, L, table, s, symbols, tb, TrellisAvx2Best<3>{});
    default: return trellis_viterbi_k<4>(y, w, T, L, table, s, symbols, tb, TrellisAvx2Best<4>{});
  }
}
#endif

// The Viterbi search of trellis codes (csrc/trellis.h): AVX2 where the CPU has it, else the scalar loops.
void trellis_viterbi(const float* y, const float* w, int64_t T, int64_t L, int64_t k, const float* table,
                     TrellisScratch& s, uint8_t* symbols, bool tb) {
  TORCH_CHECK_VALUE(k >= 1 && k <= 4, "trellis codes: bits must be 1 to 4, got ", k);
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return trellis_viterbi_avx2(y, w, T, L, k, table, s, symbols, tb);
#endif
  switch (k) {
    case 1: return trellis_viterbi_k<1>(y, w, T, L, table, s, symbols, tb);
    case 2: return trellis_viterbi_k<2>(y, w, T, L, table, s, symbols, tb);
    case 3: return trellis_viterbi_k<3>(y, w, T, L, table, s, symbols, tb);
    default: return trellis_viterbi_k<4>(y, w, T, L, table, s, symbols, tb);
  }
}

namespace {

// One row block (rows r0 .. r0 + td_x) of the loop below, its output-side feedback already in acc (td_x x n): tiles
// rounded right to left, the exact input-side feedback within a lazy group of tiles, one GEMM for the columns left
// of the group once it is done; err (td_x x n) ends holding the block's errors E.
template <class Codebook>
void ldlq_round_row_block(const Codebook& book, const float* w, const at::Tensor& L_in, float* wh,
                          typename Codebook::Code* cd, int64_t n, int64_t r0, int64_t td_x, int64_t td_y,
                          at::Tensor& acc, at::Tensor& err, float* target) {
  const float* lin = L_in.defined() ? L_in.data_ptr<float>() : nullptr;
  float* a = acc.data_ptr<float>();
  float* e = err.data_ptr<float>();
  const int64_t n_tiles = n / td_y;
  const int64_t lazy = std::max<int64_t>(1, 128 / td_y);  // tiles per lazy group
  for (int64_t g_end = n_tiles; g_end > 0; g_end -= lazy) {
    const int64_t g_begin = std::max<int64_t>(0, g_end - lazy);
    const int64_t col_begin = g_begin * td_y;
    for (int64_t j = g_end - 1; j >= g_begin; --j) {
      const int64_t c0 = j * td_y;
      for (int64_t r = 0; r < td_x; ++r) {
        for (int64_t c = 0; c < td_y; ++c) target[r * td_y + c] = w[(r0 + r) * n + c0 + c] + a[r * n + c0 + c];
      }
      for (int64_t r = 0; r < td_x; r += Codebook::kUnitRows) {
        for (int64_t c = 0; c < td_y; c += Codebook::kUnitCols) {
          book.round_unit(target + r * td_y + c, td_y, r0 + r, c0 + c, wh + (r0 + r) * n + c0 + c, n, cd);
        }
      }
      // The tile's rows: errors, then the exact update of the columns of this group left of the tile (a row's
      // update only touches its own columns < c0, which no other row of the tile reads).
      for (int64_t r = 0; r < td_x; ++r) {
        const int64_t row = r0 + r;
        for (int64_t c = c0; c < c0 + td_y; ++c) e[r * n + c] = w[row * n + c] - wh[row * n + c];
        // Exact update of the columns of this group left of the tile: acc += e_tile L_in[tile, :].
        float* arow = a + r * n;
        for (int64_t k = c0; lin != nullptr && k < c0 + td_y; ++k) {
          const float ek = e[r * n + k];
          const float* lrow = lin + k * n;
          for (int64_t c = col_begin; c < c0; ++c) arow[c] += ek * lrow[c];
        }
      }
    }
    if (col_begin > 0 && L_in.defined()) {  // the columns left of the group, in one GEMM
      const int64_t width = (g_end - g_begin) * td_y;
      acc.narrow(1, 0, col_begin)
          .addmm_(err.narrow(1, col_begin, width), L_in.narrow(0, col_begin, width).narrow(1, 0, col_begin));
    }
  }
}

// Rounds W (m x n, contiguous fp32) into W_hat and the codebook's codes cd; L_in / L_out contiguous or undefined.
// Without an output-side factor the row blocks are independent and run in parallel (at::parallel_for).
template <class Codebook>
void ldlq_round_loop(const Codebook& book, const at::Tensor& W, const at::Tensor& L_in, const at::Tensor& L_out,
                     at::Tensor& W_hat, typename Codebook::Code* cd, int64_t td_x, int64_t td_y) {
  static_assert(Codebook::kUnitRows >= 1 && Codebook::kUnitCols >= 1, "a codebook unit has at least one weight");
  check_codebook_tiles<Codebook>(td_x, td_y);
  const int64_t m = W.size(0), n = W.size(1);
  const float* w = W.data_ptr<float>();
  float* wh = W_hat.data_ptr<float>();
  if (!L_out.defined()) {
    at::parallel_for(0, m / td_x, 1, [&](int64_t begin, int64_t end) {
      at::Tensor acc = at::empty({td_x, n}, W.options()), err = at::empty({td_x, n}, W.options());
      std::vector<float> target(td_x * td_y);  // W + feedback of the current tile
      for (int64_t b = begin; b < end; ++b) {
        acc.zero_();
        ldlq_round_row_block(book, w, L_in, wh, cd, n, b * td_x, td_x, td_y, acc, err, target.data());
      }
    });
    return;
  }
  // G = E (I + L_in) for finished row blocks: the output-side feedback of the blocks above them.
  at::Tensor G = at::zeros({m, n}, W.options());
  std::vector<float> target(td_x * td_y);
  at::Tensor acc = at::empty({td_x, n}, W.options());  // the feedback of the current row block
  at::Tensor err = at::empty({td_x, n}, W.options());  // E of the current row block
  // Output-side feedback, lazily by groups of row blocks: one GEMM brings in the rows below the
  // group, and each block adds the blocks of its group below it (small GEMMs), so small tiles do
  // not reread all of G for every block.
  const int64_t row_group = std::max<int64_t>(1, 128 / td_x) * td_x;
  at::Tensor R_group;
  int64_t group_begin = m, group_end = m;
  for (int64_t r0 = m - td_x; r0 >= 0; r0 -= td_x) {
    if (r0 < group_begin) {
      group_end = r0 + td_x;
      group_begin = std::max<int64_t>(0, group_end - row_group);
      const int64_t below = m - group_end, rows = group_end - group_begin;
      R_group = below > 0 ? at::mm(L_out.narrow(0, group_end, below).narrow(1, group_begin, rows).t(),
                                   G.narrow(0, group_end, below))
                          : at::zeros({rows, n}, W.options());
    }
    at::Tensor R = R_group.narrow(0, r0 - group_begin, td_x).clone();
    const int64_t within = group_end - r0 - td_x;
    if (within > 0) {
      R.addmm_(L_out.narrow(0, r0 + td_x, within).narrow(1, r0, td_x).t(), G.narrow(0, r0 + td_x, within));
    }
    acc.copy_(R);
    ldlq_round_row_block(book, w, L_in, wh, cd, n, r0, td_x, td_y, acc, err, target.data());
    G.narrow(0, r0, td_x).copy_(acc).add_(err).sub_(R);  // G_i = E_i (I + L_in) = (acc - R) + E_i
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ldlq_round_cpu(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in,
                                                  const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                  const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                                  int64_t td_x, int64_t td_y) {
  IntGridRounding r = prepare_int_grid_rounding(W_in, L_in, L_out, scales, zeros, bits, group_size, td_x, td_y);
  ldlq_round_loop(r.book, r.W, L_in.has_value() ? L_in->contiguous() : at::Tensor(),
                  L_out.has_value() ? L_out->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<uint8_t>(), td_x,
                  td_y);
  return {r.W_hat, r.codes};
}

std::tuple<at::Tensor, at::Tensor> ldlq_round_e8p_cpu(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in,
                                                      const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                      const at::Tensor& abs_grid, int64_t bits, int64_t td_x,
                                                      int64_t td_y) {
  E8PRounding r = prepare_e8p_rounding(W_in, L_in, L_out, scales, abs_grid, bits, td_x, td_y);
  ldlq_round_loop(r.book, r.W, L_in.has_value() ? L_in->contiguous() : at::Tensor(),
                  L_out.has_value() ? L_out->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<int32_t>(), td_x,
                  td_y);
  return {r.W_hat, r.codes};
}

std::tuple<at::Tensor, at::Tensor> ldlq_round_trellis_cpu(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in,
                                                          const std::optional<at::Tensor>& L_out,
                                                          const at::Tensor& scales, const at::Tensor& table,
                                                          int64_t bits, int64_t td_x, int64_t td_y, bool tail_biting) {
  TrellisRounding r;
  prepare_trellis_rounding(r, W_in, L_in, L_out, scales, table, bits, td_x, td_y, tail_biting);
  ldlq_round_loop(r.book, r.W, L_in.has_value() ? L_in->contiguous() : at::Tensor(),
                  L_out.has_value() ? L_out->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<uint8_t>(), td_x,
                  td_y);
  return {r.W_hat, r.codes};
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) {
  m.impl("ldlq_round", &ldlq_round_cpu);
  m.impl("ldlq_round_trellis", &ldlq_round_trellis_cpu);
  m.impl("ldlq_round_e8p", &ldlq_round_e8p_cpu);
}

}  // namespace yaqa
