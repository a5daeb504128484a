// Kronecker-factor accumulation (ALGORITHMS.md section 3), written once over a BLAS policy:
//   Blas::gemm_batched(A, ta, B, tb, C)  C_b = op(A_b) op(B_b)            (3-D, unit inner stride)
//   Blas::syrkx_acc(A, B, aat, H)        H += A^T B (aat: A B^T), a product known to be symmetric: only its
//                                        upper triangle is computed (half a GEMM's flops), added to H's and
//                                        mirrored, so H stays exactly symmetric (A, B 2-D, same layout)
// Precision: the products are computed in fp64 when X or G is fp64 (fp64 in, fp64 maths), otherwise in
// fp32 (bf16 / fp16 activations are widened exactly; TF32 only when a backend is asked for it), and
// added to the fp32 or fp64 accumulator. Operands A, B, C of a policy call share that compute type;
// a 2-D operand may have any row stride as long as its columns are unit-stride.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>

#include "checks.h"

namespace yaqa {

inline void check_accumulator(const at::Tensor& H, int64_t size, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, op, ": ", name,
                   " must be a float32 or float64 accumulator, got ", H.scalar_type());
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == size && H.size(1) == size, op, ": ", name, " must be ", size, " x ",
                    size, ", got shape ", H.sizes());
  TORCH_CHECK_VALUE(H.is_contiguous(), op, ": ", name, " must be contiguous (it is updated in place)");
  check_same_device(like, H, op, "X", name);
  check_no_grad(H, op, name);
}

inline void check_weight(const std::optional<at::Tensor>& P, int64_t size, const at::Tensor& like, const char* op,
                         const char* name) {
  if (!P.has_value()) return;
  check_real_float(*P, op, name);
  TORCH_CHECK_VALUE(P->dim() == 2 && P->size(0) == size && P->size(1) == size, op, ": ", name, " must be ", size, " x ",
                    size, ", got shape ", P->sizes());
  check_same_device(like, *P, op, "X", name);
  check_no_grad(*P, op, name);
}

inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be a floating-point tensor, got ", s);
  check_no_grad(t, op, name);
}

// The type the products are computed in: fp64 if either activation is fp64, else fp32.
inline at::ScalarType compute_type(const at::Tensor& X, const at::Tensor& G) {
  return X.scalar_type() == at::kDouble || G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType type) { return t.to(type).contiguous(); }

// How sketch_b_update contracts X_b (T x n) and G_b (T x m) into one factor.
enum class Contraction {
  kGradient,  // Gw_b = G_b^T X_b first (m x n), then H_in += Gw_b^T P Gw_b
  kGram,      // the T x T Gram matrix first: H_in += X_b^T (G_b P G_b^T) X_b
};

struct SketchBPlan {
  Contraction in, out;
};

// Flops per sequence of each way to form the factors, as the kernels below compute them (a symmetric
// product counts half). weighted_*: a power-iteration weight P is applied to that factor.
struct SketchBCosts {
  double gradient_shared, gradient_in, gradient_out, gram_in, gram_out;

  SketchBCosts(double T, double n, double m, bool weighted_in, bool weighted_out)
      : gradient_shared(2 * T * m * n),
        gradient_in((weighted_in ? 2 * m * m * n : 0) + m * n * n),
        gradient_out((weighted_out ? 2 * n * n * m : 0) + n * m * m),
        gram_in((weighted_in ? 2 * T * m * m : 0) + 2 * T * T * m + 2 * T * T * n + T * n * n),
        gram_out((weighted_out ? 2 * T * n * n : 0) + 2 * T * T * n + 2 * T * T * m + T * m * m) {}

  double total(SketchBPlan p) const {
    const bool any_gradient = p.in == Contraction::kGradient || p.out == Contraction::kGradient;
    return (any_gradient ? gradient_shared : 0) + (p.in == Contraction::kGradient ? gradient_in : gram_in) +
           (p.out == Contraction::kGradient ? gradient_out : gram_out);
  }
};

// The contraction of each factor: "gradient", "gram", or "auto" (the fewest flops for this shape).
inline SketchBPlan plan_sketch_b(std::string_view contraction, int64_t T, int64_t n, int64_t m, bool weighted_in,
                                 bool weighted_out) {
  if (contraction == "gradient") return {Contraction::kGradient, Contraction::kGradient};
  if (contraction == "gram") return {Contraction::kGram, Contraction::kGram};
  TORCH_CHECK_VALUE(contraction == "auto", "sketch_b_update: contraction must be 'auto', 'gradient' or 'gram', got '",
                    std::string(contraction), "'");
  const SketchBCosts costs(static_cast<double>(T), static_cast<double>(n), static_cast<double>(m), weighted_in,
                           weighted_out);
  SketchBPlan best{Contraction::kGradient, Contraction::kGradient};
  for (const Contraction in : {Contraction::kGradient, Contraction::kGram}) {
    for (const Contraction out : {Contraction::kGradient, Contraction::kGram}) {
      if (costs.total({in, out}) < costs.total(best)) best = {in, out};
    }
  }
  return best;
}

// H += sum_b A_b^T K_b A_b with K_b = B_b P B_b^T (T x T; P = I if undefined), for A (B, T, a) and
// B (B, T, c) in the compute type: the Gram-first contraction of one factor.
template <typename Blas>
void gram_factor_update(const at::Tensor& A, const at::Tensor& Bm, const at::Tensor& P, at::Tensor& H, bool tf32) {
  const int64_t nb = A.size(0), T = A.size(1), a = A.size(2), c = Bm.size(2);
  at::Tensor BP = Bm;
  if (P.defined()) {  // (B P), one product over all B*T rows
    BP = at::empty({1, nb * T, c}, Bm.options());
    Blas::gemm_batched(Bm.view({1, nb * T, c}), false, P.unsqueeze(0), false, BP, tf32);
    BP = BP.view({nb, T, c});
  }
  at::Tensor K = at::empty({nb, T, T}, A.options());
  Blas::gemm_batched(BP, false, Bm, /*tb=*/true, K, tf32);  // K_b = B_b P B_b^T
  at::Tensor Y = at::empty({nb, T, a}, A.options());
  Blas::gemm_batched(K, false, A, false, Y, tf32);  // Y_b = K_b A_b
  Blas::syrkx_acc(A.view({nb * T, a}), Y.view({nb * T, a}), /*aat=*/false, H, tf32);  // sum_b A_b^T Y_b
}

// H_in += sum_b Gw_b^T P_out Gw_b,  H_out += sum_b Gw_b P_in Gw_b^T,  Gw_b = G_b^T X_b (P = I if absent),
// each factor by the contraction `plan_sketch_b` picks.
template <typename Blas>
void sketch_b_update_impl(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                          const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool tf32,
                          std::string_view contraction) {
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
  const SketchBPlan plan = plan_sketch_b(contraction, T, n, m, P_in.has_value(), P_out.has_value());
  if (B == 0 || T == 0 || n == 0 || m == 0) return;

  const at::ScalarType ct = compute_type(X, G);
  const at::Tensor Xc = as_compute(X, ct), Gc = as_compute(G, ct);
  const at::Tensor Pi = P_in.has_value() ? as_compute(*P_in, ct) : at::Tensor();
  const at::Tensor Po = P_out.has_value() ? as_compute(*P_out, ct) : at::Tensor();

  if (plan.in == Contraction::kGram) gram_factor_update<Blas>(Xc, Gc, Po, H_in, tf32);
  if (plan.out == Contraction::kGram) gram_factor_update<Blas>(Gc, Xc, Pi, H_out, tf32);
  if (plan.in == Contraction::kGram && plan.out == Contraction::kGram) return;

  // Per-sequence gradients in an (m, B, n) buffer: Gw_b is the (m, n) slice [:, b, :]. Viewed as
  // (m*B, n) its rows are all rows of all Gw_b; viewed as (m, B*n) it is [Gw_1 ... Gw_B].
  at::Tensor buf = at::empty({m, B, n}, Xc.options());
  at::Tensor Gw = buf.permute({1, 0, 2});  // (B, m, n) view with row stride B*n
  Blas::gemm_batched(Gc, /*ta=*/true, Xc, /*tb=*/false, Gw, tf32);
  const at::Tensor rows = buf.view({m * B, n});
  const at::Tensor cols = buf.view({m, B * n});

  if (plan.in == Contraction::kGradient) {
    if (Po.defined()) {
      at::Tensor ybuf = at::empty({m, B, n}, Xc.options());
      Blas::gemm_batched(Po.unsqueeze(0).expand({B, m, m}), false, Gw, false, ybuf.permute({1, 0, 2}), tf32);
      Blas::syrkx_acc(rows, ybuf.view({m * B, n}), /*aat=*/false, H_in, tf32);  // sum_b Gw_b^T (P_out Gw_b)
    } else {
      Blas::syrkx_acc(rows, rows, /*aat=*/false, H_in, tf32);  // sum_b Gw_b^T Gw_b
    }
  }
  if (plan.out == Contraction::kGradient) {
    if (Pi.defined()) {
      at::Tensor zbuf = at::empty({m, B, n}, Xc.options());
      Blas::gemm_batched(Gw, false, Pi.unsqueeze(0).expand({B, n, n}), false, zbuf.permute({1, 0, 2}), tf32);
      Blas::syrkx_acc(zbuf.view({m, B * n}), cols, /*aat=*/true, H_out, tf32);  // sum_b (Gw_b P_in) Gw_b^T
    } else {
      Blas::syrkx_acc(cols, cols, /*aat=*/true, H_out, tf32);  // sum_b Gw_b Gw_b^T = cols cols^T
    }
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
  const at::ScalarType ct = compute_type(X, G);
  const at::Tensor Xf = as_compute(X, ct).view({-1, n}), Gf = as_compute(G, ct).view({-1, m});
  if (Xf.size(0) == 0) return;

  // Token weights w_t = v_t P v_t^T = rowsum((V P) * V), in the compute type.
  auto token_weights = [&](const at::Tensor& V, const std::optional<at::Tensor>& P) {
    if (!P.has_value()) return (V * V).sum(1, /*keepdim=*/true);
    at::Tensor VP = at::empty_like(V);
    Blas::gemm_batched(V.unsqueeze(0), false, as_compute(*P, ct).unsqueeze(0), false, VP.unsqueeze(0), tf32);
    return (VP * V).sum(1, /*keepdim=*/true);
  };
  if (H_out.has_value()) Blas::syrkx_acc(Gf, Gf * token_weights(Xf, P_in), /*aat=*/false, *H_out, tf32);
  if (H_in.has_value()) Blas::syrkx_acc(Xf, Xf * token_weights(Gf, P_out), /*aat=*/false, *H_in, tf32);
}

// H += sum_t x_t^T x_t over all tokens of X (..., n): the GPTQ / LDLQ input second moment.
template <typename Blas>
void input_moment_update_impl(const at::Tensor& X, at::Tensor& H, bool tf32) {
  constexpr const char* op = "input_moment_update";
  check_activation(X, op, "X");
  TORCH_CHECK_VALUE(X.dim() >= 1, op, ": X must have at least one dimension");
  const int64_t n = X.size(-1);
  check_accumulator(H, n, X, op, "H");
  const at::Tensor Xf = as_compute(X, compute_type(X, X)).view({-1, n});
  if (Xf.size(0) == 0) return;
  Blas::syrkx_acc(Xf, Xf, /*aat=*/false, H, tf32);
}

}  // namespace yaqa
