// Kronecker-factor accumulation (ALGORITHMS.md section 3), written once over a BLAS policy:
//   Blas::gemm_batched(A, ta, B, tb, C)  C_b = op(A_b) op(B_b)            (fp32, 3-D, unit inner stride)
//   Blas::gemm_acc(A, ta, B, tb, H)      H += op(A) op(B)                 (A, B fp32 2-D; H fp32 or fp64)
//   Blas::syrk_acc(A, aat, H)            H += A^T A (aat: A A^T) on H's upper triangle, which is then
//                                        mirrored: H stays exactly symmetric (A fp32 2-D)
// Every product is computed in fp32 (TF32 only when a backend is asked for it) and added to the
// fp32 or fp64 accumulator. A 2-D operand may have any row stride as long as its columns are
// unit-stride, which lets one (m, B, n) buffer of per-sequence gradients serve both factors.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace yaqa {

inline void check_accumulator(const at::Tensor& H, int64_t size, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, op, ": ", name,
                   " must be a float32 or float64 accumulator, got ", H.scalar_type());
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == size && H.size(1) == size, op, ": ", name, " must be ", size, " x ",
                    size, ", got shape ", H.sizes());
  TORCH_CHECK_VALUE(H.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
  check_same_device(like, H, op, "X", name);
}

inline void check_weight(const std::optional<at::Tensor>& P, int64_t size, const at::Tensor& like, const char* op,
                         const char* name) {
  if (!P.has_value()) return;
  check_real_float(*P, op, name);
  TORCH_CHECK_VALUE(P->dim() == 2 && P->size(0) == size && P->size(1) == size, op, ": ", name, " must be ", size, " x ",
                    size, ", got shape ", P->sizes());
  check_same_device(like, *P, op, "X", name);
}

inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be a floating-point tensor, got ", s);
}

inline at::Tensor as_fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// H_in += sum_b Gw_b^T P_out Gw_b,  H_out += sum_b Gw_b P_in Gw_b^T,  Gw_b = G_b^T X_b (P = I if absent).
template <typename Blas>
void sketch_b_update_impl(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                          const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool tf32) {
  constexpr const char* op = "sketch_b_update";
  check_activation(X, op, "X");
  check_activation(G, op, "G");
  TORCH_CHECK_VALUE(X.dim() == 3 && G.dim() == 3 && X.size(0) == G.size(0) && X.size(1) == G.size(1), op,
                    ": X must be (B, T, n) and G (B, T, m) with the same B and T, got ", X.sizes(), " and ", G.sizes());
  check_same_device(X, G, op, "X", "G");
  const int64_t B = X.size(0), T = X.size(1), n = X.size(2), m = G.size(2);
  check_accumulator(H_in, n, X, op, "H_in");
  check_accumulator(H_out, m, X, op, "H_out");
  check_weight(P_in, n, X, op, "P_in");
  check_weight(P_out, m, X, op, "P_out");
  if (B == 0 || T == 0) return;

  const at::Tensor Xf = as_fp32(X), Gf = as_fp32(G);
  // Per-sequence gradients in an (m, B, n) buffer: Gw_b is the (m, n) slice [:, b, :]. Viewed as
  // (m*B, n) its rows are all rows of all Gw_b; viewed as (m, B*n) it is [Gw_1 ... Gw_B].
  at::Tensor buf = at::empty({m, B, n}, Xf.options());
  at::Tensor Gw = buf.permute({1, 0, 2});  // (B, m, n) view with row stride B*n
  Blas::gemm_batched(Gf, /*ta=*/true, Xf, /*tb=*/false, Gw, tf32);
  const at::Tensor rows = buf.view({m * B, n});
  const at::Tensor cols = buf.view({m, B * n});

  if (P_out.has_value()) {
    at::Tensor ybuf = at::empty({m, B, n}, Xf.options());
    at::Tensor Y = ybuf.permute({1, 0, 2});
    Blas::gemm_batched(as_fp32(*P_out).unsqueeze(0).expand({B, m, m}), false, Gw, false, Y, tf32);  // P_out Gw_b
    Blas::gemm_acc(rows, /*ta=*/true, ybuf.view({m * B, n}), /*tb=*/false, H_in, tf32);             // sum Gw_b^T Y_b
  } else {
    Blas::syrk_acc(rows, /*aat=*/false, H_in, tf32);  // sum_b Gw_b^T Gw_b
  }
  if (P_in.has_value()) {
    at::Tensor zbuf = at::empty({m, B, n}, Xf.options());
    at::Tensor Z = zbuf.permute({1, 0, 2});
    Blas::gemm_batched(Gw, false, as_fp32(*P_in).unsqueeze(0).expand({B, n, n}), false, Z, tf32);  // Gw_b P_in
    Blas::gemm_acc(zbuf.view({m, B * n}), false, cols, /*tb=*/true, H_out, tf32);                  // sum Z_b Gw_b^T
  } else {
    Blas::syrk_acc(cols, /*aat=*/true, H_out, tf32);  // sum_b Gw_b Gw_b^T = cols cols^T
  }
}

// Per token t: H_in += (g_t P_out g_t^T) x_t^T x_t and H_out += (x_t P_in x_t^T) g_t^T g_t (P = I if absent).
template <typename Blas>
void sketch_a_update_impl(const at::Tensor& X, const at::Tensor& G, std::optional<at::Tensor>& H_in,
                          std::optional<at::Tensor>& H_out, const std::optional<at::Tensor>& P_in,
                          const std::optional<at::Tensor>& P_out, bool tf32) {
  constexpr const char* op = "sketch_a_update";
  check_activation(X, op, "X");
  check_activation(G, op, "G");
  TORCH_CHECK_VALUE(X.dim() >= 1 && G.dim() == X.dim() && X.sizes().slice(0, X.dim() - 1) == G.sizes().slice(0, G.dim() - 1),
                    op, ": X (..., n) and G (..., m) must have the same leading shape, got ", X.sizes(), " and ",
                    G.sizes());
  check_same_device(X, G, op, "X", "G");
  TORCH_CHECK_VALUE(H_in.has_value() || H_out.has_value(), op, ": give H_in, H_out or both to accumulate into");
  const int64_t n = X.size(-1), m = G.size(-1);
  if (H_in.has_value()) check_accumulator(*H_in, n, X, op, "H_in");
  if (H_out.has_value()) check_accumulator(*H_out, m, X, op, "H_out");
  check_weight(P_in, n, X, op, "P_in");
  check_weight(P_out, m, X, op, "P_out");
  const at::Tensor Xf = as_fp32(X).view({-1, n}), Gf = as_fp32(G).view({-1, m});
  if (Xf.size(0) == 0) return;

  // Token weights w_t = v_t P v_t^T = rowsum((V P) * V), computed in fp32.
  auto token_weights = [&](const at::Tensor& V, const std::optional<at::Tensor>& P) {
    if (!P.has_value()) return (V * V).sum(1, /*keepdim=*/true);
    at::Tensor VP = at::empty_like(V);
    Blas::gemm_batched(V.unsqueeze(0), false, as_fp32(*P).unsqueeze(0), false, VP.unsqueeze(0), tf32);
    return (VP * V).sum(1, /*keepdim=*/true);
  };
  if (H_out.has_value()) Blas::gemm_acc(Gf, /*ta=*/true, Gf * token_weights(Xf, P_in), false, *H_out, tf32);
  if (H_in.has_value()) Blas::gemm_acc(Xf, /*ta=*/true, Xf * token_weights(Gf, P_out), false, *H_in, tf32);
}

// H += sum_t x_t^T x_t over all tokens of X (..., n): the GPTQ / LDLQ input second moment.
template <typename Blas>
void input_moment_update_impl(const at::Tensor& X, at::Tensor& H, bool tf32) {
  constexpr const char* op = "input_moment_update";
  check_activation(X, op, "X");
  TORCH_CHECK_VALUE(X.dim() >= 1, op, ": X must have at least one dimension");
  const int64_t n = X.size(-1);
  check_accumulator(H, n, X, op, "H");
  const at::Tensor Xf = as_fp32(X).view({-1, n});
  if (Xf.size(0) == 0) return;
  Blas::syrk_acc(Xf, /*aat=*/false, H, tf32);
}

}  // namespace yaqa
