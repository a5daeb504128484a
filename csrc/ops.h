// Backend kernels behind the torch.ops.yaqa operators (schemas in csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace yaqa {

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cpu(const at::Tensor& H, int64_t block_size);

#ifdef YAQA_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cuda(const at::Tensor& H, int64_t block_size);
#endif

}  // namespace yaqa
