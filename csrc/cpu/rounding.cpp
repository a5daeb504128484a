// Two-sided LDLQ on the CPU (see rounding.h). Row blocks are rounded bottom-up; each starts from the
// output-side feedback R_i = sum_{i' > i} L_out[i', i]^T G_i', then its tiles are rounded right to
// left with GPTQ-style lazy updates of the input-side feedback: exact within a group of tiles, and
// one GEMM for the columns left of the group once it is done. R_i is built lazily as well. The loop is one
// template over the codebook policy (rounding.h), which rounds each tile unit by unit.
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "../rounding.h"
#include "vector_clones.h"

namespace yaqa {

// The Viterbi search of trellis codes (csrc/trellis.h), its loops over the 2^L states compiled for AVX2 and baseline.
YAQA_VECTOR_CLONES void trellis_viterbi(const float* y, const float* w, int64_t T, int64_t L, int64_t k,
                                        const float* table, TrellisScratch& s, uint8_t* symbols) {
  switch (k) {
    case 1: return trellis_viterbi_k<1>(y, w, T, L, table, s, symbols);
    case 2: return trellis_viterbi_k<2>(y, w, T, L, table, s, symbols);
    case 3: return trellis_viterbi_k<3>(y, w, T, L, table, s, symbols);
    case 4: return trellis_viterbi_k<4>(y, w, T, L, table, s, symbols);
    default: TORCH_CHECK_VALUE(false, "trellis codes: bits must be 1 to 4, got ", k);
  }
}

namespace {

// Rounds W (m x n, contiguous fp32) into W_hat and the codebook's codes cd; L_in / L_out contiguous or undefined.
template <class Codebook>
void ldlq_round_loop(const Codebook& book, const at::Tensor& W, const at::Tensor& L_in, const at::Tensor& L_out,
                     at::Tensor& W_hat, typename Codebook::Code* cd, int64_t td_x, int64_t td_y) {
  static_assert(Codebook::kUnitRows >= 1 && Codebook::kUnitCols >= 1, "a codebook unit has at least one weight");
  check_codebook_tiles<Codebook>(td_x, td_y);
  const int64_t m = W.size(0), n = W.size(1);
  // G = E (I + L_in) for finished row blocks; only needed when there is output-side feedback.
  at::Tensor G = L_out.defined() ? at::zeros({m, n}, W.options()) : at::Tensor();
  const float* w = W.data_ptr<float>();
  const float* lin = L_in.defined() ? L_in.data_ptr<float>() : nullptr;
  float* wh = W_hat.data_ptr<float>();
  std::vector<float> target(td_x * td_y);  // W + feedback of the current tile
  const int64_t n_tiles = n / td_y;
  const int64_t lazy = std::max<int64_t>(1, 128 / td_y);  // tiles per lazy group

  at::Tensor acc = at::empty({td_x, n}, W.options());  // the feedback of the current row block
  at::Tensor err = at::empty({td_x, n}, W.options());  // E of the current row block
  float* a = acc.data_ptr<float>();
  float* e = err.data_ptr<float>();
  // Output-side feedback, lazily by groups of row blocks: one GEMM brings in the rows below the
  // group, and each block adds the blocks of its group below it (small GEMMs), so small tiles do
  // not reread all of G for every block.
  const int64_t row_group = std::max<int64_t>(1, 128 / td_x) * td_x;
  at::Tensor R_group;
  int64_t group_begin = m, group_end = m;
  for (int64_t r0 = m - td_x; r0 >= 0; r0 -= td_x) {
    at::Tensor R;
    if (L_out.defined()) {
      if (r0 < group_begin) {
        group_end = r0 + td_x;
        group_begin = std::max<int64_t>(0, group_end - row_group);
        const int64_t below = m - group_end, rows = group_end - group_begin;
        R_group = below > 0 ? at::mm(L_out.narrow(0, group_end, below).narrow(1, group_begin, rows).t(),
                                     G.narrow(0, group_end, below))
                            : at::zeros({rows, n}, W.options());
      }
      R = R_group.narrow(0, r0 - group_begin, td_x).clone();
      const int64_t within = group_end - r0 - td_x;
      if (within > 0) {
        R.addmm_(L_out.narrow(0, r0 + td_x, within).narrow(1, r0, td_x).t(), G.narrow(0, r0 + td_x, within));
      }
      acc.copy_(R);
    } else {
      acc.zero_();
    }
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
            book.round_unit(target.data() + r * td_y + c, td_y, r0 + r, c0 + c, wh + (r0 + r) * n + c0 + c, n, cd);
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
    if (G.defined()) {  // G_i = E_i (I + L_in) = (acc - R) + E_i
      at::Tensor Gi = G.narrow(0, r0, td_x);
      Gi.copy_(acc).add_(err);
      if (R.defined()) Gi.sub_(R);
    }
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
                                                          int64_t bits, int64_t td_x, int64_t td_y) {
  TrellisRounding r;
  prepare_trellis_rounding(r, W_in, L_in, L_out, scales, table, bits, td_x, td_y);
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
