// Backend kernels behind the torch.ops.yaqa operators (schemas in csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace yaqa {

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cpu(const at::Tensor& H, int64_t block_size);
at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& had);
void sketch_b_update_cpu(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                         const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32,
                         std::string_view contraction);
void sketch_a_update_cpu(const at::Tensor& X, const at::Tensor& G, std::optional<at::Tensor> H_in,
                         std::optional<at::Tensor> H_out, const std::optional<at::Tensor>& P_in,
                         const std::optional<at::Tensor>& P_out, bool allow_tf32);
void input_moment_update_cpu(const at::Tensor& X, at::Tensor& H, bool allow_tf32);
std::tuple<at::Tensor, at::Tensor> ldlq_round_cpu(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                  const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                  const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                                  int64_t td_x, int64_t td_y);
at::Tensor int_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& sign_in, const std::optional<at::Tensor>& had_in,
                          const std::optional<at::Tensor>& sign_out, const std::optional<at::Tensor>& had_out);

std::tuple<at::Tensor, at::Tensor> ldlq_round_e8p_cpu(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                      const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                      const at::Tensor& abs_grid, int64_t bits, int64_t td_x,
                                                      int64_t td_y);
std::tuple<at::Tensor, at::Tensor> ldlq_round_trellis_cpu(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                          const std::optional<at::Tensor>& L_out,
                                                          const at::Tensor& scales, const at::Tensor& table,
                                                          int64_t bits, int64_t td_x, int64_t td_y,
                                                          bool tail_biting);
at::Tensor trellis_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& table, int64_t bits, const std::optional<at::Tensor>& sign_in,
                              const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                              const std::optional<at::Tensor>& had_out);
at::Tensor e8p_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& abs_grid, int64_t bits, const std::optional<at::Tensor>& sign_in,
                          const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                          const std::optional<at::Tensor>& had_out);

#ifdef YAQA_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_ldl_cuda(const at::Tensor& H, int64_t block_size);
at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& had);
void sketch_b_update_cuda(const at::Tensor& X, const at::Tensor& G, at::Tensor& H_in, at::Tensor& H_out,
                          const std::optional<at::Tensor>& P_in, const std::optional<at::Tensor>& P_out, bool allow_tf32,
                          std::string_view contraction);
void sketch_a_update_cuda(const at::Tensor& X, const at::Tensor& G, std::optional<at::Tensor> H_in,
                          std::optional<at::Tensor> H_out, const std::optional<at::Tensor>& P_in,
                          const std::optional<at::Tensor>& P_out, bool allow_tf32);
void input_moment_update_cuda(const at::Tensor& X, at::Tensor& H, bool allow_tf32);
std::tuple<at::Tensor, at::Tensor> ldlq_round_cuda(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                   const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                   const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                                   int64_t td_x, int64_t td_y);
at::Tensor int_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size,
                           const std::optional<at::Tensor>& sign_in, const std::optional<at::Tensor>& had_in,
                           const std::optional<at::Tensor>& sign_out, const std::optional<at::Tensor>& had_out);
std::tuple<at::Tensor, at::Tensor> ldlq_round_e8p_cuda(const at::Tensor& W, const std::optional<at::Tensor>& L_in,
                                                       const std::optional<at::Tensor>& L_out, const at::Tensor& scales,
                                                       const at::Tensor& abs_grid, int64_t bits, int64_t td_x,
                                                       int64_t td_y);
at::Tensor e8p_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& abs_grid, int64_t bits, const std::optional<at::Tensor>& sign_in,
                           const std::optional<at::Tensor>& had_in, const std::optional<at::Tensor>& sign_out,
                           const std::optional<at::Tensor>& had_out);
#endif

}  // namespace yaqa
