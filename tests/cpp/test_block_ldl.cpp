// The CPU block_ldl kernel from C++, against an fp64 reconstruction and a brute-force minor check.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "ops.h"

namespace {

at::Tensor random_spd(int64_t n, at::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor A = at::randn({n, 2 * n}, gen, at::TensorOptions().dtype(at::kDouble));
  return (at::matmul(A, A.t()) / (2.0 * n) + 1e-2 * at::eye(n, at::kDouble)).to(dtype);
}

// ||L blockdiag(D) L^T - H||_F / ||H||_F in fp64, with blockdiag built block by block.
double reconstruction_error(const at::Tensor& H, const at::Tensor& L, const at::Tensor& D) {
  const int64_t n = H.size(0), b = D.size(1);
  at::Tensor B = at::zeros({n, n}, at::kDouble);
  for (int64_t k = 0; k < D.size(0); ++k) B.slice(0, k * b, (k + 1) * b).slice(1, k * b, (k + 1) * b).copy_(D[k]);
  at::Tensor Ld = L.to(at::kDouble);
  at::Tensor R = at::matmul(at::matmul(Ld, B), Ld.t());
  return ((R - H.to(at::kDouble)).norm() / H.to(at::kDouble).norm()).item<double>();
}

struct Case {
  int64_t n, b;
  at::ScalarType dtype;
  double tol;
};

class BlockLdlCpu : public ::testing::TestWithParam<Case> {};

TEST_P(BlockLdlCpu, ReconstructsAndIsUnitBlockLower) {
  const Case c = GetParam();
  at::Tensor H = random_spd(c.n, c.dtype, 42 + c.n + c.b);
  auto [L, D, info] = yaqa::block_ldl_cpu(H, c.b);
  EXPECT_EQ(info.item<int>(), 0);
  EXPECT_EQ(L.scalar_type(), c.dtype);
  EXPECT_EQ(D.sizes(), (at::IntArrayRef{c.n / c.b, c.b, c.b}));
  EXPECT_LT(reconstruction_error(H, L, D), c.tol);
  for (int64_t k = 0; k < c.n / c.b; ++k) {
    at::Tensor diag = L.slice(0, k * c.b, (k + 1) * c.b).slice(1, k * c.b, (k + 1) * c.b);
    EXPECT_TRUE(at::equal(diag, at::eye(c.b, L.options()))) << "diagonal block " << k;
    EXPECT_EQ(L.slice(0, k * c.b, (k + 1) * c.b).slice(1, (k + 1) * c.b).count_nonzero().item<int64_t>(), 0);
  }
}

// fp32 / fp64 backward error: a small multiple of n * eps.
INSTANTIATE_TEST_SUITE_P(Sizes, BlockLdlCpu,
                         ::testing::Values(Case{16, 16, at::kFloat, 1e-5}, Case{96, 8, at::kFloat, 1e-5},
                                           Case{256, 1, at::kDouble, 1e-13}, Case{256, 32, at::kDouble, 1e-13}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "n" + std::to_string(info.param.n) + "_b" + std::to_string(info.param.b) +
                                  (info.param.dtype == at::kFloat ? "_fp32" : "_fp64");
                         });

TEST(BlockLdlCpuErrors, ReportsFirstNonPositiveMinor) {
  at::Tensor H = random_spd(32, at::kDouble, 7);
  H.index_put_({10, 10}, -1.0);
  // Brute force: the first leading minor with a non-positive eigenvalue.
  int64_t expected = 0;
  for (int64_t k = 1; k <= 32 && expected == 0; ++k)
    if (at::linalg_eigvalsh(H.slice(0, 0, k).slice(1, 0, k)).min().item<double>() <= 0) expected = k;
  ASSERT_GT(expected, 0);
  EXPECT_EQ(std::get<2>(yaqa::block_ldl_cpu(H, 8)).item<int>(), expected);
}

TEST(BlockLdlCpuErrors, NonFiniteIsMinusOne) {
  at::Tensor H = at::eye(16, at::kFloat);
  H.index_put_({3, 2}, std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(std::get<2>(yaqa::block_ldl_cpu(H, 4)).item<int>(), -1);
}

TEST(BlockLdlCpuErrors, RejectsBadInputs) {
  EXPECT_THROW(yaqa::block_ldl_cpu(at::eye(4, at::kFloat).narrow(1, 0, 3), 1), c10::ValueError);
  EXPECT_THROW(yaqa::block_ldl_cpu(at::eye(24, at::kFloat), 16), c10::ValueError);
  EXPECT_THROW(yaqa::block_ldl_cpu(at::eye(16, at::kInt), 16), c10::TypeError);
  EXPECT_THROW(yaqa::block_ldl_cpu(at::eye(16, at::kFloat), 0), c10::ValueError);
}

TEST(BlockLdlDispatcher, RegisteredForCpu) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("yaqa::block_ldl", "").typed<
      std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  at::Tensor H = random_spd(64, at::kDouble, 3);
  auto [L, D, info] = op.call(H, 16);
  auto [L2, D2, info2] = yaqa::block_ldl_cpu(H, 16);
  EXPECT_TRUE(at::equal(L, L2));
  EXPECT_TRUE(at::equal(D, D2));
}

}  // namespace
