// Quantized matmul on the CPU: y = x W_hat^T with W_hat decoded from the packed codes as it is used.
// Small batches (decode): per output row, the codes are decoded once into an L1-resident buffer and
// dotted with every token, the zero point folded out of the inner loop through per-group sums of x:
//   y[t, j] = sum_g s[j, g] (sum_{i in g} c[j, i] x[t, i] - z[j, g] sum_{i in g} x[t, i]).
// Large batches (prefill): a tile of rows is dequantized at a time and multiplied by a GEMM, so the
// weight is never materialised whole.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../qmatmul.h"

namespace yaqa {
namespace {

constexpr int64_t kSmallBatch = 8;  // up to this many tokens: the row-by-row decode path
constexpr int64_t kTileRows = 256;  // rows dequantized per GEMM on the large-batch path

template <typename acc_t>
void decode_row(const uint8_t* row, int64_t n, int64_t bits, acc_t* out) {
  uint32_t c[8];
  for (int64_t i = 0; i < n; i += 8) {
    decode8(row + (i / 8) * bits, bits, c);
    const int64_t count = std::min<int64_t>(8, n - i);
    for (int64_t k = 0; k < count; ++k) out[i + k] = static_cast<acc_t>(c[k]);
  }
}

// sum_i a[i] b[i] with eight independent partial sums (which the compiler keeps in one vector register).
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
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

struct Packed {
  const uint8_t* codes;
  int64_t m, n, bits, group_size, row_bytes;
};

template <typename acc_t>
void small_batch(const Packed& w, const acc_t* x, int64_t T, const acc_t* s, int64_t s_stride, const acc_t* z,
                 int64_t z_stride, acc_t* y) {
  const int64_t n = w.n, groups = n / w.group_size, gs = w.group_size;
  std::vector<acc_t> xsum(T * groups);  // per-token group sums of x, for the zero points
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      acc_t sum = 0;
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) sum += x[t * n + i];
      xsum[t * groups + g] = sum;
    }
  }
  at::parallel_for(0, w.m, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(n);
    for (int64_t j = begin; j < end; ++j) {
      decode_row(w.codes + j * w.row_bytes, n, w.bits, c.data());
      const acc_t* sj = s + j * s_stride;
      const acc_t* zj = z + j * z_stride;
      for (int64_t t = 0; t < T; ++t) {
        acc_t acc = 0;
        for (int64_t g = 0; g < groups; ++g) {
          acc += sj[g] * (dot(c.data() + g * gs, x + t * n + g * gs, gs) - zj[g] * xsum[t * groups + g]);
        }
        y[t * w.m + j] = acc;
      }
    }
  });
}

template <typename acc_t>
void dequantize_rows(const Packed& w, int64_t j0, int64_t rows, const acc_t* s, int64_t s_stride, const acc_t* z,
                     int64_t z_stride, acc_t* out) {
  const int64_t n = w.n, gs = w.group_size;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = j0 + r;
      acc_t* row = out + r * n;
      decode_row(w.codes + j * w.row_bytes, n, w.bits, row);
      for (int64_t g = 0; g < n / gs; ++g) {
        const acc_t zg = z[j * z_stride + g], sg = s[j * s_stride + g];
        for (int64_t i = g * gs; i < (g + 1) * gs; ++i) row[i] = (row[i] - zg) * sg;
      }
    }
  });
}

}  // namespace

at::Tensor int_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  const int64_t n = check_int_matmul_args(x, qweight, scales, zeros, bits, group_size);
  const int64_t m = qweight.size(0);
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.reshape({-1, n}).to(ct).contiguous();
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(ct).contiguous(), z = zeros.to(ct).contiguous();
  const int64_t T = xa.size(0);
  at::Tensor y = at::empty({T, m}, xa.options());
  const Packed w{q.data_ptr<uint8_t>(), m, n, bits, group_size, q.size(1)};
  const int64_t s_stride = s.size(0) == 1 ? 0 : s.size(1), z_stride = z.size(0) == 1 ? 0 : z.size(1);

  AT_DISPATCH_FLOATING_TYPES(ct, "int_matmul_cpu", [&] {
    if (T == 0) return;
    if (T <= kSmallBatch) {
      small_batch<scalar_t>(w, xa.data_ptr<scalar_t>(), T, s.data_ptr<scalar_t>(), s_stride, z.data_ptr<scalar_t>(),
                            z_stride, y.data_ptr<scalar_t>());
      return;
    }
    at::Tensor tile = at::empty({std::min(kTileRows, m), n}, xa.options());
    for (int64_t j0 = 0; j0 < m; j0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - j0);
      dequantize_rows<scalar_t>(w, j0, rows, s.data_ptr<scalar_t>(), s_stride, z.data_ptr<scalar_t>(), z_stride,
                                tile.data_ptr<scalar_t>());
      y.narrow(1, j0, rows).copy_(at::mm(xa, tile.narrow(0, 0, rows).t()));
    }
  });
  auto out_shape = x.sizes().vec();
  out_shape.back() = m;
  return y.to(x.scalar_type()).view(out_shape);
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) { m.impl("int_matmul", &int_matmul_cpu); }

}  // namespace yaqa
