// Two-sided LDLQ on CUDA (see rounding.h): one launch per anti-diagonal wavefront of tiles, from the
// bottom-right tile to the top-left one; the tiles of a wavefront are independent, one thread
// block each, one thread per tile element. For tile (i, j) a block
//   1. reduces the output-side feedback sum_{i' > i} L_out[i', i]^T G_i'j through shared memory,
//   2. rounds W_ij + G_ij + that feedback with the codebook policy (rounding.h), one thread per codebook unit
//      (a cooperative policy, the trellis' Viterbi search, instead runs each unit on the whole block), writing
//      codes and W_hat,
//   3. adds its error to row block i of G = E (I + L_in): G[i, :c0] += e L_in[j, :c0], G_ij += e.
// Within a wavefront, step 3 of a tile writes columns < c0 + td_y of its own row block, which no
// other tile of that wavefront reads (they read row blocks below theirs at column blocks to the
// right), so the only barriers needed are the kernel boundaries.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

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
  int64_t first;               // this launch's first tile of the wavefront (a cooperative codebook may split it)
  Codebook book;
};

// Bitshift trellis codes (trellis.h) on CUDA: the search of one 16 x 16 unit (trellis_viterbi_k, tail-biting
// included) run by the whole thread block, the 2^L costs of a step in shared memory (thread j takes the groups j,
// j + blockDim, ... of 2^k states that share their successors), each step's choices in a global scratch area per
// block (T 2^(L-k) bytes). The costs round as the CPU's search does (no fused multiply-add) and ties go the same
// way, so both backends choose the same sequence from the same targets.
struct TrellisBlockPolicy {
  static constexpr int64_t kUnitRows = TrellisPolicy::kUnitRows, kUnitCols = TrellisPolicy::kUnitCols;
  static constexpr int kLength = static_cast<int>(TrellisPolicy::kLength);  // a power of 2
  static constexpr bool kCooperative = true;
  static_assert((kLength & (kLength - 1)) == 0 && kLength >= kTrellisWrapWindow, "forward indexes modulo kLength");
  using Code = uint8_t;
  const float* table;   // (2^L) state values
  const float* scales;  // (m)
  int64_t L, k, units_per_row, symbols;
  bool tail_biting;
  uint8_t* back;        // kLength 2^(L - k) choices per block of a launch

  // Shared floats of round_unit_block: targets, weights, two cost rows, and the argmin's per-warp partials.
  static int64_t smem_floats(int64_t L) { return 2 * kLength + 2 * (int64_t{1} << L) + 2 * 32; }
  // Scratch bytes per block.
  C10_HOST_DEVICE int64_t back_bytes() const { return kLength * (int64_t{1} << (L - k)); }

  // The forward pass over targets y[(t + rot) mod T], t < len (as trellis_forward): returns the last cost row.
  template <int K>
  __device__ float* forward(const float* y, const float* w, int rot, int len, float* cost, float* next,
                            uint8_t* back_t, int start_low) const {
    constexpr int Q = 1 << K;
    const int S = 1 << L, J = S >> K, t0 = threadIdx.x, nt = blockDim.x;
    const float y0 = y[rot], w0 = w[rot];
    for (int st = t0; st < S; st += nt) {
      const float d = __fsub_rn(y0, table[st]);
      cost[st] = start_low < 0 || (st & (J - 1)) == start_low ? __fmul_rn(w0, __fmul_rn(d, d)) : INFINITY;
    }
    __syncthreads();
    for (int t = 1; t < len; ++t) {
      const int at = (t + rot) & (kLength - 1);
      const float yt = y[at], wt = w[at];
      for (int j = t0; j < J; j += nt) {  // the first minimum over the group, then its 2^k successors' costs
        const float* c = cost + (j << K);
        float b = c[0];
        int arg = 0;
        for (int q = 1; q < Q; ++q) {
          if (c[q] < b) b = c[q], arg = q;
        }
        back_t[t * J + j] = static_cast<uint8_t>(arg);
        for (int q = 0; q < Q; ++q) {
          const float d = __fsub_rn(yt, table[q * J + j]);
          next[q * J + j] = __fadd_rn(b, __fmul_rn(wt, __fmul_rn(d, d)));
        }
      }
      __syncthreads();
      float* swap = cost;
      cost = next, next = swap;
    }
    return cost;
  }

  // The first state of least cost (every thread gets it): per thread, per warp (shuffles), then across warps.
  __device__ int least_state(const float* cost, float* part) const {
    const int S = 1 << L, t0 = threadIdx.x, nt = blockDim.x;
    int* part_state = reinterpret_cast<int*>(part + 32);
    float best = cost[t0 < S ? t0 : 0];
    int state = t0 < S ? t0 : 0;
    for (int st = t0 + nt; st < S; st += nt) {
      if (cost[st] < best) best = cost[st], state = st;
    }
    for (int off = 16; off > 0; off >>= 1) {
      const float ob = __shfl_down_sync(0xffffffffu, best, off);
      const int os = __shfl_down_sync(0xffffffffu, state, off);
      if (ob < best || (ob == best && os < state)) best = ob, state = os;
    }
    if (t0 % 32 == 0) part[t0 / 32] = best, part_state[t0 / 32] = state;
    __syncthreads();
    if (t0 == 0) {
      for (int i = 1; i < (nt + 31) / 32; ++i) {
        if (part[i] < best || (part[i] == best && part_state[i] < state)) best = part[i], state = part_state[i];
      }
      part_state[0] = state;
    }
    __syncthreads();
    state = part_state[0];
    __syncthreads();
    return state;
  }

  // trellis_viterbi_k on the block: the stream of the unit's targets y, weights w into out.
  template <int K>
  __device__ void search(const float* y, const float* w, float* cost, float* next, float* part, uint8_t* back_t,
                         Code* out) const {
    constexpr int Q = 1 << K, N = static_cast<int>(kTrellisWrapWindow), h = N / 2;
    const int J = (1 << L) >> K;
    int* shared = reinterpret_cast<int*>(part + 32);
    int overlap = -1;
    if (tail_biting) {  // the shared bits: weight 0's state in the best path across the wrap
      int state = least_state(forward<K>(y, w, kLength - h, N, cost, next, back_t, -1), part);
      if (threadIdx.x == 0) {
        for (int t = N - 1; t > h; --t) state = static_cast<int>(trellis_previous(back_t, state, t, J, K));
        shared[0] = state & (J - 1);
      }
      __syncthreads();
      overlap = shared[0];
      __syncthreads();
    }
    const float* last = forward<K>(y, w, 0, kLength, cost, next, back_t, overlap);
    int state = overlap < 0 ? least_state(last, part) : 0;
    if (threadIdx.x == 0) {  // constrained: the last state's top L - k bits are the overlap, (overlap << k) | q
      if (overlap >= 0) state = static_cast<int>(trellis_first_least(last, overlap << K, (overlap << K) + Q));
      trellis_write_stream(back_t, state, kLength, L, K, out);
    }
    __syncthreads();
  }

  // The unit whose top-left weight is (row, col), rounded by every thread of the block together (as round_unit).
  __device__ void round_unit_block(const float* x, int64_t ldx, int64_t row, int64_t col, float* value, int64_t ldv,
                                   Code* codes, float* smem) const {
    float *y = smem, *w = smem + kLength, *cost = w + kLength, *next = cost + (int64_t{1} << L);
    float* part = next + (int64_t{1} << L);
    for (int t = threadIdx.x; t < kLength; t += blockDim.x) {
      const float sr = scales[row + t / kUnitCols];
      y[t] = __fdiv_rn(x[(t / kUnitCols) * ldx + t % kUnitCols], sr);
      w[t] = __fmul_rn(sr, sr);
    }
    __syncthreads();
    Code* out = codes + ((row / kUnitRows) * units_per_row + col / kUnitCols) * symbols;
    uint8_t* back_t = back + blockIdx.x * back_bytes();
    switch (k) {
      case 1: search<1>(y, w, cost, next, part, back_t, out); break;
      case 2: search<2>(y, w, cost, next, part, back_t, out); break;
      case 3: search<3>(y, w, cost, next, part, back_t, out); break;
      default: search<4>(y, w, cost, next, part, back_t, out); break;
    }
    const int64_t p = symbols - kLength;
    for (int t = threadIdx.x; t < kLength; t += blockDim.x) {
      value[(t / kUnitCols) * ldv + t % kUnitCols] =
          __fmul_rn(table[trellis_state(out, t, p, k)], scales[row + t / kUnitCols]);
    }
  }
};

// Whether a policy rounds each unit with the whole block (round_unit_block) rather than one thread per unit.
template <class Codebook, class = void>
struct Cooperative : std::false_type {};
template <class Codebook>
struct Cooperative<Codebook, std::void_t<decltype(Codebook::kCooperative)>> : std::bool_constant<Codebook::kCooperative> {};

template <class Codebook>
__global__ void __launch_bounds__(1024) ldlq_wavefront_kernel(TileArgs<Codebook> p) {  // tiles of up to 1024
  extern __shared__ float smem[];
  const int64_t tx = p.td_x, ty = p.td_y;
  // Tile of this block: i + j == wavefront, i from the largest valid row block downwards.
  const int64_t i_max = p.wavefront < p.m / tx - 1 ? p.wavefront : p.m / tx - 1;
  const int64_t i = i_max - (p.first + blockIdx.x);
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
  if constexpr (Cooperative<Codebook>::value) {
    for (int64_t ur = 0; ur < tx; ur += Codebook::kUnitRows) {
      for (int64_t uc = 0; uc < ty; uc += Codebook::kUnitCols) {
        p.book.round_unit_block(sx + ur * ty + uc, ty, r0 + ur, c0 + uc, sv + ur * ty + uc, ty, p.codes,
                                smem + 2 * tx * ty);
      }
    }
  } else if (t < (tx / Codebook::kUnitRows) * unit_cols) {
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

// Rounds W (m x n, contiguous fp32, on the current device) into W_hat and the codebook's codes. A cooperative
// codebook adds extra_floats of shared memory after the tile's targets and values, and takes at most max_blocks
// tiles per launch (its scratch area per block).
template <class Codebook>
void launch_wavefronts(const Codebook& book, const at::Tensor& W, const at::Tensor& L_in, const at::Tensor& L_out,
                       at::Tensor& W_hat, typename Codebook::Code* codes, int64_t td_x, int64_t td_y,
                       int64_t extra_floats = 0, int64_t max_blocks = std::numeric_limits<int64_t>::max()) {
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
                       std::clamp<int64_t>(kSmemFloats / (td_x + td_y), 1, kMaxChunk), 0, 0, 0,
                       book};
  const int64_t mt = m / td_x, nt = n / td_y;
  const int threads = static_cast<int>(((td_x * td_y + 31) / 32) * 32);
  // td_x * td_y <= 1024 (checked): the targets and values (2 tiles) always fit; the staging area is sized to fit.
  const size_t smem = sizeof(float) * std::max<int64_t>(L_out.defined() ? p.chunk * (td_x + td_y) : 0,
                                                        2 * td_x * td_y + extra_floats);
  if (smem > 48 * 1024) {
    const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK_VALUE(smem <= static_cast<size_t>(optin), "ldlq_round: this codebook needs ", smem,
                      " bytes of shared memory per block and this GPU has ", optin,
                      "; use a smaller trellis (L) or round on the CPU");
    C10_CUDA_CHECK(cudaFuncSetAttribute(ldlq_wavefront_kernel<Codebook>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t w = mt + nt - 2; w >= 0; --w) {
    const int64_t i_lo = std::max<int64_t>(0, w - (nt - 1)), i_hi = std::min<int64_t>(w, mt - 1);
    p.wavefront = w;
    p.n_tiles = i_hi - i_lo + 1;
    for (p.first = 0; p.first < p.n_tiles; p.first += max_blocks) {
      const int64_t blocks = std::min(max_blocks, p.n_tiles - p.first);
      ldlq_wavefront_kernel<Codebook><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
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

std::tuple<at::Tensor, at::Tensor> ldlq_round_trellis_cuda(const at::Tensor& W_in, const std::optional<at::Tensor>& L_in,
                                                           const std::optional<at::Tensor>& L_out,
                                                           const at::Tensor& scales, const at::Tensor& table,
                                                           int64_t bits, int64_t td_x, int64_t td_y, bool tail_biting) {
  const c10::cuda::CUDAGuard guard(W_in.device());
  TrellisRounding r;
  prepare_trellis_rounding(r, W_in, L_in, L_out, scales, table, bits, td_x, td_y, tail_biting);
  const TrellisPolicy& c = r.book;
  TrellisBlockPolicy book{c.table, c.scales, c.L, c.k, c.units_per_row, c.symbols, c.tail_biting, nullptr};
  // The choices of at most 256 MiB of blocks at a time (every tile of a wavefront for L = 12).
  const int64_t tiles = std::min(r.W.size(0) / td_x, r.W.size(1) / td_y);
  const int64_t max_blocks = std::clamp<int64_t>((int64_t{256} << 20) / book.back_bytes(), 1, tiles);
  at::Tensor back = at::empty({max_blocks, book.back_bytes()}, r.W.options().dtype(at::kByte));
  book.back = back.data_ptr<uint8_t>();
  launch_wavefronts(book, r.W, L_in.has_value() ? L_in->contiguous() : at::Tensor(),
                    L_out.has_value() ? L_out->contiguous() : at::Tensor(), r.W_hat, r.codes.data_ptr<uint8_t>(),
                    td_x, td_y, TrellisBlockPolicy::smem_floats(c.L), max_blocks);
  return {r.W_hat, r.codes};
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) {
  m.impl("ldlq_round", &ldlq_round_cuda);
  m.impl("ldlq_round_e8p", &ldlq_round_e8p_cuda);
  m.impl("ldlq_round_trellis", &ldlq_round_trellis_cuda);
}

}  // namespace yaqa
