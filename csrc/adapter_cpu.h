// The SaS adapter kernels of adapter_cpu.cpp, for the other ops built on them (layer_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sas {

// x (rows, d_in), base (rows, d_out) -> y = base + scale * ((x @ A.T) * h) @ B.T and the float32
// u = x @ A.T (rows, rank) the backward needs. h is (rank,) or (tasks, rank) picked by task_ids.
std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const at::Tensor& base, const at::Tensor& A,
                                                   const at::Tensor& B, const at::Tensor& h, double scale,
                                                   const std::optional<at::Tensor>& task_ids);

// -> gradients of x, A, B and h (the gradient of base is grad_y itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& h,
    const at::Tensor& u, double scale, const std::optional<at::Tensor>& task_ids);

}  // namespace sas
