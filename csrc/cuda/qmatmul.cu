// Quantized matmul on CUDA: y = x W_hat^T with W_hat = (codes - z) * s decoded from the packed codes.
// Small batches (decode, up to kSmallBatch tokens): a GEMV with one warp per output row; each lane decodes 8
// codes at a time from their B bytes (read once from global memory, coalesced across the warp) and multiplies
// them into one accumulator per token, then the warp reduces with shuffles. Larger batches: rows are dequantized a
// tile at a time into x's dtype (fp16 / bf16: cuBLAS tensor cores with fp32 accumulation; fp32 / fp64 as is) and
// multiplied by at::mm, so the weight is never materialised whole. The optional RHT around the product uses the
// CUDA Hadamard transform. Current stream, device guard, no host synchronisation. The E8P weight (e8p_matmul) takes
// the same two paths, each block staging the 8 KB pattern table in shared memory and decoding one 8-weight unit
// per thread. The trellis weight (trellis_matmul) too: each weight's L-bit state read from its unit's stream (at most
// 4 bytes, never past the unit), its value from the state table through the read-only cache.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../ops.h"
#include "../e8p.h"
#include "../qmatmul.h"
#include "../trellis.h"

namespace yaqa {
namespace {

constexpr int kSmallBatch = 16;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kTileRows = 4096;

struct PackedArgs {
  const uint8_t* codes;
  int64_t m, n, bits, group_size, row_bytes;
  int64_t s_stride, z_stride;  // 0 when one row of scales / zeros serves every row
};

// The 8 codes of chunk c of a row (8 * c .. 8 * c + 7), B bits each, little-endian from byte c * B.
__device__ __forceinline__ uint64_t chunk_bits(const uint8_t* row, int64_t c, int64_t bits) {
  uint64_t v = 0;
  const uint8_t* p = row + c * bits;
  for (int64_t b = 0; b < bits; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
  return v;
}

template <typename acc_t>
__global__ void int_gemv_kernel(PackedArgs w, const acc_t* __restrict__ x, const acc_t* __restrict__ scales,
                                const acc_t* __restrict__ zeros, acc_t* __restrict__ y, int T) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= w.m) return;
  const uint8_t* codes = w.codes + row * w.row_bytes;
  const acc_t* s = scales + row * w.s_stride;
  const acc_t* z = zeros + row * w.z_stride;
  const uint64_t mask = (uint64_t{1} << w.bits) - 1;
  const int n = static_cast<int>(w.n), gs = static_cast<int>(w.group_size);  // < 2^31 (a row of a real layer)
  acc_t acc[kSmallBatch];
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) acc[t] = acc_t(0);
  const int64_t chunks = (w.n + 7) / 8;
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint64_t v = chunk_bits(codes, c, w.bits);
    const int col0 = static_cast<int>(c) * 8;
    int g = col0 / gs, next = (g + 1) * gs;  // one division per chunk; the group advances within it
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int col = col0 + k;
      if (col >= n) break;
      while (col >= next) ++g, next += gs;
      const acc_t value = (static_cast<acc_t>((v >> (k * w.bits)) & mask) - z[g]) * s[g];
#pragma unroll
      for (int t = 0; t < kSmallBatch; ++t) {
        if (t < T) acc[t] += value * x[t * w.n + col];
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) {
    if (t >= T) break;
    acc_t sum = acc[t];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) y[t * w.m + row] = sum;
  }
}

// Rows [j0, j0 + rows) of W_hat into tile (rows x n) in out_t: one thread per 8-code chunk, the values computed
// in fp64 for an fp64 tile, else in fp32 (s_t: the scales' type, the same as the arithmetic's).
template <typename out_t, typename s_t>
__global__ void dequantize_tile_kernel(PackedArgs w, const s_t* __restrict__ scales, const s_t* __restrict__ zeros,
                                       int64_t j0, int64_t rows, out_t* __restrict__ tile) {
  const int64_t chunks = (w.n + 7) / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * chunks) return;
  const int64_t r = idx / chunks, c = idx % chunks, row = j0 + r;
  const uint64_t v = chunk_bits(w.codes + row * w.row_bytes, c, w.bits);
  const uint64_t mask = (uint64_t{1} << w.bits) - 1;
  const s_t* s = scales + row * w.s_stride;
  const s_t* z = zeros + row * w.z_stride;
  const int n = static_cast<int>(w.n), gs = static_cast<int>(w.group_size), col0 = static_cast<int>(c) * 8;
  int g = col0 / gs, next = (g + 1) * gs;
  for (int k = 0; k < 8; ++k) {
    const int col = col0 + k;
    if (col >= n) break;
    while (col >= next) ++g, next += gs;
    tile[r * w.n + col] = static_cast<out_t>((static_cast<s_t>((v >> (k * w.bits)) & mask) - z[g]) * s[g]);
  }
}

// x as (T, n) in the compute type; with an RHT, the transformed input x S_U Had_n^T.
at::Tensor rht_input(const at::Tensor& x, int64_t n, at::ScalarType ct, const std::optional<at::Tensor>& sign_in,
                     const std::optional<at::Tensor>& had_in) {
  const at::Tensor flat = x.reshape({-1, n}).to(ct);
  return (sign_in.has_value() ? hadamard_transform_cuda(flat * sign_in->to(ct), had_in) : flat).contiguous();
}

// y (T, m) in the compute type, with an RHT y Had_m S_V, as x's dtype and shape (..., m).
at::Tensor rht_output(at::Tensor y, const at::Tensor& x, at::ScalarType ct, const std::optional<at::Tensor>& sign_out,
                      const std::optional<at::Tensor>& had_out) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = y.size(1);
  if (sign_out.has_value()) y = hadamard_transform_cuda(y, had_out).mul_(sign_out->to(ct));
  return y.to(x.scalar_type()).view(out_shape);
}

// The packed E8P weight (csrc/e8p.h): `bits` little-endian bytes per unit of 8 weights.
struct E8PArgs {
  const uint8_t* codes;
  int64_t m, n, bits, stages, s_stride;  // s_stride 0 when one row of scales serves every row
  const float* grid;                     // (256, 8) patterns, device memory
  const int32_t* parity;                 // (256)
};

__device__ __forceinline__ uint32_t e8p_code(const uint8_t* row, int64_t unit, int64_t bits) {
  uint32_t v = 0;
  const uint8_t* p = row + unit * bits;
  for (int64_t b = 0; b < bits; ++b) v |= static_cast<uint32_t>(p[b]) << (8 * b);
  return v;
}

// The pattern table and parities staged in shared memory by the whole block (8 KB + 1 KB).
__device__ __forceinline__ void stage_e8p_tables(const E8PArgs& w, float* grid, int32_t* parity) {
  for (int i = threadIdx.x; i < kE8PPatterns * 8; i += blockDim.x) grid[i] = w.grid[i];
  for (int i = threadIdx.x; i < kE8PPatterns; i += blockDim.x) parity[i] = w.parity[i];
  __syncthreads();
}

// Stage 1 and stage 2 values (v2 zero for 2 bits) of one unit's code.
__device__ __forceinline__ void e8p_unit_values(uint32_t code, int64_t bits, const float* grid, const int32_t* parity,
                                                float* v1, float* v2) {
  e8p_decode(code & 0xffffu, grid, parity, v1);
  if (bits == 4) {
    e8p_decode(code >> 16, grid, parity, v2);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v2[k] = bits == 3 ? ((code >> (16 + k)) & 1u ? -1.0f : 1.0f) : 0.0f;
  }
}

// GEMV for up to kSmallBatch tokens: one warp per output row, each lane decoding one unit (8 weights) at a time
// from the shared-memory tables; y = s1 <v1, x> + s2 <v2, x> after a shuffle reduction.
template <typename acc_t>
__global__ void e8p_gemv_kernel(E8PArgs w, const acc_t* __restrict__ x, const acc_t* __restrict__ scales,
                                acc_t* __restrict__ y, int T) {
  __shared__ float grid[kE8PPatterns * 8];
  __shared__ int32_t parity[kE8PPatterns];
  stage_e8p_tables(w, grid, parity);
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= w.m) return;
  const uint8_t* codes = w.codes + row * (w.n / 8) * w.bits;
  acc_t a1[kSmallBatch], a2[kSmallBatch];
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) a1[t] = a2[t] = acc_t(0);
  for (int64_t c = lane; c < w.n / 8; c += 32) {
    float v1[8], v2[8];
    e8p_unit_values(e8p_code(codes, c, w.bits), w.bits, grid, parity, v1, v2);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#pragma unroll
      for (int t = 0; t < kSmallBatch; ++t) {
        if (t < T) {
          const acc_t xv = x[t * w.n + c * 8 + k];
          a1[t] += static_cast<acc_t>(v1[k]) * xv;
          a2[t] += static_cast<acc_t>(v2[k]) * xv;
        }
      }
    }
  }
  const acc_t* s = scales + row * w.s_stride;
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) {
    if (t >= T) break;
    acc_t sum = s[0] * a1[t] + (w.stages == 2 ? s[1] * a2[t] : acc_t(0));
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) y[t * w.m + row] = sum;
  }
}

// Rows [j0, j0 + rows) of W_hat = s1 v1 + s2 v2 into tile (rows x n) in out_t: one thread per unit.
template <typename out_t, typename s_t>
__global__ void e8p_dequantize_tile_kernel(E8PArgs w, const s_t* __restrict__ scales, int64_t j0, int64_t rows,
                                           out_t* __restrict__ tile) {
  __shared__ float grid[kE8PPatterns * 8];
  __shared__ int32_t parity[kE8PPatterns];
  stage_e8p_tables(w, grid, parity);
  const int64_t units = w.n / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * units) return;
  const int64_t r = idx / units, c = idx % units, row = j0 + r;
  float v1[8], v2[8];
  e8p_unit_values(e8p_code(w.codes + row * units * w.bits, c, w.bits), w.bits, grid, parity, v1, v2);
  const s_t* s = scales + row * w.s_stride;
  const s_t s2 = w.stages == 2 ? s[1] : s_t(0);
#pragma unroll
  for (int k = 0; k < 8; ++k) tile[r * w.n + c * 8 + k] = static_cast<out_t>(s[0] * v1[k] + s2 * v2[k]);
}

// The packed trellis weight (csrc/trellis.h): per 16 x 16 unit (row blocks of units, row-major) its symbols as a
// k-bit little-endian stream of unit_bytes bytes; weight t of a unit (row t / 16, column t % 16) has the L-bit
// state at bit k t of the stream.
struct TrellisArgs {
  const uint8_t* codes;
  int64_t m, n, bits, L, unit_bytes;
  const float* table;  // (2^L) state values, device memory
};

// The unscaled value of weight (row, col): its unit's bytes from bit k t to bit k t + L - 1 (at most 4 bytes; state t
// covers stream symbols t .. t + p, inside a stream with start symbols, wrapping around a tail-biting one of exactly
// unit_bytes = 32 k bytes), shifted and masked, then looked up.
__device__ __forceinline__ float trellis_value(const TrellisArgs& w, int64_t row, int64_t col) {
  const int64_t unit = (row / 16) * (w.n / 16) + col / 16, t = (row % 16) * 16 + col % 16;
  const uint8_t* stream = w.codes + unit * w.unit_bytes;
  const int64_t bit = w.bits * t, first = bit / 8, last = (bit + w.L - 1) / 8;
  uint32_t v = 0;
  for (int64_t b = first; b <= last; ++b) {
    v |= static_cast<uint32_t>(stream[b < w.unit_bytes ? b : b - w.unit_bytes]) << (8 * (b - first));
  }
  return __ldg(w.table + ((v >> (bit % 8)) & ((1u << w.L) - 1u)));
}

// GEMV for up to kSmallBatch tokens: one warp per output row, lane l decoding the row's weights l, l + 32, ...
// (coalesced reads of x), each the fp32 product value * scale (exactly the rounding's W_hat, also for fp64 x).
template <typename acc_t>
__global__ void trellis_gemv_kernel(TrellisArgs w, const acc_t* __restrict__ x, const float* __restrict__ scales,
                                    acc_t* __restrict__ y, int T) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= w.m) return;
  acc_t acc[kSmallBatch];
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) acc[t] = acc_t(0);
  const float s = scales[row];
  for (int64_t col = lane; col < w.n; col += 32) {
    const acc_t v = static_cast<acc_t>(trellis_value(w, row, col) * s);
#pragma unroll
    for (int t = 0; t < kSmallBatch; ++t) {
      if (t < T) acc[t] += v * x[t * w.n + col];
    }
  }
#pragma unroll
  for (int t = 0; t < kSmallBatch; ++t) {
    if (t >= T) break;
    acc_t sum = acc[t];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) y[t * w.m + row] = sum;
  }
}

// Rows [j0, j0 + rows) of W_hat (value times the row's scale, in fp32: the rounding's W_hat) into tile (rows x n):
// one thread per weight.
template <typename out_t>
__global__ void trellis_dequantize_tile_kernel(TrellisArgs w, const float* __restrict__ scales, int64_t j0,
                                               int64_t rows, out_t* __restrict__ tile) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * w.n) return;
  const int64_t r = idx / w.n, col = idx % w.n;
  tile[idx] = static_cast<out_t>(trellis_value(w, j0 + r, col) * scales[j0 + r]);
}

}  // namespace

at::Tensor int_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size,
                           const std::optional<at::Tensor>& sign_in, const std::optional<at::Tensor>& had_in,
                           const std::optional<at::Tensor>& sign_out, const std::optional<at::Tensor>& had_out) {
  const int64_t n =
      check_int_matmul_args(x, qweight, scales, zeros, bits, group_size, sign_in, had_in, sign_out, had_out);
  const int64_t m = qweight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Compute type: fp64 for fp64 activations, else fp32 (the GEMV); the tile GEMM runs in x's own dtype.
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const int64_t T = xa.size(0);
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(ct).contiguous(), z = zeros.to(ct).contiguous();
  const PackedArgs w{q.data_ptr<uint8_t>(), m, n, bits, group_size, q.size(1),
                     s.size(0) == 1 ? 0 : s.size(1), z.size(0) == 1 ? 0 : z.size(1)};
  at::Tensor y = at::empty({T, m}, xa.options());
  if (T > 0 && T <= kSmallBatch) {
    const unsigned blocks = static_cast<unsigned>((m + kWarpsPerBlock - 1) / kWarpsPerBlock);
    AT_DISPATCH_FLOATING_TYPES(ct, "int_matmul_cuda", [&] {
      int_gemv_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          w, xa.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          static_cast<int>(T));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (T > 0) {
    const auto gemm_t = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) ? x.scalar_type() : ct;
    const at::Tensor xg = xa.to(gemm_t);
    at::Tensor tile = at::empty({std::min(kTileRows, m), n}, xa.options().dtype(gemm_t));
    const int64_t chunks = (n + 7) / 8;
    for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - j0);
      const unsigned blocks = static_cast<unsigned>((rows * chunks + 255) / 256);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gemm_t, "int_matmul_cuda_tile", [&] {
        using s_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;  // = ct
        dequantize_tile_kernel<scalar_t, s_t><<<blocks, 256, 0, stream>>>(w, s.data_ptr<s_t>(), z.data_ptr<s_t>(), j0,
                                                                          rows, tile.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      y.narrow(1, j0, rows).copy_(at::mm(xg, tile.narrow(0, 0, rows).t()));
    }
  }
  return rht_output(y, x, ct, sign_out, had_out);
}

at::Tensor e8p_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& abs_grid, int64_t bits, const std::optional<at::Tensor>& sign_in,
                           const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                           const std::optional<at::Tensor>& had_out) {
  const int64_t n = check_e8p_matmul_args(x, qweight, scales, abs_grid, bits, sign_in, had_in, sign_out, had_out);
  const int64_t m = qweight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const int64_t T = xa.size(0);
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(ct).contiguous();
  const E8PTables tables = e8p_tables(abs_grid);
  const E8PArgs w{q.data_ptr<uint8_t>(), m, n, bits, e8p_stages(bits, "e8p_matmul"), s.size(0) == 1 ? 0 : s.size(1),
                  tables.grid.data_ptr<float>(), tables.parity.data_ptr<int32_t>()};
  at::Tensor y = at::empty({T, m}, xa.options());
  if (T > 0 && T <= kSmallBatch) {
    const unsigned blocks = static_cast<unsigned>((m + kWarpsPerBlock - 1) / kWarpsPerBlock);
    AT_DISPATCH_FLOATING_TYPES(ct, "e8p_matmul_cuda", [&] {
      e8p_gemv_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          w, xa.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), static_cast<int>(T));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (T > 0) {
    const auto gemm_t = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) ? x.scalar_type() : ct;
    const at::Tensor xg = xa.to(gemm_t);
    at::Tensor tile = at::empty({std::min(kTileRows, m), n}, xa.options().dtype(gemm_t));
    for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - j0);
      const unsigned blocks = static_cast<unsigned>((rows * (n / 8) + 255) / 256);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gemm_t, "e8p_matmul_cuda_tile", [&] {
        using s_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;  // = ct
        e8p_dequantize_tile_kernel<scalar_t, s_t><<<blocks, 256, 0, stream>>>(w, s.data_ptr<s_t>(), j0, rows,
                                                                              tile.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      y.narrow(1, j0, rows).copy_(at::mm(xg, tile.narrow(0, 0, rows).t()));
    }
  }
  return rht_output(y, x, ct, sign_out, had_out);
}

at::Tensor trellis_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& table, int64_t bits, const std::optional<at::Tensor>& sign_in,
                               const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                               const std::optional<at::Tensor>& had_out) {
  const int64_t L = check_trellis_matmul_args(x, qweight, scales, table, bits, sign_in, had_in, sign_out, had_out);
  const int64_t m = scales.size(0), n = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const int64_t T = xa.size(0);
  const at::Tensor q = qweight.contiguous(), tab = table.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const TrellisArgs w{q.data_ptr<uint8_t>(), m, n, bits, L, q.size(1), tab.data_ptr<float>()};
  at::Tensor y = at::empty({T, m}, xa.options());
  if (T > 0 && T <= kSmallBatch) {
    const unsigned blocks = static_cast<unsigned>((m + kWarpsPerBlock - 1) / kWarpsPerBlock);
    AT_DISPATCH_FLOATING_TYPES(ct, "trellis_matmul_cuda", [&] {
      trellis_gemv_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          w, xa.data_ptr<scalar_t>(), s.data_ptr<float>(), y.data_ptr<scalar_t>(), static_cast<int>(T));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (T > 0) {
    const auto gemm_t = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) ? x.scalar_type() : ct;
    const at::Tensor xg = xa.to(gemm_t);
    at::Tensor tile = at::empty({std::min(kTileRows, m), n}, xa.options().dtype(gemm_t));
    for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - j0);
      const unsigned blocks = static_cast<unsigned>((rows * n + 255) / 256);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gemm_t, "trellis_matmul_cuda_tile", [&] {
        trellis_dequantize_tile_kernel<scalar_t><<<blocks, 256, 0, stream>>>(w, s.data_ptr<float>(), j0, rows,
                                                                             tile.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      y.narrow(1, j0, rows).copy_(at::mm(xg, tile.narrow(0, 0, rows).t()));
    }
  }
  return rht_output(y, x, ct, sign_out, had_out);
}

TORCH_LIBRARY_IMPL(yaqa, CUDA, m) {
  m.impl("int_matmul", &int_matmul_cuda);
  m.impl("e8p_matmul", &e8p_matmul_cuda);
  m.impl("trellis_matmul", &trellis_matmul_cuda);
}

}  // namespace yaqa
