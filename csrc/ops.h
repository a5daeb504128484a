// Backend kernels behind the torch.ops.yaqa operators (schemas in csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace yaqa {

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cpu(const at::Tensor& H, int64_t block_size);
at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& had);

#ifdef YAQA_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cuda(const at::Tensor& H, int64_t block_size);
at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& had);
#endif

}  // namespace yaqa
