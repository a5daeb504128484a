// Orthonormal Hadamard transform on the CPU: per row, the small factor as a dense c x c product,
// then an in-place fast Walsh-Hadamard transform over the 2^k factor (stride c), in opmath.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../hadamard.h"
#include "../ops.h"

namespace yaqa {

at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& had) {
  const int64_t c = check_hadamard_args(x, had);
  const int64_t n = x.size(-1);
  const int64_t p = n / c;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = xc.numel() / n;
  // The small factor transposed, so the dense product is a sequence of contiguous axpys.
  const at::Tensor ht = c > 1 ? had->t().contiguous() : at::Tensor();
  const float* Ht = c > 1 ? ht.data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_transform_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(n));
    const scalar_t* in = xc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(n), tmp(c);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(in[r * n + i]);
        if (c > 1) {
          for (int64_t a = 0; a < p; ++a) {
            acc_t* seg = buf.data() + a * c;
            std::fill(tmp.begin(), tmp.end(), acc_t(0));
            for (int64_t k = 0; k < c; ++k) {
              const acc_t xk = seg[k];
              const float* hk = Ht + k * c;  // row k of had^T = column k of had
              for (int64_t b = 0; b < c; ++b) tmp[b] += static_cast<acc_t>(hk[b]) * xk;
            }
            std::copy(tmp.begin(), tmp.end(), seg);
          }
        }
        for (int64_t h = 1; h < p; h *= 2) {
          for (int64_t a0 = 0; a0 < p; a0 += 2 * h) {
            for (int64_t i = a0 * c; i < (a0 + h) * c; ++i) {
              const acc_t u = buf[i], v = buf[i + h * c];
              buf[i] = u + v;
              buf[i + h * c] = u - v;
            }
          }
        }
        for (int64_t i = 0; i < n; ++i) o[r * n + i] = static_cast<scalar_t>(buf[i] * scale);
      }
    });
  });
  check_half_range(xc, out);
  return out;
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) { m.impl("hadamard_transform", &hadamard_transform_cpu); }

}  // namespace yaqa
