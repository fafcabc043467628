// Rotary position embedding (non-interleaved halves) on CPU, one pass per direction.
//
// megatron-core's unfused RoPE, per head vector x of width D (first half a, second half b):
//
//     y = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-b, a]
//
// takes about ten passes over [S, B, H, D] per direction (products, a negation, two
// concatenations, their backward splits). Here each vector is read and written once, with the
// same products in the same order (the results are megatron's bits). Backward is the
// transpose: dx = dy * cos + [dy_b * sin_b, -(dy_a * sin_a)].
//
// cos/sin: [S, D] fp32 (megatron's cos/sin of its frequencies, one row per position); x and
// dy: [S, B, H, D] fp32 with unit stride in D (other strides free: the query is a view).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <cstdint>

namespace {

using mone_isa::Isa;

struct Rows {
  const float *x, *cos, *sin;
  int64_t B, H, D, xs0, xs1, xs2;
  float* y;  // contiguous [S, B, H, D]
};

// Rows [begin, end) of the flattened [S * B * H] head vectors.
template <Isa I>
MONE_ALWAYS_INLINE void rope_rows_body(const Rows& a, int64_t begin, int64_t end,
                                       bool backward) {
  const int64_t half = a.D / 2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t s = row / (a.B * a.H), b = (row / a.H) % a.B, h = row % a.H;
    const float* x = a.x + s * a.xs0 + b * a.xs1 + h * a.xs2;
    const float* c = a.cos + s * a.D;
    const float* n = a.sin + s * a.D;
    float* y = a.y + row * a.D;
    if (!backward) {
      for (int64_t j = 0; j < half; ++j) y[j] = x[j] * c[j] + (-x[j + half]) * n[j];
      for (int64_t j = half; j < a.D; ++j) y[j] = x[j] * c[j] + x[j - half] * n[j];
    } else {
      for (int64_t j = 0; j < half; ++j) y[j] = x[j] * c[j] + x[j + half] * n[j + half];
      for (int64_t j = half; j < a.D; ++j) y[j] = x[j] * c[j] + -(x[j - half] * n[j - half]);
    }
  }
}

MONE_ISA_VARIANTS(rope_rows, rope_rows_body)

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                bool backward) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.stride(3) == 1, "rope: x must be a CPU float32 [S, B, H, D] tensor with "
                  "contiguous rows");
  const int64_t S = x.size(0), B = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope: the rotated width must be even, got ", D);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == S && t->size(1) == D, "rope: cos and sin must be contiguous "
                    "float32 [S, D] = [", S, ", ", D, "], got ", t->sizes());
  }
  at::Tensor y = at::empty({S, B, H, D}, x.options());
  const Rows rows{x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), B, H, D,
                  x.stride(0), x.stride(1), x.stride(2), y.data_ptr<float>()};
  at::parallel_for(0, S * B * H, 64, [&](int64_t begin, int64_t end) {
    rope_rows(rows, begin, end, backward);
  });
  return y;
}

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope(x, cos, sin, false);
}

at::Tensor rope_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  return rope(dy, cos, sin, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mone_cpu, m) {
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_bwd(Tensor dy, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(mone_cpu, CPU, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
}
