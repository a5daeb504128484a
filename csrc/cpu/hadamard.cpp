// Orthonormal Hadamard transform on the CPU: the small factor for all rows at once as one GEMM
// ((rows * 2^k) x c times had^T, in opmath), then per row an in-place fast Walsh-Hadamard transform over the
// 2^k factor (stride c), scaled and cast back.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

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

}  // namespace

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
