// Input checks shared by every backend: each failure names the argument and the fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

namespace yaqa {

// A floating-point (fp32 or fp64) tensor.
inline void check_real_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", t.scalar_type(),
                   "; convert it with .float() or .double()");
}

// A square 2-D matrix.
inline void check_square(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == t.size(1), op, ": ", name,
                    " must be a square 2-D matrix, got shape ", t.sizes());
}

// Two tensors on the same device.
inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ",
                    name_b, " is on ", b.device(), "; move both to one device");
}

// No op of yaqa_ext but hadamard_transform has a gradient: an input that needs one is an error, not a graph
// silently cut (or an autograd failure deep inside the kernel).
inline void check_no_grad(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op, ": ", name,
              " requires grad, but this op has no gradient; pass ", name, ".detach() or call it under torch.no_grad()");
}

}  // namespace yaqa
