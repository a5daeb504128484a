// Kronecker-factor accumulation on the CPU: the plan of sketch.h over ATen's BLAS (fp32 GEMMs;
// TF32 does not exist here, so the flag is accepted and has no effect).
#include <torch/library.h>

#include "../ops.h"
#include "../sketch.h"

namespace yaqa {
namespace {

at::Tensor op(const at::Tensor& A, bool t) { return t ? A.t() : A; }

struct CpuBlas {
  static void gemm_batched(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C, bool /*tf32*/) {
    C.copy_(at::bmm(ta ? A.transpose(1, 2) : A, tb ? B.transpose(1, 2) : B));
  }
  static void gemm_acc(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& H, bool /*tf32*/) {
    if (H.scalar_type() == at::kFloat) {
      H.addmm_(op(A, ta), op(B, tb));
    } else {
      H.add_(at::mm(op(A, ta), op(B, tb)));
    }
  }
  // H += F^T F with F = A (or A^T when aat): only the tiles on or above the diagonal are
  // multiplied (a blocked SYRK, ~half the flops of a GEMM for large n); the upper triangle of
  // H + F^T F is then mirrored onto the lower one, exactly as the CUDA kernel does after SYRK.
  static void syrk_acc(const at::Tensor& A, bool aat, const at::Tensor& H, bool /*tf32*/) {
    const at::Tensor F = aat ? A.t() : A;
    const int64_t n = F.size(1);
    constexpr int64_t tile = 256;
    at::Tensor S = at::empty({n, n}, F.options());  // only its upper triangle is computed and read
    for (int64_t i = 0; i < n; i += tile) {
      const int64_t bi = std::min(tile, n - i);
      const at::Tensor Fi_t = F.narrow(1, i, bi).t();
      at::Tensor out = S.narrow(0, i, bi).narrow(1, i, n - i);
      at::mm_out(out, Fi_t, F.narrow(1, i, n - i));
    }
    H.add_(S.triu());
    const at::Tensor strictly_upper = H.triu(1);
    H.triu_().add_(strictly_upper.t());
  }
};

}  // namespace

void sketch_b_update_cpu(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                         const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32) {
  sketch_b_update_impl<CpuBlas>(X, G, H_in, H_out, P_in, P_out, allow_tf32);
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
