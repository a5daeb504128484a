// Two-sided LDLQ on CUDA (see rounding.h): one launch per anti-diagonal wavefront of tiles, from the
// bottom-right tile to the top-left one; the tiles of a wavefront are independent, one thread
// block each, one thread per tile element. For tile (i, j) a block
//   1. reduces the output-side feedback sum_{i' > i} L_out[i', i]^T G_i'j through shared memory,
//   2. rounds W_ij + G_ij + that feedback with the codebook policy (rounding.h), one thread per codebook unit,
//      writing codes and W_hat,
//   3. adds its error to row block i of G = E (I + L_in): G[i, :c0] += e L_in[j, :c0], G_ij += e.
// Within a wavefront, step 3 of a tile writes columns < c0 + td_y of its own row block, which no
// other tile of that wavefront reads (they read row blocks below theirs at column blocks to the
// right), so the only barriers needed are the kernel boundaries.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "../rounding.h"

namespace yaqa {
namespace {

constexpr int64_t kMaxChunk = 32;             // rows of L_out / G staged in shared memory per step
constexpr int64_t kSmemFloats = 48 * 1024 / 4;  // stay within the default dynamic shared memory

template <class Codebook>
struct TileArgs {
  const float* W;
  const float* L_in;   // nullptr: no input-side feedback
  const float* L_out;  // nullptr: one-sided
  float* G;
  float* W_hat;
  typename Codebook::Code* codes;
  int64_t m, n, td_x, td_y;
  int64_t chunk;               // rows staged per step of the output-side reduction
  int64_t wavefront, n_tiles;  // tiles on this wavefront have i + j == wavefront
  Codebook book;
};

template <class Codebook>
__global__ void ldlq_wavefront_kernel(TileArgs<Codebook> p) {
  extern __shared__ float smem[];
  const int64_t tx = p.td_x, ty = p.td_y;
  // Tile of this block: i + j == wavefront, i from the largest valid row block downwards.
  const int64_t i_max = p.wavefront < p.m / tx - 1 ? p.wavefront : p.m / tx - 1;
  const int64_t i = i_max - blockIdx.x;
  const int64_t j = p.wavefront - i;
  const int64_t r0 = i * tx, c0 = j * ty;
  const int t = threadIdx.x;
  const int64_t r = t / ty, c = t % ty;  // this thread's element of the tile
  const bool active = t < tx * ty;

  // 1. Output-side feedback: acc = sum_{k >= r0 + tx} L_out[k, r0 + r] * G[k, c0 + c].
  float acc = 0.0f;
  if (p.L_out != nullptr) {
    float* sl = smem;                // chunk x tx
    float* sg = smem + p.chunk * tx;  // chunk x ty
    for (int64_t k0 = r0 + tx; k0 < p.m; k0 += p.chunk) {
      const int64_t rows = p.m - k0 < p.chunk ? p.m - k0 : p.chunk;
      for (int64_t idx = t; idx < rows * tx; idx += blockDim.x)
        sl[idx] = p.L_out[(k0 + idx / tx) * p.m + r0 + idx % tx];
      for (int64_t idx = t; idx < rows * ty; idx += blockDim.x)
        sg[idx] = p.G[(k0 + idx / ty) * p.n + c0 + idx % ty];
      __syncthreads();
      if (active)
        for (int64_t k = 0; k < rows; ++k) acc += sl[k * tx + r] * sg[k * ty + c];
      __syncthreads();
    }
  }

  // 2. The tile's targets into shared memory, rounded one codebook unit per thread; the errors stay in shared
  //    memory for step 3 (in place of the targets).
  float* sx = smem;            // tx x ty targets, then errors (reuses the staging area)
  float* sv = smem + tx * ty;  // tx x ty values
  const int64_t row = r0 + r, col = c0 + c;
  if (active) {
    const float feedback = (p.L_out != nullptr ? p.G[row * p.n + col] + acc : p.G[row * p.n + col]);
    sx[r * ty + c] = p.W[row * p.n + col] + feedback;
  }
  __syncthreads();
  const int64_t unit_cols = ty / Codebook::kUnitCols;
  if (t < (tx / Codebook::kUnitRows) * unit_cols) {
    const int64_t ur = (t / unit_cols) * Codebook::kUnitRows, uc = (t % unit_cols) * Codebook::kUnitCols;
    p.book.round_unit(sx + ur * ty + uc, ty, r0 + ur, c0 + uc, sv + ur * ty + uc, ty, p.codes);
  }
  __syncthreads();
  float* se = sx;
  if (active) {
    const float v = sv[r * ty + c];
    p.W_hat[row * p.n + col] = v;
    se[r * ty + c] = p.W[row * p.n + col] - v;
  }
  __syncthreads();

  // 3. G[r0 + rr, col] += sum_k e[rr, k] L_in[c0 + k, col] for col < c0, and G_ij += e.
  for (int64_t idx = t; idx < tx * (c0 + ty); idx += blockDim.x) {
    const int64_t rr = idx / (c0 + ty), col = idx % (c0 + ty);
    float add;
    if (col < c0) {
      if (p.L_in == nullptr) continue;
      add = 0.0f;
      for (int64_t k = 0; k < ty; ++k) add += se[rr * ty + k] * p.L_in[(c0 + k) * p.n + col];
    } else {
      add = se[rr * ty + (col - c0)];
    }
    p.G[(r0 + rr) * p.n + col] += add;
  }
}

// Rounds W (m x n, contiguous fp32, on the current device) into W_hat and the codebook's codes.
template <class Codebook>
void launch_wavefronts(const Codebook& book, const at::Tensor& W, const at::Tensor& L_in, const at::Tensor& L_out,
                       at::Tensor& W_hat, typename Codebook::Code* codes, int64_t td_x, int64_t td_y) {
  check_codebook_tiles<Codebook>(td_x, td_y);
  const int64_t m = W.size(0), n = W.size(1);
  at::Tensor G = at::zeros({m, n}, W.options());
  TileArgs<Codebook> p{W.data_ptr<float>(),
                       L_in.defined() ? L_in.data_ptr<float>() : nullptr,
                       L_out.defined() ? L_out.data_ptr<float>() : nullptr,
                       G.data_ptr<float>(),
                       W_hat.data_ptr<float>(),
                       codes,
                       m, n, td_x, td_y,
                       std::clamp<int64_t>(kSmemFloats / (td_x + td_y), 1, kMaxChunk), 0, 0,
                       book};
  const int64_t mt = m / td_x, nt = n / td_y;
  const int threads = static_cast<int>(((td_x * td_y + 31) / 32) * 32);
  // td_x * td_y <= 1024 (checked): the targets and values (2 tiles) always fit; the staging area is sized to fit.
  const size_t smem =
      sizeof(float) * std::max<int64_t>(L_out.defined() ? p.chunk * (td_x + td_y) : 0, 2 * td_x * td_y);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t w = mt + nt - 2; w >= 0; --w) {
    const int64_t i_lo = std::max<int64_t>(0, w - (nt - 1)), i_hi = std::min<int64_t>(w, mt - 1);
    p.wavefront = w;
    p.n_tiles = i_hi - i_lo + 1;
    ldlq_wavefront_kernel<Codebook><<<static_cast<unsigned>(p.n_tiles), threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ldlq_round_cuda(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in_t,
                                                   const std::optional<at::Tensor>& L_out_t, const at::Tensor& scales_t,
                                                   const at::Tensor& zeros_t, int64_t bits, int64_t group_size,
                                                   int64_t td_x, int64_t td_y) {
  const c10::cuda::CUDAGuard guard(W_in.device());
  IntGridRounding r = prepare_int_grid_rounding(W_in, L_in_t, L_out_t, scales_t, zeros_t, bits, group_size, td_x, td_y);
  launch_wavefronts(r.book, r.W, L_in_t.has_value() ? L_in_t->contiguous() : at::Tensor(),
                    L_out_t.has_value() ? L_out_t->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<uint8_t>(),
                    td_x, td_y);
  return {r.W_hat, r.codes};
}

std::tuple<at::Tensor, at::Tensor> ldlq_round_e8p_cuda(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in,
                                                       const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                       const at::Tensor& abs_grid, int64_t bits, int64_t td_x,
                                                       int64_t td_y) {
  const c10::cuda::CUDAGuard guard(W_in.device());
  E8PRounding r = prepare_e8p_rounding(W_in, L_in, L_out, scales, abs_grid, bits, td_x, td_y);
  launch_wavefronts(r.book, r.W, L_in.has_value() ? L_in->contiguous() : at::Tensor(),
                    L_out.has_value() ? L_out->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<int32_t>(),
                    td_x, td_y);
  return {r.W_hat, r.codes};
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) {
  m.impl("ldlq_round", &ldlq_round_cuda);
  m.impl("ldlq_round_e8p", &ldlq_round_e8p_cuda);
}

}  // namespace yaqa
