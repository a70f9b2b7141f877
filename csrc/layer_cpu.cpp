// The adapted layer and the hypernetwork as C++ autograd ops for the CPU backend.
//
//   sas::cpu_adapted_linear: y = x @ W0.T + b0 + s * ((x @ A.T) * h) @ B.T, one autograd node
//   sas::cpu_hypernetwork:   h = 1 + W2 act(W1 e + b1) + b2 for every layer embedding, one node
//
// Both ops were Python autograd Functions first; at the compute-free shape of the host benchmark
// (64->64, 4 rows, one thread) the Python apply and backward calls cost more than all the kernels,
// so their autograd lives here, next to the kernels, and a layer's forward+backward runs no Python
// beyond SaSLinear.forward. W0 and b0 are frozen: they get no gradient (route, in sas/backends/__init__.py,
// sends a layer whose base weight requires grad to the op-level path).
//
// A backward run with grad mode on (create_graph=True, a double backward) recomputes the op with
// differentiable ATen calls and differentiates that, so second-order gradients are exact.
//
// The hypernetwork keeps what its backward needs in saved_data, not save_for_backward: activation
// checkpointing packs the saved tensors of a segment and checks them against its recomputation, and
// SaSShared caches this op's output for every layer of a forward, wherever the first one ran. Nothing
// in saved_data is freed by a backward pass, so reentrant checkpointing's inner backward and the
// outer one can both run through the node. Autograd's version check does not cover saved_data, so the
// backward compares the inputs' version counters with the forward's itself and raises as autograd does
// for a tensor written in place in between. The hypernetwork computes in its inputs' dtype with
// autocast off (as sas/layer.py's does): under autocast its linears would save half-precision
// activations that the backward, run outside autocast, multiplies with the float32 weights.
#include "adapter_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace sas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// The sizes of x with the last dim replaced by `last`.
std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = last;
  return sizes;
}

// Gradients of outputs (for grad_outputs) with respect to the inputs flagged in `needs`, with a graph of
// their own (create_graph): the double-backward path of both ops.
variable_list differentiate(const variable_list& outputs, const variable_list& grad_outputs,
                            const variable_list& inputs, const std::vector<bool>& needs) {
  variable_list wanted;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (needs[i]) wanted.push_back(inputs[i]);
  }
  variable_list grads = wanted.empty() ? variable_list{}
                                       : torch::autograd::grad(outputs, wanted, grad_outputs,
                                                               /*retain_graph=*/true, /*create_graph=*/true);
  variable_list result(inputs.size());
  for (size_t i = 0, next = 0; i < inputs.size(); ++i) {
    if (needs[i]) result[i] = grads[next++];
  }
  return result;
}

// The autograd kernels below call the computation through the dispatcher, as one op each way, rather
// than its ATen calls one by one: a profiler or dispatch mode then sees the layer as its two kernels.
using AdaptedLinearForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, double,
                                                                const std::optional<at::Tensor>&);
using QuantizedForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);
using AdapterBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);
using HyperForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, int64_t);
using HyperBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<AdaptedLinearForward>& adapted_linear_forward_op() {
  static const auto op = find_op<AdaptedLinearForward>("sas::cpu_adapted_linear_forward");
  return op;
}

const c10::TypedOperatorHandle<QuantizedForward>& quantized_forward_op() {
  static const auto op = find_op<QuantizedForward>("sas::cpu_adapted_linear_quantized_forward");
  return op;
}

const c10::TypedOperatorHandle<AdapterBackward>& adapter_backward_op() {
  static const auto op = find_op<AdapterBackward>("sas::cpu_adapter_backward");
  return op;
}

const c10::TypedOperatorHandle<HyperForward>& hypernetwork_forward_op() {
  static const auto op = find_op<HyperForward>("sas::cpu_hypernetwork_forward");
  return op;
}

const c10::TypedOperatorHandle<HyperBackward>& hypernetwork_backward_op() {
  static const auto op = find_op<HyperBackward>("sas::cpu_hypernetwork_backward");
  return op;
}

// ---- the adapted layer ------------------------------------------------------------------------

// y = x @ W0.T + b0 + s * ((x @ A.T) * h) @ B.T in plain ATen ops (differentiable), in x's dtype.
at::Tensor layer_by_aten(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& h, double scale, const at::Tensor& task_ids) {
  const int64_t rows = leading_rows(x);
  const at::Tensor x2 = x.reshape({rows, x.size(-1)});
  at::Tensor modulation = h;
  if (h.dim() == 2) {
    const at::Tensor ids = task_ids.numel() == rows ? task_ids.reshape({-1})
                                                    : at::repeat_interleave(task_ids, rows / task_ids.numel());
    modulation = h.index_select(0, ids);
  }
  const at::Tensor y2 = at::linear(x2, weight, optional_of(bias)).add(at::linear(x2.mm(A.t()).mul(modulation), B), scale);
  return y2.reshape(with_last(x, weight.size(0)));
}

// What both layer nodes record beside their saved tensors: the scale, x's shape, and which gradients are
// needed. bias and task_ids are optional arguments: an absent one is no input of the node, so input edge
// numbers shift; which gradients are needed is recorded by argument instead of read from the edges.
void record_layer(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& h, double scale) {
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["x_shape"] = c10::List<int64_t>(x.sizes().vec());
  ctx->saved_data["needs"] = c10::List<bool>({x.requires_grad(), false, false, A.requires_grad(), B.requires_grad(),
                                              h.requires_grad()});
}

// The backward of both layer nodes, from what they saved: [kept x or copy, copy's scales, u, weight, bias, A,
// B, h, task_ids], the first two undefined where not kept (the full node keeps x only when A needs a
// gradient: only dA reads it).
variable_list layer_backward(AutogradContext* ctx, const variable_list& grad_outputs, size_t num_inputs) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &kept = saved[0], &x_scale = saved[1], &u = saved[2], &weight = saved[3], &bias = saved[4];
  const at::Tensor &A = saved[5], &B = saved[6], &h = saved[7], &task_ids = saved[8];
  const double scale = ctx->saved_data["scale"].toDouble();
  const c10::List<bool> recorded = ctx->saved_data["needs"].toBoolList();
  const std::vector<bool> needs(recorded.begin(), recorded.end());
  const c10::List<int64_t> x_shape = ctx->saved_data["x_shape"].toIntList();
  const std::vector<int64_t> x_sizes(x_shape.begin(), x_shape.end());
  variable_list grads(num_inputs);
  if (at::GradMode::is_enabled()) {  // double backward
    TORCH_CHECK(kept.defined() && !x_scale.defined(),
                "a double backward (create_graph=True) recomputes the adapted layer from its input, which this layer "
                "did not keep: its A gets no gradient (SaSConfig.train_down=False) or it kept an 8-bit copy "
                "(SaSConfig.saved_input='int8' or 'fp8'); use train_down=True and saved_input='full' for "
                "higher-order gradients");
    const variable_list inputs = {kept, weight, bias, A, B, h};
    const variable_list got = differentiate({layer_by_aten(kept, weight, bias, A, B, h, scale, task_ids)},
                                            {grad_outputs[0]}, inputs, needs);
    std::copy(got.begin(), got.end(), grads.begin());
    return grads;
  }
  const int64_t rows = u.size(0);
  const at::Tensor g2 = grad_outputs[0].reshape({rows, weight.size(0)});
  const std::optional<at::Tensor> x_rows =
      kept.defined() ? std::optional<at::Tensor>(kept.reshape({rows, A.size(1)})) : std::nullopt;
  // The frozen weight only where dx is needed: its g @ W0 is the backward's largest product.
  auto [dx2, dA, dB, dh] = adapter_backward_op().call(g2, x_rows, A, B, h, u, scale, optional_of(task_ids),
                                                      optional_of(x_scale), needs[0] ? optional_of(weight)
                                                                                     : std::nullopt);
  if (needs[0]) grads[0] = dx2.view(x_sizes);
  if (needs[3]) grads[3] = dA;
  if (needs[4]) grads[4] = dB;
  if (needs[5]) grads[5] = dh;
  return grads;
}

struct AdaptedLinear : public torch::autograd::Function<AdaptedLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& h, double scale, const std::optional<at::Tensor>& task_ids) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u] = adapted_linear_forward_op().call(x, weight, bias, A, B, h, scale, task_ids);
    ctx->save_for_backward({A.requires_grad() ? x : at::Tensor(), at::Tensor(), u, weight,
                            bias.value_or(at::Tensor()), A, B, h, task_ids.value_or(at::Tensor())});
    record_layer(ctx, x, A, B, h, scale);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return layer_backward(ctx, grad_outputs, 8);
  }
};

// The layer keeping the 8-bit copy of x (kind: SavedKind) instead of x: its own, written by the forward op
// while it reads x, or x_q/x_scale, the copy another layer already made of the same input. Returns
// (y, x_q, x_scale), the copy it made (empty when given one: an op's output may not alias its input),
// non-differentiable, so that the caller can hand it to such layers.
struct QuantizedAdaptedLinear : public torch::autograd::Function<QuantizedAdaptedLinear> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& h, double scale, const std::optional<at::Tensor>& task_ids,
                               int64_t kind, const std::optional<at::Tensor>& x_q,
                               const std::optional<at::Tensor>& x_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u, q, q_scale] = quantized_forward_op().call(x, weight, bias, A, B, h, scale, task_ids, kind, x_q, x_scale);
    ctx->save_for_backward({x_q.value_or(q), x_scale.value_or(q_scale), u, weight, bias.value_or(at::Tensor()), A, B,
                            h, task_ids.value_or(at::Tensor())});
    record_layer(ctx, x, A, B, h, scale);
    ctx->mark_non_differentiable({q, q_scale});
    ctx->set_materialize_grads(false);  // no zeros made for the copy's (absent) gradients
    return {y, q, q_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return layer_backward(ctx, grad_outputs, 11);
  }
};

at::Tensor adapted_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& h, double scale,
                                   const std::optional<at::Tensor>& task_ids) {
  return AdaptedLinear::apply(x, weight, bias, A, B, h, scale, task_ids);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantized_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& h, double scale, const std::optional<at::Tensor>& task_ids, int64_t kind,
    const std::optional<at::Tensor>& x_q, const std::optional<at::Tensor>& x_scale) {
  const variable_list out = QuantizedAdaptedLinear::apply(x, weight, bias, A, B, h, scale, task_ids, kind, x_q, x_scale);
  return {out[0], out[1], out[2]};
}

// Below autograd: y (x's leading dims) and u (rows, rank).
std::tuple<at::Tensor, at::Tensor> adapted_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                              const at::Tensor& B, const at::Tensor& h, double scale,
                                                              const std::optional<at::Tensor>& task_ids) {
  const int64_t rows = leading_rows(x);
  const at::Tensor x2 = x.reshape({rows, x.size(-1)});
  auto [y2, u] = adapter_forward(x2, at::linear(x2, weight, bias), A, B, h, scale, task_ids, nullptr,
                                 /*into_base=*/true);
  return {x.dim() == 2 ? y2 : y2.view(with_last(x, weight.size(0))), u};
}

// Below autograd: y, u and the 8-bit copy of x of `kind` with its row scales, written by the adapter
// kernel while it reads x; given x_q and x_scale (a copy already made of this input), no copy is made and
// the last two are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantized_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& h, double scale, const std::optional<at::Tensor>& task_ids, int64_t kind,
    const std::optional<at::Tensor>& x_q, const std::optional<at::Tensor>& x_scale) {
  constexpr const char* op = "sas::cpu_adapted_linear_quantized";
  TORCH_CHECK(kind == kSavedInt8 || kind == kSavedFp8, op, ": saved_input must be ", int64_t{kSavedInt8},
              " (int8) or ", int64_t{kSavedFp8}, " (fp8), got ", kind);
  const int64_t rows = leading_rows(x), d_in = x.size(-1);
  const at::ScalarType q_dtype = kind == kSavedInt8 ? at::kChar : at::kFloat8_e4m3fn;
  TORCH_CHECK(x_q.has_value() == x_scale.has_value(), op, ": give both x_q and x_scale, or neither");
  const at::Tensor x2 = x.reshape({rows, d_in});
  if (x_q) {
    TORCH_CHECK(x_q->dim() == 2 && x_q->size(0) == rows && x_q->size(1) == d_in && x_q->scalar_type() == q_dtype &&
                    x_q->is_contiguous() && x_scale->dim() == 1 && x_scale->size(0) == rows &&
                    x_scale->scalar_type() == at::kFloat,
                op, ": x_q must be a contiguous (", rows, ", ", d_in, ") ", q_dtype, " copy with float32 (", rows,
                ",) x_scale; got ", x_q->sizes(), " ", x_q->scalar_type(), " and ", x_scale->sizes(), " ",
                x_scale->scalar_type());
    auto [y2, u] = adapter_forward(x2, at::linear(x2, weight, bias), A, B, h, scale, task_ids, nullptr,
                                   /*into_base=*/true);
    return {x.dim() == 2 ? y2 : y2.view(with_last(x, weight.size(0))), u, x_q->new_empty({0, d_in}),
            x_scale->new_empty({0})};
  }
  const SavedCopy copy{kind, at::empty({rows, d_in}, x.options().dtype(q_dtype)),
                       at::empty({rows}, x.options().dtype(at::kFloat))};
  auto [y2, u] = adapter_forward(x2, at::linear(x2, weight, bias), A, B, h, scale, task_ids, &copy,
                                 /*into_base=*/true);
  return {x.dim() == 2 ? y2 : y2.view(with_last(x, weight.size(0))), u, copy.q, copy.scale};
}

// Below autograd (no gradient wanted).
at::Tensor adapted_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& A, const at::Tensor& B, const at::Tensor& h, double scale,
                              const std::optional<at::Tensor>& task_ids) {
  return std::get<0>(adapted_linear_forward_cpu(x, weight, bias, A, B, h, scale, task_ids));
}

// ---- the hypernetwork -------------------------------------------------------------------------

// Activation codes of the op's schema, in the order of sas.layer's activations.
enum Activation : int64_t { kTanh = 0, kRelu = 1, kGelu = 2 };

at::Tensor activate(const at::Tensor& pre, int64_t activation) {
  switch (activation) {
    case kTanh: return at::tanh(pre);
    case kRelu: return at::relu(pre);
    case kGelu: return at::gelu(pre);
  }
  TORCH_CHECK(false, "sas::cpu_hypernetwork: unknown activation code ", activation);
}

at::Tensor hypernetwork_by_aten(const at::Tensor& embeddings, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, int64_t activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::linear(activate(at::linear(embeddings, w1, b1), activation), w2, b2).add(1.0);
}

// The hypernetwork's inputs in the op's order, for messages.
constexpr const char* kHyperInputNames[] = {"embeddings", "hyper.hidden.weight", "hyper.hidden.bias",
                                            "hyper.output.weight", "hyper.output.bias"};

// A tensor's version counter; -1 for an inference tensor, which has none (and cannot be written outside
// inference mode, where no backward runs).
int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

// Raises as autograd does for a saved tensor written in place between the forward and the backward.
void check_unchanged(const at::Tensor& t, int64_t expected, size_t input) {
  if (expected < 0) return;
  const int64_t now = version_of(t);
  TORCH_CHECK(now == expected,
              "one of the variables needed for gradient computation has been modified by an inplace operation: "
              "the SaS adapter's ", kHyperInputNames[input], " ", t.sizes(), " is at version ", now,
              "; expected version ", expected, " instead. Write it after the backward (e.g. optimizer.step() after "
              "loss.backward()), or run the forward again after writing it");
}

struct HyperNetwork : public torch::autograd::Function<HyperNetwork> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& embeddings, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, int64_t activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h, pre, hidden] = hypernetwork_forward_op().call(embeddings, w1, b1, w2, b2, activation);
    // Not save_for_backward: see the file comment.
    ctx->saved_data["embeddings"] = embeddings;
    ctx->saved_data["w1"] = w1;
    ctx->saved_data["b1"] = b1;
    ctx->saved_data["w2"] = w2;
    ctx->saved_data["b2"] = b2;
    ctx->saved_data["pre"] = pre;
    ctx->saved_data["hidden"] = hidden;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["versions"] = c10::List<int64_t>({version_of(embeddings), version_of(w1), version_of(b1),
                                                      version_of(w2), version_of(b2)});
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto& data = ctx->saved_data;
    const at::Tensor embeddings = data["embeddings"].toTensor(), w1 = data["w1"].toTensor();
    const at::Tensor w2 = data["w2"].toTensor();
    const int64_t activation = data["activation"].toInt();
    const at::Tensor& grad_h = grad_outputs[0];
    std::vector<bool> needs(5);
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = ctx->needs_input_grad(i);
    const c10::List<int64_t> versions = data["versions"].toIntList();
    variable_list grads(6);
    if (at::GradMode::is_enabled()) {  // double backward: recomputes from all five inputs
      const variable_list inputs = {embeddings, w1, data["b1"].toTensor(), w2, data["b2"].toTensor()};
      for (size_t i = 0; i < inputs.size(); ++i) check_unchanged(inputs[i], versions[i], i);
      const variable_list got = differentiate(
          {hypernetwork_by_aten(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], activation)}, {grad_h}, inputs,
          needs);
      std::copy(got.begin(), got.end(), grads.begin());
      return grads;
    }
    // The hand-written backward reads the embeddings, w1 and w2 (b1 and b2 only shaped pre and hidden).
    check_unchanged(embeddings, versions[0], 0);
    check_unchanged(w1, versions[1], 1);
    check_unchanged(w2, versions[3], 3);
    auto [d_embeddings, d_w1, d_b1, d_w2, d_b2] = hypernetwork_backward_op().call(
        grad_h, embeddings, w1, w2, data["pre"].toTensor(), data["hidden"].toTensor(), activation);
    const at::Tensor all[] = {d_embeddings, d_w1, d_b1, d_w2, d_b2};
    for (size_t i = 0; i < needs.size(); ++i) {
      if (needs[i]) grads[i] = all[i];
    }
    return grads;
  }
};

// Below autograd: h and what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> hypernetwork_forward_cpu(const at::Tensor& embeddings,
                                                                        const at::Tensor& w1, const at::Tensor& b1,
                                                                        const at::Tensor& w2, const at::Tensor& b2,
                                                                        int64_t activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor pre = at::linear(embeddings, w1, b1);
  at::Tensor hidden = activate(pre, activation);
  return {at::linear(hidden, w2, b2).add_(1.0), pre, hidden};
}

// The five gradients by hand: a handful of tiny ATen calls inside one op.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hypernetwork_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& embeddings, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre, const at::Tensor& hidden, int64_t activation) {
  const at::Tensor grad_hidden = grad_h.mm(w2);
  at::Tensor grad_pre;
  switch (activation) {
    case kTanh: grad_pre = at::tanh_backward(grad_hidden, hidden); break;
    case kRelu: grad_pre = at::threshold_backward(grad_hidden, hidden, 0); break;
    default: grad_pre = at::gelu_backward(grad_hidden, pre); break;
  }
  return {grad_pre.mm(w1), grad_pre.t().mm(embeddings), grad_pre.sum(0), grad_h.t().mm(hidden), grad_h.sum(0)};
}

at::Tensor hypernetwork_autograd(const at::Tensor& embeddings, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2, int64_t activation) {
  return HyperNetwork::apply(embeddings, w1, b1, w2, b2, activation);
}

at::Tensor hypernetwork_cpu(const at::Tensor& embeddings, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, int64_t activation) {
  return std::get<0>(hypernetwork_forward_cpu(embeddings, w1, b1, w2, b2, activation));
}

}  // namespace

TORCH_LIBRARY_IMPL(sas, CPU, m) {
  m.impl("cpu_adapted_linear", &adapted_linear_cpu);
  m.impl("cpu_adapted_linear_forward", &adapted_linear_forward_cpu);
  m.impl("cpu_adapted_linear_quantized_forward", &quantized_linear_forward_cpu);
  m.impl("cpu_hypernetwork", &hypernetwork_cpu);
  m.impl("cpu_hypernetwork_forward", &hypernetwork_forward_cpu);
  m.impl("cpu_hypernetwork_backward", &hypernetwork_backward_cpu);
}

TORCH_LIBRARY_IMPL(sas, Autograd, m) {
  m.impl("cpu_adapted_linear", &adapted_linear_autograd);
  m.impl("cpu_adapted_linear_quantized", &quantized_linear_autograd);
  m.impl("cpu_hypernetwork", &hypernetwork_autograd);
}

}  // namespace sas
