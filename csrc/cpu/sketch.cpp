// Kronecker-factor accumulation on the CPU: the plan of sketch.h over ATen's BLAS (fp32 or fp64
// GEMMs; TF32 does not exist here, so the flag is accepted and has no effect).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "../sketch.h"

namespace yaqa {
namespace {

// The upper triangle of C[lo:hi, lo:hi] (+)= (F^T E)[lo:hi, lo:hi] (F, E: K x n), by halving: each level
// is one large GEMM for the off-diagonal block plus the two half triangles, so the flops approach half
// of a full product while the GEMMs stay large. The diagonal blocks are computed whole; what lands
// below their diagonal is overwritten by the mirror that follows.
void upper_product(const at::Tensor& F, const at::Tensor& E, const at::Tensor& C, int64_t lo, int64_t hi, bool acc) {
  constexpr int64_t kLeaf = 128;
  const int64_t len = hi - lo;
  if (len <= kLeaf) {
    at::Tensor block = C.narrow(0, lo, len).narrow(1, lo, len);
    const at::Tensor Ft = F.narrow(1, lo, len).t(), Eb = E.narrow(1, lo, len);
    acc ? (void)block.addmm_(Ft, Eb) : (void)at::mm_out(block, Ft, Eb);
    return;
  }
  const int64_t mid = lo + (len / 2 + kLeaf / 2) / kLeaf * kLeaf;  // a multiple of the leaf from lo
  upper_product(F, E, C, lo, mid, acc);
  at::Tensor corner = C.narrow(0, lo, mid - lo).narrow(1, mid, hi - mid);
  const at::Tensor Ft = F.narrow(1, lo, mid - lo).t(), Eb = E.narrow(1, mid, hi - mid);
  acc ? (void)corner.addmm_(Ft, Eb) : (void)at::mm_out(corner, Ft, Eb);
  upper_product(F, E, C, mid, hi, acc);
}

// H's upper triangle (+= that of S when given) copied onto its lower one, in cache-sized tiles.
template <typename TH, typename TS>
void add_upper_mirrored(TH* H, const TS* S, int64_t n) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      for (int64_t bj = bi; bj < tiles; ++bj) {
        for (int64_t r = bi * kTile; r < std::min(n, (bi + 1) * kTile); ++r) {
          for (int64_t c = std::max(r, bj * kTile); c < std::min(n, (bj + 1) * kTile); ++c) {
            const TH v = S ? H[r * n + c] + static_cast<TH>(S[r * n + c]) : H[r * n + c];
            H[r * n + c] = v;
            H[c * n + r] = v;
          }
        }
      }
    }
  });
}

struct CpuBlas {
  static void gemm_batched(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, at::Tensor C, bool /*tf32*/) {
    at::bmm_out(C, ta ? A.transpose(1, 2) : A, tb ? B.transpose(1, 2) : B);
  }

  // H += F^T E with F = A, E = B (aat: F = A^T, E = B^T), known to be symmetric: only the upper
  // triangle is multiplied (about half a GEMM's flops, see upper_product), straight into H when it has
  // the operands' type, else into a buffer that is then added; the upper triangle of H + F^T E is then
  // mirrored onto the lower one, exactly as the CUDA kernel does.
  static void syrkx_acc(const at::Tensor& A, const at::Tensor& B, bool aat, const at::Tensor& H, bool /*tf32*/) {
    const at::Tensor F = aat ? A.t() : A, E = aat ? B.t() : B;
    const int64_t n = F.size(1);
    const bool same = H.scalar_type() == F.scalar_type();
    const at::Tensor S = same ? H : at::empty({n, n}, F.options());
    upper_product(F, E, S, 0, n, /*acc=*/same);
    AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "syrkx_acc", [&] {
      using TH = scalar_t;
      if (same) {
        add_upper_mirrored<TH, TH>(H.data_ptr<TH>(), nullptr, n);
      } else if (S.scalar_type() == at::kFloat) {
        add_upper_mirrored<TH, float>(H.data_ptr<TH>(), S.data_ptr<float>(), n);
      } else {
        add_upper_mirrored<TH, double>(H.data_ptr<TH>(), S.data_ptr<double>(), n);
      }
    });
  }
};

}  // namespace

void sketch_b_update_cpu(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                         const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32,
                         std::string_view contraction) {
  sketch_b_update_impl<CpuBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32, contraction);
}

void sketch_a_update_cpu(const at::Tensor& X, const at::Tensor& G, std::optional<at::Tensor> H_in,
                         std::optional<at::Tensor> H_out, const std::optional<at::Tensor>& P_in,
                         const std::optional<at::Tensor>& P_out, bool allow_tf32) {
  sketch_a_update_impl<CpuBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32);
}

void input_moment_update_cpu(const at::Tensor& X, at::Tensor& H, bool allow_tf32) {
  input_moment_update_impl<CpuBlas>(X, H, allow_tf32);
}

TORCH_LIBRARY_IMPL(yaqa, CPU, m) {
  m.impl("sketch_b_update", &sketch_b_update_cpu);
  m.impl("sketch_a_update", &sketch_a_update_cpu);
  m.impl("input_moment_update", &input_moment_update_cpu);
}

}  // namespace yaqa
