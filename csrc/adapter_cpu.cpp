// CPU kernels of the SaS adapter op (docs/design.md §1), for float32, bfloat16 and float16
// inputs with float32 accumulation.
//
//   forward:  u = x @ A.T;  y = base + s * (u * h) @ B.T        (u is returned for the backward)
//   backward: gB = g @ B;  dB = s * g.T @ (u * h);  dh = s * sum_rows(gB * u)
//             du = s * gB * h;  dA = du.T @ x;  dx = du @ A
//
// Rows are processed in blocks of kRowsPerBlock: the block's rank-r intermediates
// (u, gB, du) live in a small buffer, and each row of x, base and g is read from
// memory once per pass (the backward re-reads a block of g and x from cache, not
// from memory). The rows are split over threads with at::parallel_for; the
// backward's weight gradients are summed per chunk of rows into private partials
// and the partials added in chunk order, with a chunk split that does not depend
// on the thread count, so every thread count gives bitwise the same result.
#include "adapter_cpu.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sas {
namespace {

using simd::kLanes;
using simd::Vec;

// Rows per block: the block's grad_y rows (16 x 3072 floats = 192 KiB at ViT-B fc1)
// stay in L2 between the gB pass and the dB pass that re-reads them.
// Output columns per chunk: rank 8 x 512 float32 weights = 16 KiB, which stays in L1
// while a block of rows is written.
// Measured on the 2-core CI machine (1 thread, ViT-B shapes, rank 8): every pair of
// 8/16/32 rows and 256/512/1024 columns was within run-to-run noise (about 10%) of
// 16/512; e.g. 768->3072 backward 14.3 ms at 16/512, 15.0-16.4 ms at 8 rows.
constexpr int64_t kRowsPerBlock = 16;
constexpr int64_t kColumnsPerChunk = 512;
// The backward sums weight gradients over at most this many row chunks, each with
// its own partial buffer (8 x (768 + 3072) floats = 120 KiB at ViT-B fc1). Fixed,
// not the thread count, so results do not depend on threads; 16 keeps up to 16
// cores busy and the final sum of partials small next to reading grad_y.
constexpr int64_t kMaxRowChunks = 16;
// Rank tile of the register-blocked loops: 8 accumulators of 16 lanes fill half of
// the AVX-512 register file (all of AVX2's), leaving room for the loaded operands.
constexpr int kMaxRankTile = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls body(offset, count) for each run of kLanes elements of [0, len), then
// once for the tail; `count` is a compile-time kLanes in the main loop once inlined.
template <typename Body>
inline void for_each_vector(int64_t len, Body&& body) {
  int64_t offset = 0;
  for (; offset + kLanes <= len; offset += kLanes) body(offset, kLanes);
  if (offset < len) body(offset, len - offset);
}

// Calls fn(std::integral_constant<int, R>{}, first_rank) for rank tiles 8, 8, ..., 4, 2, 1
// covering [0, rank), so the register-blocked loops know their tile at compile time.
template <typename Fn>
inline void for_each_rank_tile(int64_t rank, Fn&& fn) {
  int64_t first = 0;
  for (; first + kMaxRankTile <= rank; first += kMaxRankTile) fn(std::integral_constant<int, kMaxRankTile>{}, first);
  if (rank - first >= 4) {
    fn(std::integral_constant<int, 4>{}, first);
    first += 4;
  }
  if (rank - first >= 2) {
    fn(std::integral_constant<int, 2>{}, first);
    first += 2;
  }
  if (rank - first >= 1) fn(std::integral_constant<int, 1>{}, first);
}

// out[m * rank + k] = sum_j rows[m * row_stride + j] * weights[k * len + j] for M rows and
// the R ranks of one tile. Two rows share each weight load, which halves the weight
// traffic from L2 (the 96 KiB B of ViT-B fc1 does not fit L1); 2 x 8 accumulators
// still leave half of the AVX-512 registers free.
template <int R, int M, typename T>
void dot_rows(const T* rows, int64_t row_stride, const float* weights, int64_t len, int64_t rank, float* out) {
  Vec sums[M][R] = {};
  for_each_vector(len, [&](int64_t j, int64_t count) {
    Vec values[M];
    for (int m = 0; m < M; ++m) values[m] = simd::load_n(rows + m * row_stride + j, count);
    for (int k = 0; k < R; ++k) {
      const Vec weight = simd::load_n(weights + k * len + j, count);
      for (int m = 0; m < M; ++m) sums[m][k] += values[m] * weight;
    }
  });
  for (int m = 0; m < M; ++m) simd::horizontal_sums<R>(sums[m], out + m * rank);
}

// Rows per dot_rows call for a tile of R ranks: two where their M x R accumulators, M row vectors and the
// weight vector fit the register file (every tile on AVX-512), else one (R = 8 on AVX2, whose 19 vectors
// would spill).
template <int R>
constexpr int kDotRows = 2 * R + 2 + 1 <= simd::kRegisters ? 2 : 1;

// out[i * rank + k] = sum_j rows[i * row_stride + j] * weights[k * len + j] for every
// row i < num_rows and rank k < rank: a block of u = x @ A.T or of gB = g @ B.
template <typename T>
void dot_block(const T* rows, int64_t row_stride, int64_t num_rows, const float* weights, int64_t len, int64_t rank,
               float* out) {
  for_each_rank_tile(rank, [&](auto tile, int64_t first) {
    constexpr int R = decltype(tile)::value;
    constexpr int M = kDotRows<R>;
    int64_t i = 0;
    for (; i + M <= num_rows; i += M) {
      dot_rows<R, M>(rows + i * row_stride, row_stride, weights + first * len, len, rank, out + i * rank + first);
    }
    if (i < num_rows) {
      dot_rows<R, 1>(rows + i * row_stride, row_stride, weights + first * len, len, rank, out + i * rank + first);
    }
  });
}

// sums[k * len + j] += sum_n coefficients[n * rank + k] * rows[n * row_stride + j]
// for the R ranks of one tile: an (R x num_rows) @ (num_rows x len) product
// accumulated in registers, one 16-column strip at a time.
template <int R, typename T>
void accumulate_outer(float* sums, const float* coefficients, int64_t rank, const T* rows, int64_t row_stride,
                      int64_t num_rows, int64_t len) {
  for_each_vector(len, [&](int64_t j, int64_t count) {
    Vec strip[R];
    for (int k = 0; k < R; ++k) strip[k] = simd::load_n(sums + k * len + j, count);
    for (int64_t n = 0; n < num_rows; ++n) {
      const Vec values = simd::load_n(rows + n * row_stride + j, count);
      for (int k = 0; k < R; ++k) strip[k] += coefficients[n * rank + k] * values;
    }
    for (int k = 0; k < R; ++k) simd::store_n(sums + k * len + j, strip[k], count);
  });
}

// out[m * out_stride + j] = base[m * base_stride + j]
//                           + sum_k coefficients[m * rank + k] * weights[k * weight_stride + j]
// for M rows and j < len (no base term when base is null). M rows give M independent
// FMA chains that share each weight load; with one row the rank-long chain of dependent
// FMAs was the bound: ViT-B 768->768 forward on one thread, cache-resident, went from
// 5.1 to 3.3 ms per 6304 rows with 4 rows at a time (AVX-512).
// The rank sum starts from zero and base is added once at the end, as PyTorch's
// base + s * (v @ B.T) does: seeding the chain with base rounds every one of the rank
// additions at base's magnitude, which put fp32 y at 3.8 ulp of 1.17 (1.16x the bound)
// for d_in=1, d_out=34, rank 20, scale 1/16 against PyTorch's 0.5 ulp.
template <int M, typename T>
void combine_rows(const T* base, int64_t base_stride, const float* coefficients, const float* weights,
                  int64_t weight_stride, int64_t rank, int64_t len, T* out, int64_t out_stride) {
  for_each_vector(len, [&](int64_t j, int64_t count) {
    Vec sums[M] = {};
    for (int64_t k = 0; k < rank; ++k) {
      const Vec weight = simd::load_n(weights + k * weight_stride + j, count);
      for (int m = 0; m < M; ++m) sums[m] += coefficients[m * rank + k] * weight;
    }
    if (base) {
      for (int m = 0; m < M; ++m) sums[m] = simd::load_n(base + m * base_stride + j, count) + sums[m];
    }
    for (int m = 0; m < M; ++m) simd::store_n(out + m * out_stride + j, sums[m], count);
  });
}

// combine_rows over num_rows rows, eight at a time: eight independent FMA chains keep both FMA units of a
// Zen 3 core busy through their 4-cycle latency, where four left half the issue slots idle. One thread,
// 2048 rows, MiniLM's six layers of a block: forward 6.39 -> 5.97 ms, backward 10.67 -> 9.27 ms (best of 7).
template <typename T>
void combine_block(const T* base, int64_t base_stride, const float* coefficients, const float* weights,
                   int64_t weight_stride, int64_t rank, int64_t num_rows, int64_t len, T* out, int64_t out_stride) {
  constexpr int kRowsAtOnce = 8;
  int64_t i = 0;
  for (; i + kRowsAtOnce <= num_rows; i += kRowsAtOnce) {
    combine_rows<kRowsAtOnce>(base ? base + i * base_stride : nullptr, base_stride, coefficients + i * rank, weights,
                              weight_stride, rank, len, out + i * out_stride, out_stride);
  }
  for (; i < num_rows; ++i) {
    combine_rows<1>(base ? base + i * base_stride : nullptr, base_stride, coefficients + i * rank, weights,
                    weight_stride, rank, len, out + i * out_stride, out_stride);
  }
}

// Per-row modulation: one shared h (rank,), or h (tasks, rank) picked by task_ids,
// which hold one id per row or one per group of rows_per_id consecutive rows.
struct Modulation {
  const float* h;
  const int64_t* task_ids;  // null for a shared h
  int64_t rows_per_id;
  int64_t rank;

  int64_t task(int64_t row) const { return task_ids ? task_ids[row / rows_per_id] : 0; }
  const float* of_row(int64_t row) const { return h + task(row) * rank; }
};

// The operands every kernel shares, as float32 copies of the (small) weights.
struct Weights {
  int64_t d_in, d_out, rank;
  float scale;
  const float* A;   // (rank, d_in)
  const float* Bt;  // (rank, d_out): B transposed, so each rank's column of B is one contiguous row
  Modulation modulation;
};

// Rows [row0, row0 + count) of x as their 8-bit copy (sas.reference.quantize_rows): per row, the absmax
// scaled to the kind's largest value (kSavedInt8Limit, kSavedFp8Limit), rounded to nearest even, and the fp32 scale.
// The rows were just read by the block's u = x @ A.T, so they come from cache. A row holding NaN or Inf
// gets a NaN scale (v * 0 is NaN there), as in the oracle; the divisions are IEEE, rounded once, as its.
// The absmax is floored at limit * 2^-126 (sas.reference.QUANTIZED_SCALE_MIN): a tiny finite row's
// limit / absmax would overflow to inf, and its scale be subnormal.
template <typename T>
void quantize_block(const T* x, int64_t x_stride, int64_t row0, int64_t count, int64_t d_in, const SavedCopy& copy) {
  const float limit = copy.kind == kSavedInt8 ? kSavedInt8Limit : kSavedFp8Limit;
  const float floor = limit * std::ldexp(1.0f, -126);  // exact: a power of two times 127 or 448
  float* scales = copy.scale.mutable_data_ptr<float>() + row0;
  for (int64_t i = 0; i < count; ++i) {
    const T* row = x + i * x_stride;
    float absmax = 0.0f, non_finite = 0.0f;
    for (int64_t j = 0; j < d_in; ++j) {
      const float v = static_cast<float>(row[j]);
      absmax = std::max(absmax, std::fabs(v));
      non_finite += v * 0.0f;
    }
    const float floored = std::max(absmax, floor);
    const float inverse = absmax > 0.0f ? limit / floored : 0.0f;
    scales[i] = (absmax > 0.0f ? floored / limit : 0.0f) + non_finite;
    const int64_t offset = (row0 + i) * d_in;
    if (copy.kind == kSavedInt8) {
      int8_t* q = copy.q.mutable_data_ptr<int8_t>() + offset;
      for (int64_t j = 0; j < d_in; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(std::clamp(static_cast<float>(row[j]) * inverse, -limit, limit)));
      }
    } else {
      c10::Float8_e4m3fn* q = copy.q.mutable_data_ptr<c10::Float8_e4m3fn>() + offset;
      for (int64_t j = 0; j < d_in; ++j) {
        q[j] = c10::Float8_e4m3fn(std::clamp(static_cast<float>(row[j]) * inverse, -limit, limit));
      }
    }
  }
}

template <typename T>
void forward_kernel(const Weights& w, int64_t rows, const T* x, int64_t x_stride, const T* base, int64_t base_stride,
                    T* y, float* u, const SavedCopy* copy) {
  const int64_t rank = w.rank;
  at::parallel_for(0, ceil_div(rows, kRowsPerBlock), 1, [&](int64_t first_block, int64_t last_block) {
    std::vector<float> modulated(kRowsPerBlock * rank);  // s * u * h of the block's rows
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t row0 = block * kRowsPerBlock;
      const int64_t count = std::min(kRowsPerBlock, rows - row0);
      dot_block(x + row0 * x_stride, x_stride, count, w.A, w.d_in, rank, u + row0 * rank);
      if (copy) quantize_block(x + row0 * x_stride, x_stride, row0, count, w.d_in, *copy);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t n = row0 + i;
        const float* u_row = u + n * rank;
        const float* h = w.modulation.of_row(n);
        for (int64_t k = 0; k < rank; ++k) modulated[i * rank + k] = w.scale * u_row[k] * h[k];
      }
      for (int64_t col0 = 0; col0 < w.d_out; col0 += kColumnsPerChunk) {
        const int64_t width = std::min(kColumnsPerChunk, w.d_out - col0);
        combine_block(base + row0 * base_stride + col0, base_stride, modulated.data(), w.Bt + col0, w.d_out, rank,
                      count, width, y + row0 * w.d_out + col0, w.d_out);
      }
    }
  });
}

// Fills grad_x and, per row chunk c, partial_A[c] (rank, d_in), partial_Bt[c] (rank, d_out)
// and partial_h[c] (tasks, rank); the caller sums the partials over c. x holds what the forward kept of the
// input, in S: x itself (S = T), or its 8-bit copy with x_scale the per-row scales, which go into the
// coefficients (du) so the copy's values are widened exactly; without `with_A` (no x kept) there is no dA:
// x and partial_A are not touched.
template <typename T, typename S>
void backward_kernel(const Weights& w, int64_t rows, int64_t num_chunks, const T* grad_y, int64_t g_stride,
                     bool with_A, const S* x, int64_t x_stride, const float* x_scale, const float* u, int64_t tasks,
                     T* grad_x, float* partial_A, float* partial_Bt, float* partial_h) {
  const int64_t rank = w.rank;
  const int64_t num_blocks = ceil_div(rows, kRowsPerBlock);
  at::parallel_for(0, num_chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    std::vector<float> modulated(kRowsPerBlock * rank);  // s * u * h
    std::vector<float> grad_u(kRowsPerBlock * rank);     // du = s * (g @ B) * h
    std::vector<float> scaled_grad_u(x_scale ? kRowsPerBlock * rank : 0);  // du times each row's scale
    for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
      float* sum_A = with_A ? partial_A + chunk * rank * w.d_in : nullptr;
      float* sum_Bt = partial_Bt + chunk * rank * w.d_out;
      float* sum_h = partial_h + chunk * tasks * rank;
      // Zeroed here, by the thread that fills them, rather than by a separate parallel fill.
      if (sum_A) std::fill(sum_A, sum_A + rank * w.d_in, 0.0f);
      std::fill(sum_Bt, sum_Bt + rank * w.d_out, 0.0f);
      std::fill(sum_h, sum_h + tasks * rank, 0.0f);
      for (int64_t block = chunk * num_blocks / num_chunks; block < (chunk + 1) * num_blocks / num_chunks; ++block) {
        const int64_t row0 = block * kRowsPerBlock;
        const int64_t count = std::min(kRowsPerBlock, rows - row0);
        dot_block(grad_y + row0 * g_stride, g_stride, count, w.Bt, w.d_out, rank, grad_u.data());
        for (int64_t i = 0; i < count; ++i) {
          const int64_t n = row0 + i;
          float* gB = grad_u.data() + i * rank;
          const float* h = w.modulation.of_row(n);
          float* dh = sum_h + w.modulation.task(n) * rank;
          for (int64_t k = 0; k < rank; ++k) {
            const float u_nk = u[n * rank + k];
            dh[k] += w.scale * gB[k] * u_nk;
            modulated[i * rank + k] = w.scale * u_nk * h[k];
            gB[k] = w.scale * gB[k] * h[k];  // now du
          }
        }
        const float* coefficients_A = grad_u.data();
        if (x_scale) {
          for (int64_t i = 0; i < count; ++i) {
            for (int64_t k = 0; k < rank; ++k) scaled_grad_u[i * rank + k] = grad_u[i * rank + k] * x_scale[row0 + i];
          }
          coefficients_A = scaled_grad_u.data();
        }
        for_each_rank_tile(rank, [&](auto tile, int64_t first) {
          constexpr int R = decltype(tile)::value;
          accumulate_outer<R>(sum_Bt + first * w.d_out, modulated.data() + first, rank, grad_y + row0 * g_stride,
                              g_stride, count, w.d_out);
          if (with_A) {
            accumulate_outer<R>(sum_A + first * w.d_in, coefficients_A + first, rank, x + row0 * x_stride, x_stride,
                                count, w.d_in);
          }
        });
        for (int64_t col0 = 0; col0 < w.d_in; col0 += kColumnsPerChunk) {
          const int64_t width = std::min(kColumnsPerChunk, w.d_in - col0);
          combine_block<T>(nullptr, 0, grad_u.data(), w.A + col0, w.d_in, rank, count, width,
                           grad_x + row0 * w.d_in + col0, w.d_in);
        }
      }
    }
  });
}

// (num_chunks, size) partials -> (size,) sums, chunk 0 first: a fixed order, so the
// result does not depend on threads. Serial on purpose: it is about 0.5M adds at ViT-B
// fc1, and each extra parallel region of an op can stall on a descheduled thread when
// the machine is busy.
at::Tensor sum_partials(const at::Tensor& partials) {
  const int64_t num_chunks = partials.size(0);
  const int64_t size = partials.numel() / num_chunks;
  at::Tensor total = partials[0].clone().view({size});
  const float* src = partials.const_data_ptr<float>();
  float* dst = total.mutable_data_ptr<float>();
  for (int64_t c = 1; c < num_chunks; ++c) {
    for (int64_t e = 0; e < size; ++e) dst[e] += src[c * size + e];
  }
  return total;
}

bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Calls fn(T{}) with the element type of `dtype`, one of the kernel dtypes (checked
// before): ATen's dispatch macros would also instantiate every kernel for double.
template <typename Fn>
void dispatch_kernel_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, "sas: no CPU kernel for dtype ", dtype);
  }
}

// Calls fn(S{}) with the element type of what the forward kept of x: x's own type T, or an 8-bit copy.
template <typename T, typename Fn>
void dispatch_saved_dtype(at::ScalarType saved, Fn&& fn) {
  switch (saved) {
    case at::kChar:
      return fn(int8_t{});
    case at::kFloat8_e4m3fn:
      return fn(c10::Float8_e4m3fn{});
    default:
      return fn(T{});
  }
}

// Row-major with unit column stride, any row stride (0 included): what the kernels read.
// Only a tensor whose columns are strided is copied, since strided columns defeat vector loads.
at::Tensor with_unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

// Checks what the Python wrapper guarantees, so direct calls of the ops fail clearly too.
void check_operands(const char* op, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& h, const std::optional<at::Tensor>& task_ids, int64_t d_out) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, d_in), got ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": dtype ", x.scalar_type(),
              " is not supported (float32, bfloat16, float16)");
  for (const at::Tensor* t : {&A, &B, &h}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": every tensor must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), op, ": expects CPU tensors, got one on ", t->device());
  }
  const int64_t rank = A.size(0);
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1) && rank >= 1, op, ": A must be (rank, d_in=", x.size(1),
              "), got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == d_out && B.size(1) == rank, op, ": B must be (d_out=", d_out,
              ", rank=", rank, "), got ", B.sizes());
  TORCH_CHECK((h.dim() == 1 || h.dim() == 2) && h.size(-1) == rank, op, ": h must be (rank=", rank,
              ",) or (tasks, rank), got ", h.sizes());
  TORCH_CHECK((h.dim() == 2) == task_ids.has_value(), op, ": task_ids must be given exactly when h is (tasks, rank)");
  if (task_ids) {
    const at::Tensor& ids = *task_ids;
    const int64_t rows = x.size(0);
    TORCH_CHECK(ids.dim() == 1 && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt), op,
                ": task_ids must be a 1-D int32/int64 tensor, got ", ids.sizes(), " ", ids.scalar_type());
    TORCH_CHECK(ids.numel() > 0 ? rows % ids.numel() == 0 : rows == 0, op, ": ", ids.numel(),
                " task_ids do not split ", rows, " rows evenly");
    if (ids.numel() > 0) {
      const int64_t lowest = ids.min().item<int64_t>();
      const int64_t highest = ids.max().item<int64_t>();
      TORCH_CHECK(lowest >= 0 && highest < h.size(0), op, ": task_ids must lie in [0, ", h.size(0), "), got [",
                  lowest, ", ", highest, "]");
    }
  }
}

// The frozen weight W0 laid out for the backward's grad_x += grad_y @ W0. PyTorch's CPU GEMMs for bfloat16
// and float16 without AVX512-BF16 or AMX run a fallback whose speed depends on the second operand's layout:
// row-major W0 (autograd's own layout for this product) is an order of magnitude slower than a column-major
// copy. 512 rows, 2 threads,
// Zen 3 EPYC, bfloat16: 384->384 72 vs 8.5 ms, 384->1536 289 vs 30 ms, 1536->384 450 vs 34 ms with the copy
// made in each call (float16 alike). The copy is one (d_out, d_in) transpose, nothing next to the product.
// float32 runs MKL, where the row-major W0 is the faster one (2048 rows: 13.1 vs 14.1 ms at 1536->384).
at::Tensor frozen_weight_for_input_grad(const at::Tensor& weight) {
  const bool half = weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf;
  return half ? weight.t().contiguous().t() : weight;
}

// Holds the float32 weights and int64 ids that Weights points into.
struct PreparedWeights {
  at::Tensor A, Bt, h, task_ids;
  Weights view;
};

PreparedWeights prepare_weights(const at::Tensor& A, const at::Tensor& B, const at::Tensor& h, double scale,
                                const std::optional<at::Tensor>& task_ids, int64_t rows) {
  PreparedWeights p;
  p.A = A.to(at::kFloat).contiguous();
  p.Bt = B.t().to(at::kFloat).contiguous();
  p.h = h.to(at::kFloat).contiguous();
  const int64_t* ids = nullptr;
  int64_t rows_per_id = 1;
  if (task_ids && task_ids->numel() > 0) {
    p.task_ids = task_ids->to(at::kLong).contiguous();
    ids = p.task_ids.data_ptr<int64_t>();
    rows_per_id = rows / task_ids->numel();
  }
  const int64_t rank = A.size(0);
  p.view = Weights{A.size(1), B.size(0), rank, static_cast<float>(scale), p.A.data_ptr<float>(),
                   p.Bt.data_ptr<float>(), Modulation{p.h.data_ptr<float>(), ids, rows_per_id, rank}};
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x_in, const at::Tensor& base_in,
                                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& h,
                                                   double scale, const std::optional<at::Tensor>& task_ids,
                                                   const SavedCopy* copy, bool into_base) {
  constexpr const char* op = "sas::cpu_adapter_forward";
  TORCH_CHECK(base_in.dim() == 2 && x_in.dim() == 2 && base_in.size(0) == x_in.size(0), op,
              ": x (rows, d_in) and base (rows, d_out) must be 2-D with equal rows, got ", x_in.sizes(), " and ",
              base_in.sizes());
  TORCH_CHECK(base_in.scalar_type() == x_in.scalar_type() && base_in.device().is_cpu(), op,
              ": base must be a CPU tensor of x's dtype");
  check_operands(op, x_in, A, B, h, task_ids, base_in.size(1));
  const at::Tensor x = with_unit_column_stride(x_in);
  const at::Tensor base = with_unit_column_stride(base_in);
  const int64_t rows = x.size(0);
  PreparedWeights weights = prepare_weights(A, B, h, scale, task_ids, rows);
  // Writing y over the caller's base (each element is read, then written, by the same vector op in
  // combine_rows) spares a fresh (rows, d_out) buffer: its page faults and the cache-line fills of writing
  // it. MiniLM's 2048 x 384 -> 1536 layer, 2 loaded threads, alternating medians: the layer forward went
  // from 1.53x / 1.44x to 1.32x / 1.36x the bare F.linear in two runs, y bit for bit the same.
  at::Tensor y = into_base && base.is_contiguous()
                     ? base
                     : at::empty(base.sizes(), base.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor u = at::empty({rows, A.size(0)}, x.options().dtype(at::kFloat));
  dispatch_kernel_dtype(x.scalar_type(), [&](auto element) {
    using T = decltype(element);
    forward_kernel<T>(weights.view, rows, x.const_data_ptr<T>(), x.stride(0), base.const_data_ptr<T>(),
                      base.stride(0), y.mutable_data_ptr<T>(), u.mutable_data_ptr<float>(), copy);
  });
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& x_kept, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& h, const at::Tensor& u_in, double scale, const std::optional<at::Tensor>& task_ids,
    const std::optional<at::Tensor>& x_scale_in, const std::optional<at::Tensor>& frozen_weight) {
  constexpr const char* op = "sas::cpu_adapter_backward";
  TORCH_CHECK(grad_y_in.dim() == 2, op, ": grad_y must be 2-D (rows, d_out), got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.device().is_cpu(), op, ": expects CPU tensors, got grad_y on ", grad_y_in.device());
  TORCH_CHECK(A.dim() == 2, op, ": A must be (rank, d_in), got ", A.sizes());
  const int64_t rows = grad_y_in.size(0), d_in = A.size(1);
  // Checked as the forward's x would be: grad_y carries the compute dtype, x may be an 8-bit copy.
  check_operands(op, grad_y_in.new_empty({}).expand({rows, d_in}), A, B, h, task_ids, grad_y_in.size(1));
  const bool quantized = x_scale_in.has_value();
  if (x_kept) {
    const at::Tensor& kept = *x_kept;
    const at::ScalarType expected = quantized ? kept.scalar_type() : grad_y_in.scalar_type();
    TORCH_CHECK(kept.dim() == 2 && kept.size(0) == rows && kept.size(1) == d_in && kept.device().is_cpu() &&
                    kept.scalar_type() == expected,
                op, ": x must be the CPU (rows=", rows, ", d_in=", d_in, ") input of grad_y's dtype or its 8-bit copy, got ",
                kept.sizes(), " ", kept.scalar_type());
    TORCH_CHECK(!quantized || kept.scalar_type() == at::kChar || kept.scalar_type() == at::kFloat8_e4m3fn, op,
                ": with x_scale, x must be an int8 or float8_e4m3fn copy, got ", kept.scalar_type());
  }
  TORCH_CHECK(!quantized || (x_kept && x_scale_in->dim() == 1 && x_scale_in->size(0) == rows &&
                             x_scale_in->scalar_type() == at::kFloat),
              op, ": x_scale must be the float32 (rows=", rows, ",) scales of the 8-bit copy x");
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(0) == rows && u_in.size(1) == A.size(0) &&
                  u_in.scalar_type() == at::kFloat,
              op, ": u must be the float32 (rows, rank) tensor saved by the forward, got ", u_in.sizes(), " ",
              u_in.scalar_type());
  TORCH_CHECK(!frozen_weight || (frozen_weight->dim() == 2 && frozen_weight->size(0) == grad_y_in.size(1) &&
                                 frozen_weight->size(1) == d_in &&
                                 frozen_weight->scalar_type() == grad_y_in.scalar_type() &&
                                 frozen_weight->device().is_cpu()),
              op, ": frozen_weight must be the CPU (d_out=", grad_y_in.size(1), ", d_in=", d_in,
              ") weight of grad_y's dtype");
  const at::Tensor grad_y = with_unit_column_stride(grad_y_in);
  // An 8-bit copy is made contiguous by the forward; x itself is read through its row stride.
  const at::Tensor x = x_kept ? (quantized ? x_kept->contiguous() : with_unit_column_stride(*x_kept)) : at::Tensor();
  const at::Tensor x_scale = quantized ? x_scale_in->contiguous() : at::Tensor();
  const at::Tensor u = u_in.contiguous();
  const int64_t rank = A.size(0), d_out = grad_y.size(1);
  const int64_t tasks = h.dim() == 2 ? h.size(0) : 1;
  PreparedWeights weights = prepare_weights(A, B, h, scale, task_ids, rows);
  const int64_t num_chunks = std::clamp<int64_t>(ceil_div(rows, kRowsPerBlock), 1, kMaxRowChunks);
  const at::TensorOptions f32 = grad_y.options().dtype(at::kFloat);
  at::Tensor partial_A = at::empty({x.defined() ? num_chunks : 0, rank, d_in}, f32);
  at::Tensor partial_Bt = at::empty({num_chunks, rank, d_out}, f32);
  at::Tensor partial_h = at::empty({num_chunks, tasks, rank}, f32);
  at::Tensor grad_x = at::empty({rows, d_in}, grad_y.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType dtype = grad_y.scalar_type();
  dispatch_kernel_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    dispatch_saved_dtype<T>(x.defined() ? x.scalar_type() : dtype, [&](auto saved) {
      using S = decltype(saved);
      backward_kernel<T, S>(weights.view, rows, num_chunks, grad_y.const_data_ptr<T>(), grad_y.stride(0),
                            x.defined(), x.defined() ? x.const_data_ptr<S>() : nullptr, x.defined() ? x.stride(0) : 0,
                            quantized ? x_scale.const_data_ptr<float>() : nullptr, u.const_data_ptr<float>(), tasks,
                            grad_x.mutable_data_ptr<T>(), partial_A.mutable_data_ptr<float>(),
                            partial_Bt.mutable_data_ptr<float>(), partial_h.mutable_data_ptr<float>());
    });
  });
  if (frozen_weight) grad_x.addmm_(grad_y, frozen_weight_for_input_grad(*frozen_weight));
  at::Tensor grad_A = x.defined() ? sum_partials(partial_A).view({rank, d_in}).to(dtype)
                                  : at::empty({0, d_in}, A.options());
  at::Tensor grad_B = sum_partials(partial_Bt).view({rank, d_out}).t().to(dtype).contiguous();
  at::Tensor grad_h = sum_partials(partial_h).view(h.sizes()).to(dtype);
  return {grad_x, grad_A, grad_B, grad_h};
}

// The op's schema has no copy argument: the layer ops (layer_cpu.cpp) write copies.
std::tuple<at::Tensor, at::Tensor> adapter_forward_op(const at::Tensor& x, const at::Tensor& base, const at::Tensor& A,
                                                      const at::Tensor& B, const at::Tensor& h, double scale,
                                                      const std::optional<at::Tensor>& task_ids) {
  return adapter_forward(x, base, A, B, h, scale, task_ids);
}

TORCH_LIBRARY_IMPL(sas, CPU, m) {
  m.impl("cpu_adapter_forward", &adapter_forward_op);
  m.impl("cpu_adapter_backward", &adapter_backward);
}

}  // namespace sas
