// RMSNorm on CPU, forward and backward fused (torch 2.13 fuses only the CPU forward; its
// backward is the composite's ~10 autograd nodes, each a pass over [R, H]).
//
//     y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)                          (per row)
//     dx = rstd * (dy w - xhat * mean(dy w xhat)),  xhat = x * rstd
//     dw = sum over rows of dy * xhat
//
// Rows go to torch's intra-op threads in fixed blocks of kBlockRows; each block keeps its own
// partial dw and the partials are summed in block order, so results do not depend on the
// thread count (nor on the instruction set: cpu_isa.h). fp32 only: the Python wrapper upcasts
// other dtypes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 32;
constexpr int64_t kLanes = 16;

using mone_isa::Isa;

MONE_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

template <Isa I>
MONE_ALWAYS_INLINE void fwd_rows_body(const float* x, const float* w, float* y, float* rstd,
                                      int64_t H, double eps, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x_r = x + r * H;
    float* y_r = y + r * H;
    const float s = 1.0f / std::sqrt(dot(x_r, x_r, H) / static_cast<float>(H) +
                                     static_cast<float>(eps));
    rstd[r] = s;
    for (int64_t j = 0; j < H; ++j) y_r[j] = (x_r[j] * s) * w[j];
  }
}

MONE_ISA_VARIANTS(fwd_rows, fwd_rows_body)

template <Isa I>
MONE_ALWAYS_INLINE void bwd_rows_body(const float* dy, const float* x, const float* w,
                                      const float* rstd, float* dx, float* dw_partial,
                                      float* scratch, int64_t H, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float *dy_r = dy + r * H, *x_r = x + r * H;
    float* dx_r = dx + r * H;
    const float s = rstd[r];
    float* dyw = scratch;
    for (int64_t j = 0; j < H; ++j) {
      dyw[j] = dy_r[j] * w[j];
      dw_partial[j] += dy_r[j] * (x_r[j] * s);
    }
    const float c = dot(dyw, x_r, H) * s / static_cast<float>(H);
    for (int64_t j = 0; j < H; ++j) dx_r[j] = s * (dyw[j] - (x_r[j] * s) * c);
  }
}

MONE_ISA_VARIANTS(bwd_rows, bwd_rows_body)

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous CPU float32 tensor");
}

// x: [R, H], w: [H] -> (y [R, H], rstd [R])
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                                double eps) {
  check(x, "x");
  check(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1),
              "rms_norm: x must be [R, H] and weight [H], got ", x.sizes(), " and ", w.sizes());
  const int64_t R = x.size(0), H = x.size(1);
  at::Tensor y = at::empty({R, H}, x.options());
  at::Tensor rstd = at::empty({R}, x.options());
  const float *x_ptr = x.data_ptr<float>(), *w_ptr = w.data_ptr<float>();
  float *y_ptr = y.data_ptr<float>(), *rstd_ptr = rstd.data_ptr<float>();
  at::parallel_for(0, R, kBlockRows, [&](int64_t begin, int64_t end) {
    fwd_rows(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, begin, end);
  });
  return {y, rstd};
}

// -> (dx [R, H], dw [H])
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const at::Tensor& w, const at::Tensor& rstd) {
  check(dy, "dy");
  check(x, "x");
  check(w, "weight");
  check(rstd, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes() && x.dim() == 2 && w.numel() == x.size(1) &&
                  rstd.numel() == x.size(0), "rms_norm backward: inconsistent shapes");
  const int64_t R = x.size(0), H = x.size(1);
  at::Tensor dx = at::empty({R, H}, x.options());
  at::Tensor dw = at::zeros({H}, x.options());
  const int64_t blocks = (R + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial(blocks * H, 0.0f);
  const float *dy_ptr = dy.data_ptr<float>(), *x_ptr = x.data_ptr<float>();
  const float *w_ptr = w.data_ptr<float>(), *rstd_ptr = rstd.data_ptr<float>();
  float* dx_ptr = dx.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> scratch(H);
    for (int64_t b = block_begin; b < block_end; ++b)
      bwd_rows(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, partial.data() + b * H, scratch.data(),
               H, b * kBlockRows, std::min(R, (b + 1) * kBlockRows));
  });
  float* dw_ptr = dw.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < H; ++j) dw_ptr[j] += partial[b * H + j];
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mone_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mone_cpu, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}
