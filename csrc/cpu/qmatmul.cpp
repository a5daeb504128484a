// Quantized matmul on the CPU: y = x W_hat^T with W_hat decoded from the packed codes as it is used.
// Small batches (decode): per output row, the codes are decoded once into an L1-resident buffer and
// dotted with every token, the zero point folded out of the inner loop through per-group sums of x:
//   y[t, j] = sum_g s[j, g] (sum_{i in g} c[j, i] x[t, i] - z[j, g] sum_{i in g} x[t, i]).
// Large batches (prefill): a tile of rows is dequantized at a time and multiplied by a GEMM, so the
// weight is never materialised whole. The fp32 row loops are compiled twice (AVX2 and baseline x86-64, chosen at
// load time); the decode is written per bit width so each compiles to vector shifts. On AVX2 + FMA machines the
// small-batch fp32 path for 1-4 and 8 bits is fused instead: 8 codes at a time are shifted out of one 32-bit word
// (or widened from 8 bytes) straight into a vector register and multiplied into every token's accumulator.
// The E8P weight (e8p_matmul) takes the same two paths: a row's codes are decoded into its stage values (a pattern
// of an 8 KB table, signs, shift) once per row, then dotted with every token and scaled per stage.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define YAQA_FUSED_AVX2 1
#endif

#include "../ops.h"
#include "../e8p.h"
#include "../hadamard.h"
#include "../qmatmul.h"
#include "../trellis.h"
#include "vector_clones.h"

#define YAQA_INLINE inline __attribute__((always_inline))

namespace yaqa {
namespace {

constexpr int64_t kSmallBatch = 16;  // up to this many tokens: the row-by-row decode path
// Trellis rows cost their table gathers, then their dot products: beyond 4 tokens decoded tiles and a GEMM are faster
// (2048 x 2048, one thread: 4 tokens 2.4 ms by rows, 2.7 by tiles; 8 tokens 4.1 by rows, 16 tokens 4.2 by tiles).
constexpr int64_t kTrellisRowBatch = 4;
constexpr int64_t kTokenChunk = 8;   // tokens per pass of the fused path (their accumulators fill the registers)
constexpr int64_t kTileRows = 256;  // the fewest rows dequantized per GEMM on the large-batch paths

// Rows per thread of the small-batch paths: at least 2^19 weights each (a thread's start costs microseconds; a
// 576 x 576 layer at one token is ~30 us of work: measured slower on two threads than on one).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(n, 1)); }

// B <= 4 little-endian bytes as an integer (3 bytes composed by hand: a 3-byte memcpy may become a library call).
template <int B>
YAQA_INLINE uint32_t load_le(const uint8_t* p) {
  if constexpr (B == 3) {
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16;
  } else {
    uint32_t v = 0;
    std::memcpy(&v, p, B);
    return v;
  }
}

struct Packed {
  const uint8_t* codes;
  int64_t m, n, bits, group_size, row_bytes;
};

// A row's codes as acc_t values into out (room for ceil(n / 8) * 8): 8 codes from B bytes at a time.
template <int B, typename acc_t>
YAQA_INLINE void decode_row_bits(const uint8_t* row, int64_t n, acc_t* out) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
  for (int64_t c = 0; c < (n + 7) / 8; ++c) {
    const uint8_t* p = row + c * B;
    acc_t* o = out + c * 8;
    if constexpr (B == 8) {
      for (int k = 0; k < 8; ++k) o[k] = static_cast<acc_t>(p[k]);
    } else if constexpr (B <= 4) {  // 8 codes fit 32 bits: one vector of 32-bit lanes
      uint32_t v = 0;
      std::memcpy(&v, p, B);
      for (int k = 0; k < 8; ++k) o[k] = static_cast<acc_t>(static_cast<int32_t>((v >> (k * B)) & mask));
    } else {
      uint64_t v = 0;
      std::memcpy(&v, p, B);
      for (int k = 0; k < 8; ++k) o[k] = static_cast<acc_t>(static_cast<int32_t>((v >> (k * B)) & mask));
    }
  }
}

template <typename acc_t>
YAQA_INLINE void decode_row(const uint8_t* row, int64_t n, int64_t bits, acc_t* out) {
  switch (bits) {
    case 1: return decode_row_bits<1>(row, n, out);
    case 2: return decode_row_bits<2>(row, n, out);
    case 3: return decode_row_bits<3>(row, n, out);
    case 4: return decode_row_bits<4>(row, n, out);
    case 5: return decode_row_bits<5>(row, n, out);
    case 6: return decode_row_bits<6>(row, n, out);
    case 7: return decode_row_bits<7>(row, n, out);
    default: return decode_row_bits<8>(row, n, out);
  }
}

// sum_i a[i] b[i] with eight independent partial sums (one vector register).
template <typename acc_t>
YAQA_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  }
  acc_t total = 0;
  for (; i < len; ++i) total += a[i] * b[i];
  for (int k = 0; k < 8; ++k) total += part[k];
  return total;
}

struct Grid {  // scales and zero points, acc_t, a row stride of 0 when one row serves all
  const void* s;
  const void* z;
  int64_t s_stride, z_stride;
};

// Rows [begin, end) of y (T x m) for the small-batch path; c is a decode buffer of ceil(n / 8) * 8.
template <typename acc_t>
YAQA_INLINE void dot_rows(const Packed& w, const acc_t* x, const acc_t* xsum, int64_t T, const Grid& grid, acc_t* y,
                          acc_t* c, int64_t begin, int64_t end) {
  const int64_t n = w.n, gs = w.group_size, groups = n / gs;
  for (int64_t j = begin; j < end; ++j) {
    decode_row(w.codes + j * w.row_bytes, n, w.bits, c);
    const acc_t* sj = static_cast<const acc_t*>(grid.s) + j * grid.s_stride;
    const acc_t* zj = static_cast<const acc_t*>(grid.z) + j * grid.z_stride;
    for (int64_t t = 0; t < T; ++t) {
      acc_t acc = 0;
      for (int64_t g = 0; g < groups; ++g) {
        acc += sj[g] * (dot(c + g * gs, x + t * n + g * gs, gs) - zj[g] * xsum[t * groups + g]);
      }
      y[t * w.m + j] = acc;
    }
  }
}

// Rows [begin, end) of the tile starting at row j0, dequantized: (c - z) * s.
template <typename acc_t>
YAQA_INLINE void dequantize_rows(const Packed& w, int64_t j0, const Grid& grid, acc_t* tile, acc_t* c, int64_t begin,
                                 int64_t end) {
  const int64_t n = w.n, gs = w.group_size;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = j0 + r;
    decode_row(w.codes + j * w.row_bytes, n, w.bits, c);
    const acc_t* sj = static_cast<const acc_t*>(grid.s) + j * grid.s_stride;
    const acc_t* zj = static_cast<const acc_t*>(grid.z) + j * grid.z_stride;
    acc_t* row = tile + r * n;
    for (int64_t g = 0; g < n / gs; ++g) {
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) row[i] = (c[i] - zj[g]) * sj[g];
    }
  }
}

// The fp32 loops, compiled per target; fp64 keeps the baseline build (its maths is the point, not speed).
YAQA_VECTOR_CLONES void dot_rows_f32(const Packed& w, const float* x, const float* xsum, int64_t T, const Grid& grid,
                                     float* y, float* c, int64_t begin, int64_t end) {
  dot_rows<float>(w, x, xsum, T, grid, y, c, begin, end);
}
YAQA_VECTOR_CLONES void dequantize_rows_f32(const Packed& w, int64_t j0, const Grid& grid, float* tile, float* c,
                                            int64_t begin, int64_t end) {
  dequantize_rows<float>(w, j0, grid, tile, c, begin, end);
}
void dot_rows_any(const Packed& w, const double* x, const double* xsum, int64_t T, const Grid& grid, double* y,
                  double* c, int64_t begin, int64_t end) {
  dot_rows<double>(w, x, xsum, T, grid, y, c, begin, end);
}

void dequantize_rows_any(const Packed& w, int64_t j0, const Grid& grid, double* tile, double* c, int64_t begin,
                         int64_t end) {
  dequantize_rows<double>(w, j0, grid, tile, c, begin, end);
}

#ifdef YAQA_FUSED_AVX2
// Codes 8c .. 8c + 7 of a row as floats: B bits each, little-endian from byte c * B.
template <int B>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 decode8(const uint8_t* row, int64_t c) {
  if constexpr (B == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c * 8))));
  } else {
    const uint32_t v = load_le<B>(row + c * B);
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts),
                                           _mm256_set1_epi32((1 << B) - 1));
    return _mm256_cvtepi32_ps(codes);
  }
}

__attribute__((target("avx2,fma"), always_inline)) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// Rows [begin, end) of y (T x m), T tokens: y[t, j] = sum_g s[j, g] (sum_{i in g} c[j, i] x[t, i]) - sum_g s z xsum.
// Needs group_size % 8 == 0. U independent partial sums per token keep at least four FMA chains in flight
// (an FMA's latency is ~4 cycles; one chain would stall on every block of 8 weights).
template <int B, int T>
__attribute__((target("avx2,fma"))) void fused_rows(const Packed& w, const float* x, const float* xsum,
                                                    const Grid& grid, float* y, int64_t begin, int64_t end) {
  constexpr int U = T >= 4 ? 1 : 4 / T;
  const int64_t n = w.n, gs = w.group_size, groups = n / gs, blocks = gs / 8;
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* row = w.codes + j * w.row_bytes;
    const float* sj = static_cast<const float*>(grid.s) + j * grid.s_stride;
    const float* zj = static_cast<const float*>(grid.z) + j * grid.z_stride;
    __m256 total[T];
    float shift[T];
    for (int t = 0; t < T; ++t) total[t] = _mm256_setzero_ps(), shift[t] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 part[T][U];
      for (int t = 0; t < T; ++t)
        for (int u = 0; u < U; ++u) part[t][u] = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + U <= blocks; b += U) {
        for (int u = 0; u < U; ++u) {
          const int64_t c = g * blocks + b + u;
          const __m256 codes = decode8<B>(row, c);
          for (int t = 0; t < T; ++t)
            part[t][u] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(x + t * n + c * 8), part[t][u]);
        }
      }
      for (; b < blocks; ++b) {
        const int64_t c = g * blocks + b;
        const __m256 codes = decode8<B>(row, c);
        for (int t = 0; t < T; ++t) part[t][0] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(x + t * n + c * 8), part[t][0]);
      }
      const __m256 s = _mm256_set1_ps(sj[g]);
      for (int t = 0; t < T; ++t) {
        for (int u = 1; u < U; ++u) part[t][0] = _mm256_add_ps(part[t][0], part[t][u]);
        total[t] = _mm256_fmadd_ps(part[t][0], s, total[t]);
        shift[t] += sj[g] * zj[g] * xsum[t * groups + g];
      }
    }
    for (int t = 0; t < T; ++t) y[t * w.m + j] = hsum(total[t]) - shift[t];
  }
}

template <int B>
void fused_rows_tokens(const Packed& w, const float* x, const float* xsum, int64_t T, const Grid& grid, float* y,
                       int64_t begin, int64_t end) {
  switch (T) {
    case 1: return fused_rows<B, 1>(w, x, xsum, grid, y, begin, end);
    case 2: return fused_rows<B, 2>(w, x, xsum, grid, y, begin, end);
    case 3: return fused_rows<B, 3>(w, x, xsum, grid, y, begin, end);
    case 4: return fused_rows<B, 4>(w, x, xsum, grid, y, begin, end);
    case 5: return fused_rows<B, 5>(w, x, xsum, grid, y, begin, end);
    case 6: return fused_rows<B, 6>(w, x, xsum, grid, y, begin, end);
    case 7: return fused_rows<B, 7>(w, x, xsum, grid, y, begin, end);
    default: return fused_rows<B, 8>(w, x, xsum, grid, y, begin, end);
  }
}

// The fused small-batch path if this machine and layout allow it (tokens in chunks of kTokenChunk); false
// otherwise.
bool fused_small_batch(const Packed& w, const float* x, const float* xsum, int64_t T, const Grid& grid, float* y,
                       int64_t begin, int64_t end) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool bits_ok = (w.bits >= 1 && w.bits <= 4) || w.bits == 8;
  if (!avx2 || !bits_ok || w.group_size % 8 != 0) return false;
  const int64_t groups = w.n / w.group_size;
  constexpr int64_t kRowBlock = 32;  // rows whose codes stay in cache while every token chunk reads them
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    for (int64_t t0 = 0; t0 < T; t0 += kTokenChunk) {
      const int64_t chunk = std::min(kTokenChunk, T - t0);
      const float* xc = x + t0 * w.n;
      const float* sc = xsum + t0 * groups;
      float* yc = y + t0 * w.m;
      switch (w.bits) {
        case 1: fused_rows_tokens<1>(w, xc, sc, chunk, grid, yc, r0, r1); break;
        case 2: fused_rows_tokens<2>(w, xc, sc, chunk, grid, yc, r0, r1); break;
        case 3: fused_rows_tokens<3>(w, xc, sc, chunk, grid, yc, r0, r1); break;
        case 4: fused_rows_tokens<4>(w, xc, sc, chunk, grid, yc, r0, r1); break;
        default: fused_rows_tokens<8>(w, xc, sc, chunk, grid, yc, r0, r1); break;
      }
    }
  }
  return true;
}

// Rows [begin, end) of the tile starting at row j0, dequantized with AVX2: 8 codes at a time shifted out of one word
// (decode8) into (c - z) s, the same values as dequantize_rows.
template <int B>
__attribute__((target("avx2,fma"))) void fused_dequantize(const Packed& w, int64_t j0, const Grid& grid, float* tile,
                                                          int64_t begin, int64_t end) {
  const int64_t n = w.n, blocks = w.group_size / 8;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = j0 + r;
    const uint8_t* row = w.codes + j * w.row_bytes;
    const float* sj = static_cast<const float*>(grid.s) + j * grid.s_stride;
    const float* zj = static_cast<const float*>(grid.z) + j * grid.z_stride;
    for (int64_t g = 0; g < n / w.group_size; ++g) {
      const __m256 s = _mm256_set1_ps(sj[g]), z = _mm256_set1_ps(zj[g]);
      for (int64_t c = g * blocks; c < (g + 1) * blocks; ++c) {
        _mm256_storeu_ps(tile + r * n + c * 8, _mm256_mul_ps(_mm256_sub_ps(decode8<B>(row, c), z), s));
      }
    }
  }
}

// The fused tile path if this machine and layout allow it; false otherwise.
bool fused_tile(const Packed& w, int64_t j0, const Grid& grid, float* tile, int64_t begin, int64_t end) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx2 || !((w.bits >= 1 && w.bits <= 4) || w.bits == 8) || w.group_size % 8 != 0) return false;
  switch (w.bits) {
    case 1: fused_dequantize<1>(w, j0, grid, tile, begin, end); break;
    case 2: fused_dequantize<2>(w, j0, grid, tile, begin, end); break;
    case 3: fused_dequantize<3>(w, j0, grid, tile, begin, end); break;
    case 4: fused_dequantize<4>(w, j0, grid, tile, begin, end); break;
    default: fused_dequantize<8>(w, j0, grid, tile, begin, end); break;
  }
  return true;
}
#endif

void dot_rows_any(const Packed& w, const float* x, const float* xsum, int64_t T, const Grid& grid, float* y, float* c,
                  int64_t begin, int64_t end) {
#ifdef YAQA_FUSED_AVX2
  if (fused_small_batch(w, x, xsum, T, grid, y, begin, end)) return;
#endif
  dot_rows_f32(w, x, xsum, T, grid, y, c, begin, end);
}

void dequantize_rows_any(const Packed& w, int64_t j0, const Grid& grid, float* tile, float* c, int64_t begin,
                         int64_t end) {
#ifdef YAQA_FUSED_AVX2
  if (fused_tile(w, j0, grid, tile, begin, end)) return;
#endif
  dequantize_rows_f32(w, j0, grid, tile, c, begin, end);
}

template <typename acc_t>
std::vector<acc_t> group_sums(const acc_t* x, int64_t T, int64_t n, int64_t gs) {
  const int64_t groups = n / gs;
  std::vector<acc_t> out(T * groups, acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) out[t * groups + i / gs] += x[t * n + i];
  }
  return out;
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Up to this many rows the RHT around a product runs through rht_rows (when hadamard_rows_fits its small factor):
// measured per layer call on SmolLM2's shapes, one thread, 1 token ~7 us against ~12 through the batched path, 2
// tokens about even, from 4 tokens the batched path's GEMM is faster.
constexpr int64_t kRhtRows = 2;

bool few_row_rht(int64_t rows, const std::optional<at::Tensor>& had) {
  return rows <= kRhtRows && hadamard_rows_fits(had.has_value() ? had->size(0) : 1);
}

// The RHT of a few rows (see few_row_rht), in place in buf (T x n, the compute type): Had (buf * before) * after.
// hadamard_rows on the raw buffer: at decode the transform is ~1 us, and ATen calls around it cost several.
void rht_rows(at::Tensor& buf, const std::optional<at::Tensor>& had, const std::optional<at::Tensor>& before,
              const std::optional<at::Tensor>& after) {
  const int64_t c = check_hadamard_args(buf, had);
  const auto ct = buf.scalar_type();
  auto as_ct = [&](const std::optional<at::Tensor>& s) {
    return !s.has_value() ? at::Tensor() : (s->scalar_type() == ct ? s->contiguous() : s->to(ct).contiguous());
  };
  const at::Tensor b = as_ct(before), a = as_ct(after);
  const at::Tensor h = had.has_value() ? had->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(ct, "rht_rows", [&] {
    scalar_t* p = buf.data_ptr<scalar_t>();
    hadamard_rows<scalar_t>(p, p, buf.size(0), buf.size(1), h.defined() ? h.data_ptr<float>() : nullptr, c,
                            b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                            a.defined() ? a.data_ptr<scalar_t>() : nullptr);
  });
}

// x as (T, n) in the compute type; with an RHT, the transformed input x S_U Had_n^T.
at::Tensor rht_input(const at::Tensor& x, int64_t n, at::ScalarType ct, const std::optional<at::Tensor>& sign_in,
                     const std::optional<at::Tensor>& had_in) {
  const at::Tensor flat = x.reshape({-1, n});
  if (sign_in.has_value() && few_row_rht(flat.size(0), had_in)) {
    at::Tensor buf = flat.to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();  // a fresh buffer, transformed
    rht_rows(buf, had_in, sign_in, std::nullopt);
    return buf;
  }
  return (sign_in.has_value() ? hadamard_transform_cpu(flat.to(ct) * sign_in->to(ct), had_in) : flat.to(ct)).contiguous();
}

// y (T, m) in the compute type, with an RHT y Had_m S_V, as x's dtype and shape (..., m).
at::Tensor rht_output(at::Tensor y, const at::Tensor& x, at::ScalarType ct, const std::optional<at::Tensor>& sign_out,
                      const std::optional<at::Tensor>& had_out) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = y.size(1);
  if (sign_out.has_value() && few_row_rht(y.size(0), had_out)) {
    rht_rows(y, had_out, std::nullopt, sign_out);  // y is the op's own contiguous buffer
  } else if (sign_out.has_value()) {
    y = hadamard_transform_cpu(y, had_out).mul_(sign_out->to(ct));
  }
  return (y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type())).view(out_shape);
}

// Whether this CPU multiplies fp16 / bf16 natively (AVX512-FP16 / AVX512-BF16): elsewhere PyTorch's half-precision
// GEMM is a generic loop several times slower than the fp32 one.
bool native_half_gemm(at::ScalarType t) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16"), fp16 = __builtin_cpu_supports("avx512fp16");
  return (t == at::kBFloat16 && bf16) || (t == at::kHalf && fp16);
#else
  return false;
#endif
}

// y (T x m) = xa W_hat^T for the large-batch paths: decode(j0, rows, tile) dequantizes rows j0 .. j0 + rows of
// W_hat into tile (a multiple of 16 rows at a time, about 2^21 weights), each tile multiplied by a GEMM, so the
// weight is never materialised whole. The GEMM runs in x's own dtype when that is fp16 / bf16 and the CPU has
// native half-precision products (fp32 accumulation, as nn.Linear runs such a model), else in the compute type.
template <typename scalar_t, class Decode>
void tiled_product(const at::Tensor& xa, at::ScalarType x_type, int64_t m, int64_t n, at::Tensor& y, Decode decode) {
  const bool half = native_half_gemm(x_type);
  const at::Tensor xg = half ? xa.to(x_type) : xa;
  const int64_t tile_rows = std::min(m, std::max(kTileRows, ((int64_t{1} << 21) / n) / 16 * 16));
  at::Tensor tile = at::empty({tile_rows, n}, xa.options());
  for (int64_t j0 = 0; j0 < m; j0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, m - j0);
    decode(j0, rows, tile.data_ptr<scalar_t>());
    const at::Tensor t = tile.narrow(0, 0, rows);
    y.narrow(1, j0, rows).copy_(at::mm(xg, (half ? t.to(x_type) : t).t()));
  }
}

// The packed E8P weight (csrc/e8p.h): per unit of 8 weights `bits` little-endian bytes of its code.
struct E8PPacked {
  const uint8_t* codes;
  int64_t m, n, bits, stages, s_stride;  // s_stride 0 when one row of scales serves every row
  const float* grid;
  const int32_t* parity;
};

// Row j's stage values (without scales) into v1 (and v2 when there are two stages), n each.
template <typename acc_t>
YAQA_INLINE void e8p_decode_row(const E8PPacked& w, int64_t j, acc_t* v1, acc_t* v2) {
  const uint8_t* row = w.codes + j * (w.n / 8) * w.bits;
  float v[8];
  for (int64_t u = 0; u < w.n / 8; ++u) {
    const uint8_t* p = row + u * w.bits;
    uint32_t code = 0;
    for (int64_t b = 0; b < w.bits; ++b) code |= static_cast<uint32_t>(p[b]) << (8 * b);
    e8p_decode(code & 0xffffu, w.grid, w.parity, v);
    for (int k = 0; k < 8; ++k) v1[u * 8 + k] = static_cast<acc_t>(v[k]);
    if (w.bits == 3) {
      for (int k = 0; k < 8; ++k) v2[u * 8 + k] = (code >> (16 + k)) & 1u ? acc_t(-1) : acc_t(1);
    } else if (w.bits == 4) {
      e8p_decode(code >> 16, w.grid, w.parity, v);
      for (int k = 0; k < 8; ++k) v2[u * 8 + k] = static_cast<acc_t>(v[k]);
    }
  }
}

// Rows [begin, end) of y (T x m): y[t, j] = s1_j <v1_j, x_t> + s2_j <v2_j, x_t>; v a buffer of 2n.
template <typename acc_t>
YAQA_INLINE void e8p_dot_rows(const E8PPacked& w, const acc_t* s, const acc_t* x, int64_t T, acc_t* y, acc_t* v,
                              int64_t begin, int64_t end) {
  const int64_t n = w.n;
  for (int64_t j = begin; j < end; ++j) {
    e8p_decode_row(w, j, v, v + n);
    const acc_t* sj = s + j * w.s_stride;
    for (int64_t t = 0; t < T; ++t) {
      acc_t acc = sj[0] * dot(v, x + t * n, n);
      if (w.stages == 2) acc += sj[1] * dot(v + n, x + t * n, n);
      y[t * w.m + j] = acc;
    }
  }
}

// Rows [begin, end) of the tile starting at row j0, dequantized: s1 v1 + s2 v2 (the tile row is v1's buffer).
template <typename acc_t>
YAQA_INLINE void e8p_dequantize_rows(const E8PPacked& w, const acc_t* s, int64_t j0, acc_t* tile, int64_t begin,
                                     int64_t end) {
  const int64_t n = w.n;
  std::vector<acc_t> v2(w.stages == 2 ? n : 0);
  for (int64_t r = begin; r < end; ++r) {
    acc_t* row = tile + r * n;
    e8p_decode_row(w, j0 + r, row, v2.data());
    const acc_t* sj = s + (j0 + r) * w.s_stride;
    for (int64_t i = 0; i < n; ++i) row[i] = w.stages == 2 ? row[i] * sj[0] + v2[i] * sj[1] : row[i] * sj[0];
  }
}

YAQA_VECTOR_CLONES void e8p_dot_rows_f32(const E8PPacked& w, const float* s, const float* x, int64_t T, float* y,
                                         float* v, int64_t begin, int64_t end) {
  e8p_dot_rows<float>(w, s, x, T, y, v, begin, end);
}
YAQA_VECTOR_CLONES void e8p_dequantize_rows_f32(const E8PPacked& w, const float* s, int64_t j0, float* tile,
                                                int64_t begin, int64_t end) {
  e8p_dequantize_rows<float>(w, s, j0, tile, begin, end);
}
#ifdef YAQA_FUSED_AVX2
// Per 8-bit sign pattern, the float sign-bit masks of its 8 entries (XOR flips a value's sign); the two shifts; per
// 7-bit pattern, the parity of its number of ones.
struct E8PSignTables {
  alignas(32) uint32_t masks[256 * 8];
  alignas(32) float shifts[2 * 8];  // +1/4, then -1/4 (chosen by the code's bit 15 without a branch)
  uint8_t odd[128];
  E8PSignTables() {
    for (int k = 0; k < 8; ++k) shifts[k] = 0.25f, shifts[8 + k] = -0.25f;
    for (int p = 0; p < 256; ++p)
      for (int k = 0; k < 8; ++k) masks[p * 8 + k] = (p >> k) & 1 ? 0x80000000u : 0u;
    for (int p = 0; p < 128; ++p) odd[p] = static_cast<uint8_t>(popcount8(static_cast<uint32_t>(p)) & 1);
  }
};

__attribute__((target("avx2,fma"), always_inline)) inline __m256 flip(__m256 v, const E8PSignTables& t, uint32_t signs) {
  return _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.masks + signs * 8))));
}

// The values of the 16-bit E8P code c: pattern, signs (entry 7's from the parity), +-1/4.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 e8p_unit(uint32_t c, const E8PPacked& w,
                                                                          const E8PSignTables& t) {
  const uint32_t a = c & 255u, low = (c >> 8) & 127u;
  const uint32_t signs = low | (static_cast<uint32_t>(t.odd[low] ^ w.parity[a]) << 7);
  const __m256 v = flip(_mm256_loadu_ps(w.grid + a * 8), t, signs);
  return _mm256_add_ps(v, _mm256_load_ps(t.shifts + ((c >> 15) & 1u) * 8));
}

// Rows [begin, end) of y for T tokens: stage 1 and stage 2 values built in registers from an 8 KB pattern table
// and an 8 KB sign-mask table, multiplied into U independent partial sums per token and stage.
template <int B, int T>
__attribute__((target("avx2,fma"))) void e8p_fused_rows(const E8PPacked& w, const float* s, const float* x, float* y,
                                                        int64_t begin, int64_t end) {
  static const E8PSignTables tables;
  constexpr int U = T >= 2 ? 1 : 2;
  const int64_t n = w.n, units = n / 8;
  const __m256 ones = _mm256_set1_ps(1.0f);
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* row = w.codes + j * units * B;
    __m256 p1[T][U], p2[T][U];
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < U; ++u) p1[t][u] = _mm256_setzero_ps(), p2[t][u] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < units; c0 += U) {
      for (int u = 0; u < U && c0 + u < units; ++u) {
        const int64_t c = c0 + u;
        const uint32_t code = load_le<B>(row + c * B);
        const __m256 v1 = e8p_unit(code & 0xffffu, w, tables);
        for (int t = 0; t < T; ++t) p1[t][u] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + t * n + c * 8), p1[t][u]);
        if constexpr (B > 2) {
          const __m256 v2 = B == 3 ? flip(ones, tables, (code >> 16) & 255u) : e8p_unit(code >> 16, w, tables);
          for (int t = 0; t < T; ++t) p2[t][u] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x + t * n + c * 8), p2[t][u]);
        }
      }
    }
    const float* sj = s + j * w.s_stride;
    for (int t = 0; t < T; ++t) {
      for (int u = 1; u < U; ++u) p1[t][0] = _mm256_add_ps(p1[t][0], p1[t][u]), p2[t][0] = _mm256_add_ps(p2[t][0], p2[t][u]);
      y[t * w.m + j] = sj[0] * hsum(p1[t][0]) + (B > 2 ? sj[1] * hsum(p2[t][0]) : 0.0f);
    }
  }
}

template <int B>
void e8p_fused_tokens(const E8PPacked& w, const float* s, const float* x, int64_t T, float* y, int64_t begin,
                      int64_t end) {
  switch (T) {
    case 1: return e8p_fused_rows<B, 1>(w, s, x, y, begin, end);
    case 2: return e8p_fused_rows<B, 2>(w, s, x, y, begin, end);
    case 3: return e8p_fused_rows<B, 3>(w, s, x, y, begin, end);
    default: return e8p_fused_rows<B, 4>(w, s, x, y, begin, end);
  }
}

// The fused small-batch path on AVX2 + FMA machines (tokens in chunks of 4, rows in blocks whose codes stay in
// cache); false elsewhere.
bool e8p_fused_small_batch(const E8PPacked& w, const float* s, const float* x, int64_t T, float* y, int64_t begin,
                           int64_t end) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx2) return false;
  constexpr int64_t kRowBlock = 32, kChunk = 4;
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
      const int64_t chunk = std::min(kChunk, T - t0);
      const float* xc = x + t0 * w.n;
      float* yc = y + t0 * w.m;
      switch (w.bits) {
        case 2: e8p_fused_tokens<2>(w, s, xc, chunk, yc, r0, r1); break;
        case 3: e8p_fused_tokens<3>(w, s, xc, chunk, yc, r0, r1); break;
        default: e8p_fused_tokens<4>(w, s, xc, chunk, yc, r0, r1); break;
      }
    }
  }
  return true;
}

// Rows [begin, end) of the tile starting at row j0, dequantized in registers: s1 v1 + s2 v2.
template <int B>
__attribute__((target("avx2,fma"))) void e8p_fused_dequantize(const E8PPacked& w, const float* s, int64_t j0,
                                                              float* tile, int64_t begin, int64_t end) {
  static const E8PSignTables tables;
  const int64_t n = w.n, units = n / 8;
  const __m256 ones = _mm256_set1_ps(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t j = j0 + r;
    const uint8_t* row = w.codes + j * units * B;
    const __m256 s1 = _mm256_set1_ps(s[j * w.s_stride]);
    const __m256 s2 = _mm256_set1_ps(B > 2 ? s[j * w.s_stride + 1] : 0.0f);
    for (int64_t c = 0; c < units; ++c) {
      const uint32_t code = load_le<B>(row + c * B);
      __m256 v = _mm256_mul_ps(e8p_unit(code & 0xffffu, w, tables), s1);
      if constexpr (B > 2) {
        const __m256 v2 = B == 3 ? flip(ones, tables, (code >> 16) & 255u) : e8p_unit(code >> 16, w, tables);
        v = _mm256_add_ps(v, _mm256_mul_ps(v2, s2));
      }
      _mm256_storeu_ps(tile + r * n + c * 8, v);
    }
  }
}
#endif

void e8p_dot_rows_any(const E8PPacked& w, const float* s, const float* x, int64_t T, float* y, float* v,
                      int64_t begin, int64_t end) {
#ifdef YAQA_FUSED_AVX2
  if (e8p_fused_small_batch(w, s, x, T, y, begin, end)) return;
#endif
  e8p_dot_rows_f32(w, s, x, T, y, v, begin, end);
}
void e8p_dot_rows_any(const E8PPacked& w, const double* s, const double* x, int64_t T, double* y, double* v,
                      int64_t begin, int64_t end) {
  e8p_dot_rows<double>(w, s, x, T, y, v, begin, end);
}
void e8p_dequantize_rows_any(const E8PPacked& w, const float* s, int64_t j0, float* tile, int64_t begin,
                             int64_t end) {
#ifdef YAQA_FUSED_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    switch (w.bits) {
      case 2: return e8p_fused_dequantize<2>(w, s, j0, tile, begin, end);
      case 3: return e8p_fused_dequantize<3>(w, s, j0, tile, begin, end);
      default: return e8p_fused_dequantize<4>(w, s, j0, tile, begin, end);
    }
  }
#endif
  e8p_dequantize_rows_f32(w, s, j0, tile, begin, end);
}
void e8p_dequantize_rows_any(const E8PPacked& w, const double* s, int64_t j0, double* tile, int64_t begin,
                             int64_t end) {
  e8p_dequantize_rows<double>(w, s, j0, tile, begin, end);
}

// The packed trellis weight (csrc/trellis.h): per 16 x 16 unit (row blocks of units, row-major) its symbols as a
// k-bit little-endian stream of unit_bytes bytes (32 k when tail-biting: 256 symbols, the last states wrapping
// around to the first symbols).
struct TrellisPacked {
  const uint8_t* codes;
  int64_t m, n, bits, L, unit_bytes;
  const float* table;
};

// A unit's stream in buf (at least unit_bytes + 8 bytes), followed by its first 8 bytes: a tail-biting stream
// (exactly 256 symbols) continues with its own start, and a stream with start symbols has every state inside itself.
inline void trellis_unit_stream(const TrellisPacked& w, int64_t unit, uint8_t* buf) {
  std::memcpy(buf, w.codes + unit * w.unit_bytes, w.unit_bytes);
  std::memcpy(buf + w.unit_bytes, buf, 8);
}

// Row block rb (rows 16 rb .. 16 rb + 15) of W_hat into out (16 x n): each unit's stream copied into a
// padded buffer, then weight t's state is the L bits at bit k t, its value table[state] * s_row in fp32 (exactly
// the rounding's W_hat).
template <typename acc_t>
void trellis_decode_block(const TrellisPacked& w, const float* scales, int64_t rb, acc_t* out) {
  const int64_t cols = w.n / 16, mask = (int64_t{1} << w.L) - 1;
  uint8_t buf[160] = {0};  // unit_bytes <= ceil((256 + 19) / 8) * 4 = 140, 8 bytes of wrap and 8 of padding
  for (int64_t c = 0; c < cols; ++c) {
    trellis_unit_stream(w, rb * cols + c, buf);
    for (int64_t t = 0; t < 256; ++t) {
      const int64_t bit = t * w.bits;
      uint64_t v = 0;
      std::memcpy(&v, buf + bit / 8, 8);
      const float value = w.table[(v >> (bit % 8)) & mask] * scales[rb * 16 + t / 16];
      out[(t / 16) * w.n + c * 16 + t % 16] = static_cast<acc_t>(value);
    }
  }
}

#ifdef YAQA_FUSED_AVX2
// The states of 8 consecutive weights from bit `bit` of a unit's stream (padded by 8 bytes): one 64-bit word holds
// them all ((k t0) mod 8 + 7 k + L <= 55 bits), each shifted out in a 64-bit lane and masked to L bits.
struct TrellisLanes {
  __m256i shift_lo, shift_hi, mask, low_dwords;
};
__attribute__((target("avx2,fma"))) inline TrellisLanes trellis_lanes(int64_t k, int64_t L) {
  return {_mm256_setr_epi64x(0, k, 2 * k, 3 * k), _mm256_setr_epi64x(4 * k, 5 * k, 6 * k, 7 * k),
          _mm256_set1_epi64x((int64_t{1} << L) - 1), _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)};
}
__attribute__((target("avx2,fma"), always_inline)) inline __m256 trellis_values8(const uint8_t* stream, int64_t bit,
                                                                                const TrellisLanes& c,
                                                                                const float* table) {
  uint64_t word = 0;
  std::memcpy(&word, stream + bit / 8, 8);
  const __m256i base = _mm256_set1_epi64x(static_cast<int64_t>(word >> (bit % 8)));
  const __m256i lo = _mm256_and_si256(_mm256_srlv_epi64(base, c.shift_lo), c.mask);
  const __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(base, c.shift_hi), c.mask);
  const __m256i state = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(lo, c.low_dwords),
                                           _mm256_permutevar8x32_epi32(hi, c.low_dwords), 0xF0);
  return _mm256_i32gather_ps(table, state, 4);
}

// trellis_decode_block for fp32 with AVX2 (the same values as the scalar decode).
__attribute__((target("avx2,fma"))) void trellis_decode_block_avx2(const TrellisPacked& w, const float* scales,
                                                                    int64_t rb, float* out) {
  const int64_t cols = w.n / 16;
  const TrellisLanes lanes = trellis_lanes(w.bits, w.L);
  uint8_t buf[160] = {0};  // unit_bytes <= 140, plus wrap and padding for the last 8-byte reads
  for (int64_t c = 0; c < cols; ++c) {
    trellis_unit_stream(w, rb * cols + c, buf);
    for (int64_t r = 0; r < 16; ++r) {
      const __m256 scale = _mm256_set1_ps(scales[rb * 16 + r]);
      for (int64_t half = 0; half < 2; ++half) {
        const __m256 v = trellis_values8(buf, w.bits * (r * 16 + half * 8), lanes, w.table);
        _mm256_storeu_ps(out + r * w.n + c * 16 + half * 8, _mm256_mul_ps(v, scale));
      }
    }
  }
}

#endif

template <typename acc_t>
void trellis_decode_block_any(const TrellisPacked& w, const float* scales, int64_t rb, acc_t* out) {
#ifdef YAQA_FUSED_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2) return trellis_decode_block_avx2(w, scales, rb, out);
  }
#endif
  trellis_decode_block(w, scales, rb, out);
}

// Rows of row blocks [rb_begin, rb_end) of y (T x m): a block decoded, then each of its rows dotted with every token.
// (Decoding one token's products straight from the stream, without the block, measured no faster: the table
// gathers bound both.)
template <typename acc_t>
YAQA_INLINE void trellis_rows(const TrellisPacked& w, const float* scales, const acc_t* x, int64_t T, acc_t* y,
                              int64_t rb_begin, int64_t rb_end) {
  std::vector<acc_t> block(16 * w.n);
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    trellis_decode_block_any(w, scales, rb, block.data());
    for (int64_t r = 0; r < 16; ++r) {
      for (int64_t t = 0; t < T; ++t) y[t * w.m + rb * 16 + r] = dot(block.data() + r * w.n, x + t * w.n, w.n);
    }
  }
}
YAQA_VECTOR_CLONES void trellis_rows_f32(const TrellisPacked& w, const float* scales, const float* x, int64_t T,
                                         float* y, int64_t rb_begin, int64_t rb_end) {
  trellis_rows<float>(w, scales, x, T, y, rb_begin, rb_end);
}
void trellis_rows_any(const TrellisPacked& w, const float* scales, const float* x, int64_t T, float* y,
                      int64_t rb_begin, int64_t rb_end) {
  trellis_rows_f32(w, scales, x, T, y, rb_begin, rb_end);
}
void trellis_rows_any(const TrellisPacked& w, const float* scales, const double* x, int64_t T, double* y,
                      int64_t rb_begin, int64_t rb_end) {
  trellis_rows<double>(w, scales, x, T, y, rb_begin, rb_end);
}

}  // namespace

at::Tensor int_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& sign_in, const std::optional<at::Tensor>& had_in,
                          const std::optional<at::Tensor>& sign_out, const std::optional<at::Tensor>& had_out) {
  const int64_t n =
      check_int_matmul_args(x, qweight, scales, zeros, bits, group_size, sign_in, had_in, sign_out, had_out);
  const int64_t m = qweight.size(0);
  const auto ct = compute_type(x);
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(ct).contiguous(), z = zeros.to(ct).contiguous();
  const int64_t T = xa.size(0), padded = (n + 7) / 8 * 8;
  at::Tensor y = at::empty({T, m}, xa.options());
  const Packed w{q.data_ptr<uint8_t>(), m, n, bits, group_size, q.size(1)};
  const Grid grid{s.data_ptr(), z.data_ptr(), s.size(0) == 1 ? 0 : s.size(1), z.size(0) == 1 ? 0 : z.size(1)};

  AT_DISPATCH_FLOATING_TYPES(ct, "int_matmul_cpu", [&] {
    if (T == 0) return;
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    if (T <= kSmallBatch) {
      const std::vector<scalar_t> xsum = group_sums(xp, T, n, group_size);
      at::parallel_for(0, m, row_grain(n), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> c(padded);
        dot_rows_any(w, xp, xsum.data(), T, grid, y.data_ptr<scalar_t>(), c.data(), begin, end);
      });
      return;
    }
    tiled_product<scalar_t>(xa, x.scalar_type(), m, n, y, [&](int64_t j0, int64_t rows, scalar_t* tile) {
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> c(padded);
        dequantize_rows_any(w, j0, grid, tile, c.data(), begin, end);
      });
    });
  });
  return rht_output(y, x, ct, sign_out, had_out);
}

at::Tensor e8p_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& abs_grid, int64_t bits, const std::optional<at::Tensor>& sign_in,
                          const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                          const std::optional<at::Tensor>& had_out) {
  const int64_t n = check_e8p_matmul_args(x, qweight, scales, abs_grid, bits, sign_in, had_in, sign_out, had_out);
  const int64_t m = qweight.size(0);
  const auto ct = compute_type(x);
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(ct).contiguous();
  const E8PTables tables = e8p_tables(abs_grid);
  const E8PPacked w{q.data_ptr<uint8_t>(), m, n, bits, e8p_stages(bits, "e8p_matmul"), s.size(0) == 1 ? 0 : s.size(1),
                    tables.grid.data_ptr<float>(), tables.parity.data_ptr<int32_t>()};
  const int64_t T = xa.size(0);
  at::Tensor y = at::empty({T, m}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "e8p_matmul_cpu", [&] {
    if (T == 0) return;
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    if (T <= kSmallBatch) {
      at::parallel_for(0, m, row_grain(n), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> v(2 * n);
        e8p_dot_rows_any(w, sp, xp, T, y.data_ptr<scalar_t>(), v.data(), begin, end);
      });
      return;
    }
    tiled_product<scalar_t>(xa, x.scalar_type(), m, n, y, [&](int64_t j0, int64_t rows, scalar_t* tile) {
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        e8p_dequantize_rows_any(w, sp, j0, tile, begin, end);
      });
    });
  });
  return rht_output(y, x, ct, sign_out, had_out);
}

at::Tensor trellis_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& table, int64_t bits, const std::optional<at::Tensor>& sign_in,
                              const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                              const std::optional<at::Tensor>& had_out) {
  const int64_t L = check_trellis_matmul_args(x, qweight, scales, table, bits, sign_in, had_in, sign_out, had_out);
  const int64_t m = scales.size(0), n = x.size(-1);
  const auto ct = compute_type(x);
  const at::Tensor xa = rht_input(x, n, ct, sign_in, had_in);
  const at::Tensor q = qweight.contiguous(), tab = table.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const TrellisPacked w{q.data_ptr<uint8_t>(), m, n, bits, L, q.size(1), tab.data_ptr<float>()};
  const int64_t T = xa.size(0);
  at::Tensor y = at::empty({T, m}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "trellis_matmul_cpu", [&] {
    if (T == 0) return;
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    const float* sp = s.data_ptr<float>();
    if (T <= kTrellisRowBatch) {
      at::parallel_for(0, m / 16, row_grain(n) / 16, [&](int64_t begin, int64_t end) {
        trellis_rows_any(w, sp, xp, T, y.data_ptr<scalar_t>(), begin, end);
      });
      return;
    }
    tiled_product<scalar_t>(xa, x.scalar_type(), m, n, y, [&](int64_t j0, int64_t rows, scalar_t* tile) {
      at::parallel_for(0, rows / 16, 1, [&](int64_t begin, int64_t end) {  // tiles are multiples of 16 rows
        for (int64_t b = begin; b < end; ++b) trellis_decode_block_any(w, sp, j0 / 16 + b, tile + b * 16 * n);
      });
    });
  });
  return rht_output(y, x, ct, sign_out, had_out);
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) {
  m.impl("int_matmul", &int_matmul_cpu);
  m.impl("trellis_matmul", &trellis_matmul_cpu);
  m.impl("e8p_matmul", &e8p_matmul_cpu);
}

}  // namespace yaqa
