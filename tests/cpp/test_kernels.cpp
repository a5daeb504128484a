// The CPU kernels of the Hadamard, sketch and rounding families from C++, against closed forms.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "ops.h"
#include "sketch.h"

namespace {

// Sylvester's H[i, j] = (-1)^popcount(i & j), scaled to be orthonormal.
at::Tensor sylvester(int64_t n) {
  at::Tensor H = at::empty({n, n}, at::kDouble);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) H.index_put_({i, j}, (__builtin_popcountll(i & j) % 2 ? -1.0 : 1.0) / std::sqrt(double(n)));
  return H;
}

TEST(HadamardCpu, PowerOfTwoIsSylvesterProduct) {
  at::Tensor x = at::randn({3, 64}, at::kDouble);
  at::Tensor y = yaqa::hadamard_transform_cpu(x, std::nullopt);
  EXPECT_TRUE(at::allclose(y, at::matmul(x, sylvester(64).t()), 1e-12, 1e-12));
}

TEST(HadamardCpu, SmallFactorIsAppliedAsKronecker) {
  // had = [[1, 1], [1, -1]] given as a "small" factor of order 2 must equal Sylvester of twice the size.
  at::Tensor had = at::tensor({1.0f, 1.0f, 1.0f, -1.0f}).view({2, 2});
  at::Tensor x = at::randn({5, 16}, at::kDouble);
  EXPECT_TRUE(at::allclose(yaqa::hadamard_transform_cpu(x, had), at::matmul(x, sylvester(16).t()), 1e-12, 1e-12));
}

TEST(HadamardCpu, RejectsSizesThatAreNotPowerOfTwoTimesC) {
  EXPECT_THROW(yaqa::hadamard_transform_cpu(at::ones({2, 12}), std::nullopt), c10::ValueError);
}

TEST(SketchCpu, InputMomentIsXtX) {
  at::Tensor X = at::randn({40, 9});
  at::Tensor H = at::zeros({9, 9}, at::kDouble);
  yaqa::input_moment_update_cpu(X, H, false);
  at::Tensor Xd = X.to(at::kDouble);
  EXPECT_TRUE(at::allclose(H, at::matmul(Xd.t(), Xd), 1e-4, 1e-4));
  EXPECT_TRUE(at::equal(H, H.t()));
}

TEST(SketchCpu, SketchBSingleSequenceIsGradientGram) {
  at::Tensor X = at::randn({1, 6, 5}), G = at::randn({1, 6, 3});
  at::Tensor H_in = at::zeros({5, 5}, at::kDouble), H_out = at::zeros({3, 3}, at::kDouble);
  yaqa::sketch_b_update_cpu(X, G, H_in, H_out, std::nullopt, std::nullopt, false, "auto");
  at::Tensor Gw = at::matmul(G[0].t().to(at::kDouble), X[0].to(at::kDouble));
  EXPECT_TRUE(at::allclose(H_in, at::matmul(Gw.t(), Gw), 1e-4, 1e-4));
  EXPECT_TRUE(at::allclose(H_out, at::matmul(Gw, Gw.t()), 1e-4, 1e-4));
}

TEST(SketchPlan, AutoTakesTheContractionWithFewerFlops) {
  using yaqa::Contraction;
  // Short sequences of a wide layer: the T x T Gram matrices (2*T^2*(m+n) + T*n^2 per factor, here
  // 0.08 GFLOP) against 2*T*m*n + m*n^2 + n*m^2 = 2.3 GFLOP for the per-sequence gradients.
  const auto short_seq = yaqa::plan_sketch_b("auto", 64, 1024, 1024, false, false);
  EXPECT_EQ(short_seq.in, Contraction::kGram);
  EXPECT_EQ(short_seq.out, Contraction::kGram);
  // Long sequences of a narrow layer (SmolLM2's q_proj at T = 2048): the gradients are cheaper.
  const auto long_seq = yaqa::plan_sketch_b("auto", 2048, 576, 576, false, false);
  EXPECT_EQ(long_seq.in, Contraction::kGradient);
  EXPECT_EQ(long_seq.out, Contraction::kGradient);
  // A forced order is taken as given; anything else is refused with the allowed names.
  EXPECT_EQ(yaqa::plan_sketch_b("gram", 2048, 576, 576, false, false).in, Contraction::kGram);
  EXPECT_EQ(yaqa::plan_sketch_b("gradient", 64, 1024, 1024, false, false).out, Contraction::kGradient);
  EXPECT_THROW(yaqa::plan_sketch_b("fastest", 64, 8, 8, false, false), c10::ValueError);
}

TEST(SketchCpu, GramOrderEqualsGradientOrder) {
  at::Tensor X = at::randn({2, 5, 12}), G = at::randn({2, 5, 9});
  at::Tensor a_in = at::zeros({12, 12}, at::kDouble), a_out = at::zeros({9, 9}, at::kDouble);
  at::Tensor b_in = at::zeros({12, 12}, at::kDouble), b_out = at::zeros({9, 9}, at::kDouble);
  yaqa::sketch_b_update_cpu(X, G, a_in, a_out, std::nullopt, std::nullopt, false, "gram");
  yaqa::sketch_b_update_cpu(X, G, b_in, b_out, std::nullopt, std::nullopt, false, "gradient");
  EXPECT_TRUE(at::allclose(a_in, b_in, 1e-4, 1e-4));
  EXPECT_TRUE(at::allclose(a_out, b_out, 1e-4, 1e-4));
}

TEST(RoundingCpu, IdentityFactorsGiveRoundToNearest) {
  at::Tensor W = at::randn({8, 16});
  at::Tensor s = at::full({8, 1}, 0.25f), z = at::full({8, 1}, 7.5f);
  auto [W_hat, codes] = yaqa::ldlq_round_cpu(W, at::eye(16), at::eye(8), s, z, 4, 16, 4, 4);
  at::Tensor expected = at::clamp(at::round(W / 0.25 + 7.5), 0, 15);
  EXPECT_TRUE(at::equal(codes.to(at::kFloat), expected));
  EXPECT_TRUE(at::equal(W_hat, (expected - 7.5) * 0.25));
}

TEST(RoundingCpu, RejectsTilesThatDoNotDivide) {
  at::Tensor s = at::ones({8, 1}), z = at::zeros({8, 1});
  EXPECT_THROW(yaqa::ldlq_round_cpu(at::randn({8, 16}), at::eye(16), std::nullopt, s, z, 4, 16, 3, 4), c10::ValueError);
}

}  // namespace
