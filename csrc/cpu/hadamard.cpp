// Orthonormal Hadamard transform on the CPU: the small factor for all rows at once as one GEMM
// ((rows * 2^k) x c times had^T, in opmath), then per row an in-place fast Walsh-Hadamard transform over the
// 2^k factor (stride c), scaled and cast back. hadamard_rows does the same for a few rows of a raw buffer (the
// quantized matmuls' RHT at decode) without a GEMM call or temporary tensors: there each ATen call costs microseconds
// against the transform's own ~1 us.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include <vector>

#include "../hadamard.h"
#include "../ops.h"
#include "vector_clones.h"

namespace yaqa {
namespace {

// Rows [begin, end) of buf (rows x n, in place): butterflies over the 2^k factor at stride c, then the scale
// 1 / sqrt(n) (while the row is in cache).
template <typename acc_t>
inline void butterflies(acc_t* buf, int64_t n, int64_t c, int64_t begin, int64_t end) {
  const int64_t p = n / c;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(n));
  for (int64_t r = begin; r < end; ++r) {
    acc_t* row = buf + r * n;
    for (int64_t h = 1; h < p; h *= 2) {
      for (int64_t a0 = 0; a0 < p; a0 += 2 * h) {
        acc_t* lo = row + a0 * c;
        acc_t* hi = lo + h * c;
        for (int64_t i = 0; i < h * c; ++i) {
          const acc_t u = lo[i], v = hi[i];
          lo[i] = u + v;
          hi[i] = u - v;
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) row[i] *= scale;
  }
}

YAQA_VECTOR_CLONES void butterflies_f32(float* buf, int64_t n, int64_t c, int64_t begin, int64_t end) {
  butterflies(buf, n, c, begin, end);
}
void butterflies_any(float* buf, int64_t n, int64_t c, int64_t begin, int64_t end) {
  butterflies_f32(buf, n, c, begin, end);
}
void butterflies_any(double* buf, int64_t n, int64_t c, int64_t begin, int64_t end) {
  butterflies(buf, n, c, begin, end);
}

// out[a + i] = sum_j in[a + j] had[i, j] for each block of c (a = 0, c, ...): axpys over rows of hT = had^T, so the
// inner loop runs along contiguous memory without horizontal sums. The order is a compile-time constant, so a
// block's c sums stay in registers across the j loop (with c known only at run time they round-trip through memory
// on every j: ~3x slower at c = 36, and beyond order 60 slower than the GEMM path: see hadamard_rows_fits).
template <typename acc_t, int C>
inline void small_factor_fixed(const acc_t* __restrict in, const acc_t* __restrict hT, acc_t* __restrict out,
                               int64_t n) {
  for (int64_t a = 0; a < n; a += C) {
    acc_t acc[C] = {};
    for (int j = 0; j < C; ++j) {
      const acc_t v = in[a + j];
      for (int i = 0; i < C; ++i) acc[i] += v * hT[j * C + i];
    }
    for (int i = 0; i < C; ++i) out[a + i] = acc[i];
  }
}

template <typename acc_t>
inline void small_factor(const acc_t* __restrict in, const acc_t* __restrict hT, acc_t* __restrict out, int64_t n,
                         int64_t c) {
  switch (c) {
    case 12: return small_factor_fixed<acc_t, 12>(in, hT, out, n);
    case 20: return small_factor_fixed<acc_t, 20>(in, hT, out, n);
    case 28: return small_factor_fixed<acc_t, 28>(in, hT, out, n);
    case 36: return small_factor_fixed<acc_t, 36>(in, hT, out, n);
    case 52: return small_factor_fixed<acc_t, 52>(in, hT, out, n);
    case 60: return small_factor_fixed<acc_t, 60>(in, hT, out, n);
    default: TORCH_CHECK(false, "hadamard_rows: no register-resident loop for a small factor of order ", c);
  }
}

YAQA_VECTOR_CLONES void small_factor_f32(const float* in, const float* hT, float* out, int64_t n, int64_t c) {
  small_factor(in, hT, out, n, c);
}
void small_factor_any(const float* in, const float* hT, float* out, int64_t n, int64_t c) {
  small_factor_f32(in, hT, out, n, c);
}
void small_factor_any(const double* in, const double* hT, double* out, int64_t n, int64_t c) {
  small_factor(in, hT, out, n, c);
}

}  // namespace

template <typename acc_t>
void hadamard_rows(const acc_t* x, acc_t* out, int64_t rows, int64_t n, const float* had, int64_t c,
                   const acc_t* before, const acc_t* after) {
  std::vector<acc_t> hT(had == nullptr ? 0 : c * c), in(had == nullptr ? 0 : n);
  for (int64_t i = 0; i < (had == nullptr ? 0 : c); ++i) {
    for (int64_t j = 0; j < c; ++j) hT[j * c + i] = static_cast<acc_t>(had[i * c + j]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* xr = x + r * n;
    acc_t* o = out + r * n;
    acc_t* src = hT.empty() ? o : in.data();  // without a small factor the signs are applied in place
    for (int64_t i = 0; i < n; ++i) src[i] = before == nullptr ? xr[i] : xr[i] * before[i];
    if (!hT.empty()) small_factor_any(src, hT.data(), o, n, c);
    butterflies_any(o, n, c, 0, 1);
    if (after != nullptr) {
      for (int64_t i = 0; i < n; ++i) o[i] *= after[i];
    }
  }
}
template void hadamard_rows<float>(const float*, float*, int64_t, int64_t, const float*, int64_t, const float*,
                                   const float*);
template void hadamard_rows<double>(const double*, double*, int64_t, int64_t, const float*, int64_t, const double*,
                                    const double*);

at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& had) {
  const int64_t c = check_hadamard_args(x, had);
  const int64_t n = x.size(-1);
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / n;
  // In opmath: a fresh buffer (the small factor's product, or a copy), transformed in place.
  at::Tensor buf = c > 1 ? at::mm(xc.view({rows * (n / c), c}).to(opmath), had->t().to(opmath)).view({rows, n})
                         : xc.to(opmath, /*non_blocking=*/false, /*copy=*/true).view({rows, n});
  AT_DISPATCH_FLOATING_TYPES(opmath, "hadamard_transform_cpu", [&] {
    scalar_t* b = buf.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      butterflies_any(b, n, c, begin, end);
    });
  });
  at::Tensor out = buf.to(x.scalar_type()).view(xc.sizes());
  check_half_range(xc, out);
  return out;
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) { m.impl("hadamard_transform", &hadamard_transform_cpu); }

}  // namespace yaqa
