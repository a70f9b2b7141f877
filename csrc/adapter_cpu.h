// The SaS adapter kernels of adapter_cpu.cpp, for the other ops built on them (layer_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sas {

// The 8-bit copies of a layer input kept for dA (SaSConfig.saved_input, sas.reference.quantize_rows), by the
// codes of the ops' `int saved_input` argument, and the largest magnitude of each, which a row's absmax is
// scaled to: the values of sas_kernels.saved_kinds.SAVED_KINDS, which sas.backends.cpp compares with these
// (sas._C.saved_kinds) and refuses to load a build that differs.
enum SavedKind : int64_t { kSavedInt8 = 1, kSavedFp8 = 2 };
constexpr float kSavedInt8Limit = 127.0f;
constexpr float kSavedFp8Limit = 448.0f;

// Where the forward writes such a copy while it reads x: q (rows, d_in) int8 or float8_e4m3fn, contiguous,
// and one float32 scale per row.
struct SavedCopy {
  int64_t kind;
  at::Tensor q, scale;
};

// x (rows, d_in), base (rows, d_out) -> y = base + scale * ((x @ A.T) * h) @ B.T and the float32
// u = x @ A.T (rows, rank) the backward needs. h is (rank,) or (tasks, rank) picked by task_ids.
// With `copy`, also the 8-bit copy of x, from the same pass over x. With `into_base` (the caller owns base, a
// contiguous temporary such as the frozen GEMM's output), y is written over base in place and returned.
std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const at::Tensor& base, const at::Tensor& A,
                                                   const at::Tensor& B, const at::Tensor& h, double scale,
                                                   const std::optional<at::Tensor>& task_ids,
                                                   const SavedCopy* copy = nullptr, bool into_base = false);

// -> gradients of x, A, B and h (the gradient of base is grad_y itself). x is what the forward kept of the
// input: x itself, its 8-bit copy (x_scale given: one float32 scale per row), or nothing, and then no dA
// is computed: grad_A is empty (0, d_in).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& h, const at::Tensor& u, double scale, const std::optional<at::Tensor>& task_ids,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& frozen_weight);

}  // namespace sas
