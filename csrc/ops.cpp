// Schemas of the SaS CPU ops and the `sas._C` Python module that loads them.
//
// The ops are prefixed `cpu_` because the Triton backend registers its own
// `sas::adapter_fwd` / `sas::adapter_bwd` in the same namespace from Python.
// Autograd and fake (meta) implementations are registered in sas/backends/cpp.py.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "adapter_cpu.h"

#define SAS_STRINGIFY_(x) #x
#define SAS_STRINGIFY(x) SAS_STRINGIFY_(x)

TORCH_LIBRARY(sas, m) {
  // x (rows, d_in), base (rows, d_out) -> y = base + scale * ((x @ A.T) * h) @ B.T (rows, d_out)
  // and u = x @ A.T (rows, rank) in float32, which the backward needs.
  m.def(
      "cpu_adapter_forward(Tensor x, Tensor base, Tensor A, Tensor B, Tensor h, float scale, Tensor? task_ids)"
      " -> (Tensor y, Tensor u)");
  // -> gradients of x, A, B and h (the gradient of base is grad_y itself).
  // x is what the forward kept of the input: x itself, its 8-bit copy (int8 or float8_e4m3fn, with x_scale the
  // float32 scale of each row), or None, and then no dA is computed (grad_A is empty, (0, d_in)).
  // Given frozen_weight (d_out, d_in), grad_x also holds the frozen layer's part, grad_y @ frozen_weight,
  // added in place: the whole layer's dx from one op.
  m.def(
      "cpu_adapter_backward(Tensor grad_y, Tensor? x, Tensor A, Tensor B, Tensor h, Tensor u, float scale,"
      " Tensor? task_ids, Tensor? x_scale=None, Tensor? frozen_weight=None)"
      " -> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_h)");
  // The whole adapted layer, x (..., d_in) -> x @ weight.T + bias + scale * ((x @ A.T) * h) @ B.T, with its
  // autograd in C++ (layer_cpu.cpp); weight and bias are frozen (no gradient).
  m.def(
      "cpu_adapted_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h, float scale,"
      " Tensor? task_ids) -> Tensor");
  // Its forward below autograd: y and the float32 u = x @ A.T the backward needs (the backward is
  // cpu_adapter_backward given frozen_weight).
  m.def(
      "cpu_adapted_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h, float scale,"
      " Tensor? task_ids) -> (Tensor y, Tensor u)");
  // The whole adapted layer keeping, for dA, the 8-bit copy of x (saved_input 1: int8, 2: float8 e4m3, one
  // float32 scale per row) instead of x: its own, written while the forward reads x, or x_q/x_scale, the copy
  // another layer made of the same input. Returns the copy it made (not differentiable) beside y, to hand on;
  // given x_q and x_scale it makes none, and returns empty tensors in their place.
  m.def(
      "cpu_adapted_linear_quantized(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h, float scale,"
      " Tensor? task_ids, int saved_input, Tensor? x_q, Tensor? x_scale) -> (Tensor y, Tensor x_q, Tensor x_scale)");
  // Its forward below autograd: y, u and the copy.
  m.def(
      "cpu_adapted_linear_quantized_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h,"
      " float scale, Tensor? task_ids, int saved_input, Tensor? x_q, Tensor? x_scale)"
      " -> (Tensor y, Tensor u, Tensor x_q, Tensor x_scale)");
  // h = 1 + w2 act(w1 e + b1) + b2 for every row of embeddings; activation 0 tanh, 1 relu, 2 gelu.
  m.def("cpu_hypernetwork(Tensor embeddings, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int activation) -> Tensor");
  // Its forward and backward below autograd: the forward also returns the pre-activation and the
  // activation; the backward returns the gradients of embeddings, w1, b1, w2, b2 (all five).
  m.def(
      "cpu_hypernetwork_forward(Tensor embeddings, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int activation)"
      " -> (Tensor h, Tensor pre, Tensor hidden)");
  m.def(
      "cpu_hypernetwork_backward(Tensor grad_h, Tensor embeddings, Tensor w1, Tensor w2, Tensor pre, Tensor hidden,"
      " int activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import sas._C` runs the registrations above; the module itself only reports which torch it was compiled
// against and the 8-bit kinds it was compiled with ({name: (code, limit)}), so sas/backends/cpp.py can refuse
// a build for another torch or one whose kinds differ from sas_kernels.saved_kinds.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "SaS CPU kernels, registered as torch.ops.sas.cpu_*",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* kinds = Py_BuildValue("{s:(Ld),s:(Ld)}", "int8", static_cast<long long>(sas::kSavedInt8),
                                  static_cast<double>(sas::kSavedInt8Limit), "fp8",
                                  static_cast<long long>(sas::kSavedFp8), static_cast<double>(sas::kSavedFp8Limit));
  if (PyModule_AddStringConstant(m, "torch_version",
                                 SAS_STRINGIFY(TORCH_VERSION_MAJOR) "." SAS_STRINGIFY(TORCH_VERSION_MINOR)) != 0 ||
      kinds == nullptr || PyModule_AddObject(m, "saved_kinds", kinds) != 0) {  // steals `kinds` on success
    Py_XDECREF(kinds);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
