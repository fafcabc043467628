// The MoNE activation on CPU: one fused pass per direction over each row of [T, F].
//
// Same definition as mone_kernels/reference.py (which this is tested against):
//
//     g_TF    = SiLU(gate_TF)                 (computed by torch before the call: same bits)
//     mask_TF = top-K of |g_TF| per row, ties to the lower neuron index (exactly K per row)
//     h_TF    = (g_TF * mask_TF) * up_TF
//
// and the expert's neuron-granular balance loss statistics
//
//     c_F = sum_t mask_t,   s_T = sum_i |g_ti|,   share_T = (|g_T| . c_F) / s_T.
//
// The eager reference makes ~10 memory-bound passes over [T, F] per direction plus a
// selection; here each row is read once (twice with the balance statistics: c needs every row),
// its selection done in cache by a bit-by-bit search of the K-th largest score's bit pattern
// (non-negative IEEE floats order like their bits read as integers, so the selection is exact;
// the Triton kernel searches the same way), and the rows are split over torch's intra-op
// threads. fp32 only; the Python wrapper upcasts like the reference.
//
// The search has a portable version and an AVX-512 one, chosen at load time by the CPU; set
// MONE_CPU_KERNEL_NO_AVX512=1 to force the portable one (the tests check both).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define MONE_HAVE_AVX512_PATH 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr float kTiny = 1.17549435e-38f;  // torch.finfo(torch.float32).tiny, as the reference
constexpr int64_t kLanes = 16;            // independent partial sums: vectorisable reductions

// The row loops are compiled for AVX-512, AVX2 and the x86-64 baseline; the loader picks the
// best the CPU has at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MONE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MONE_CLONES
#endif

// Row blocks: contiguous row ranges, one per intra-op thread at most, each with its own
// partial neuron counts (integers in fp32: exact, so the order of the final sum is irrelevant).
int64_t num_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              name, " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols <= 1, name, " rows must be contiguous");
}

inline int64_t count_at_least(const uint32_t* v, int64_t n, uint32_t x) {
  uint32_t count = 0;  // 32-bit lanes: the compare and the sum vectorise at full width
  for (int64_t j = 0; j < n; ++j) count += v[j] >= x;
  return count;
}

// The k-th largest of n non-negative floats given as bit patterns (which order like the
// floats), exactly: the largest x with #(v >= x) >= k, found bit by bit. The 8 exponent bits
// are searched over the whole row, the 23 mantissa bits over the row's values with that
// exponent only (gathered into cand: n + 16 entries of scratch, zero-padded to whole vectors).
inline uint32_t kth_largest_bits(const uint32_t* v, int64_t n, int64_t k, uint32_t* cand) {
  uint32_t kth = 0;
  for (int bit = 30; bit >= 23; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least(v, n, x) >= k) kth = x;
  }
  const uint32_t exponent = kth >> 23;
  const int64_t above = count_at_least(v, n, (exponent + 1) << 23);
  int64_t num_cand = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[num_cand] = v[j];
    num_cand += (v[j] >> 23) == exponent;
  }
  const int64_t k_in_bucket = k - above;
  while (num_cand % 16) cand[num_cand++] = 0;
  for (int bit = 22; bit >= 0; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least(cand, num_cand, x) >= k_in_bucket) kth = x;
  }
  return kth;
}

#ifdef MONE_HAVE_AVX512_PATH
// The same search with AVX-512 written out: a pass's count is the popcount of compare masks
// (no horizontal sum at its end), and the bucket's values are gathered with vector compress.
// Lanes past n are masked off (they read as 0, below any x > 0 searched for).
#define MONE_AVX512 __attribute__((target("avx512f,popcnt")))

MONE_AVX512 inline __mmask16 lanes_from(int64_t j, int64_t n) {
  return j + 16 <= n ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

MONE_AVX512 inline int64_t count_at_least_avx512(const uint32_t* v, int64_t n, uint32_t x) {
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(x));
  int64_t even = 0, odd = 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    even += _mm_popcnt_u32(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(v + j), threshold));
    odd += _mm_popcnt_u32(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(v + j + 16), threshold));
  }
  for (; j < n; j += 16) {
    const __mmask16 lanes = lanes_from(j, n);
    even += _mm_popcnt_u32(
        _mm512_mask_cmpge_epu32_mask(lanes, _mm512_maskz_loadu_epi32(lanes, v + j), threshold));
  }
  return even + odd;
}

MONE_AVX512 uint32_t kth_largest_bits_avx512(const uint32_t* v, int64_t n, int64_t k,
                                              uint32_t* cand) {
  uint32_t kth = 0;
  for (int bit = 30; bit >= 23; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least_avx512(v, n, x) >= k) kth = x;
  }
  const uint32_t exponent = kth >> 23;
  const int64_t k_in_bucket = k - count_at_least_avx512(v, n, (exponent + 1) << 23);
  const __m512i bucket = _mm512_set1_epi32(static_cast<int>(exponent));
  int64_t num_cand = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_from(j, n);
    const __m512i x = _mm512_maskz_loadu_epi32(lanes, v + j);
    const __mmask16 in = _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_srli_epi32(x, 23), bucket);
    _mm512_storeu_si512(cand + num_cand, _mm512_maskz_compress_epi32(in, x));
    num_cand += _mm_popcnt_u32(in);
  }
  for (int bit = 22; bit >= 0; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least_avx512(cand, num_cand, x) >= k_in_bucket) kth = x;
  }
  return kth;
}

const bool kUseAvx512 = std::getenv("MONE_CPU_KERNEL_NO_AVX512") == nullptr &&
                        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
#else
constexpr bool kUseAvx512 = false;
#endif

inline float abs_sum(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += std::fabs(x[j + l]);
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += std::fabs(x[j]);
  return total;
}

inline float abs_dot(const float* x, const float* w, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += std::fabs(x[j + l]) * w[j + l];
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += std::fabs(x[j]) * w[j];
  return total;
}

struct FwdRows {
  const float* g;
  const float* up;
  int64_t g_ld, up_ld, F, k;
  float* h;
  uint8_t* mask;
  float* sums;             // null without the balance statistics
  const float* row_scale;  // null: h unscaled; else h_t *= row_scale[t] (router probability)
};

// Rows [begin, end): selection, mask, h, and (with sums) row sums and neuron counts.
MONE_CLONES void fwd_rows(const FwdRows& a, int64_t begin, int64_t end, float* counts,
                          uint32_t* bits, uint32_t* cand) {
  const int64_t F = a.F, k = a.k;
  for (int64_t t = begin; t < end; ++t) {
    const float* g_t = a.g + t * a.g_ld;
    const float* up_t = a.up + t * a.up_ld;
    float* h_t = a.h + t * F;
    uint8_t* m_t = a.mask + t * F;
    std::memcpy(bits, g_t, F * sizeof(float));
    for (int64_t j = 0; j < F; ++j) bits[j] &= 0x7fffffffu;  // |g|
    uint32_t kth = 0;
    if (k < F) {
#ifdef MONE_HAVE_AVX512_PATH
      kth = kUseAvx512 ? kth_largest_bits_avx512(bits, F, k, cand)
                       : kth_largest_bits(bits, F, k, cand);
#else
      kth = kth_largest_bits(bits, F, k, cand);
#endif
    }
    int64_t kept = 0;
    for (int64_t j = 0; j < F; ++j) {
      m_t[j] = bits[j] >= kth;
      kept += bits[j] >= kth;
    }
    if (kept != k) {
      // Ties at the threshold: keep the tied scores of lowest index.
      int64_t tie_slots = k - (kept - std::count(bits, bits + F, kth));
      for (int64_t j = 0; j < F; ++j) {
        if (bits[j] == kth) {
          m_t[j] = tie_slots > 0;
          tie_slots -= tie_slots > 0;
        }
      }
    }
    for (int64_t j = 0; j < F; ++j) h_t[j] = (g_t[j] * static_cast<float>(m_t[j])) * up_t[j];
    if (a.row_scale) {
      const float p = a.row_scale[t];
      for (int64_t j = 0; j < F; ++j) h_t[j] = h_t[j] * p;
    }
    if (a.sums) {
      for (int64_t j = 0; j < F; ++j) counts[j] += static_cast<float>(m_t[j]);
      a.sums[t] = std::max(abs_sum(g_t, F), kTiny);
    }
  }
}

MONE_CLONES void shares_rows(const float* g, int64_t g_ld, int64_t F, const float* counts,
                             const float* sums, float* shares, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) shares[t] = abs_dot(g + t * g_ld, counts, F) / sums[t];
}

void check_row_scale(const std::optional<at::Tensor>& row_scale, int64_t T) {
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous() &&
                    row_scale->numel() == T, "row_scale must be a contiguous float32 [", T, "]");
  }
}

// Forward. g and up: [T, F] fp32 with unit column stride (up is usually the right half of
// fc1); row_scale: optional [T] factor of each row's h (the router probability, applied as
// megatron's experts do after the activation). Returns h [T, F], mask [T, F] bool, and when
// with_balance counts [F], sums [T], shares [T] (empty tensors otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_swiglu_fwd(
    const at::Tensor& g, const at::Tensor& up, int64_t k, bool with_balance,
    const std::optional<at::Tensor>& row_scale) {
  const int64_t T = g.size(0), F = g.size(1);
  check_rows(g, "g", T, F);
  check_rows(up, "up", T, F);
  check_row_scale(row_scale, T);
  TORCH_CHECK(1 <= k && k <= F, "k=", k, " must be in [1, ", F, "]");
  const auto f32 = g.options();
  at::Tensor h = at::empty({T, F}, f32);
  at::Tensor mask = at::empty({T, F}, f32.dtype(at::kBool));
  at::Tensor counts = at::zeros({with_balance ? F : 0}, f32);
  at::Tensor sums = at::empty({with_balance ? T : 0}, f32);
  at::Tensor shares = at::empty({with_balance ? T : 0}, f32);
  if (T == 0) return {h, mask, counts, sums, shares};

  const FwdRows rows{g.data_ptr<float>(), up.data_ptr<float>(), g.stride(0), up.stride(0), F, k,
                     h.data_ptr<float>(), reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()),
                     with_balance ? sums.data_ptr<float>() : nullptr,
                     row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr};
  const int64_t blocks = num_blocks(T);
  std::vector<float> partial_counts(with_balance ? blocks * F : 0, 0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint32_t> scratch(2 * F + 16);
    for (int64_t b = block_begin; b < block_end; ++b)
      fwd_rows(rows, T * b / blocks, T * (b + 1) / blocks,
               with_balance ? partial_counts.data() + b * F : nullptr,
               scratch.data(), scratch.data() + F);
  });
  if (!with_balance) return {h, mask, counts, sums, shares};

  float* counts_ptr = counts.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t j = 0; j < F; ++j) counts_ptr[j] += partial_counts[b * F + j];
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    shares_rows(rows.g, rows.g_ld, F, counts_ptr, rows.sums, shares.data_ptr<float>(), begin,
                end);
  });
  return {h, mask, counts, sums, shares};
}

// sigmoid(x) = 1 / (1 + exp(-x)) with a vectorisable exp (Cephes' expf: x = n ln2 + r,
// a degree-6 polynomial in r, 2^n through the exponent bits; about 1 ulp). Only gradients use
// it (the forward's SiLU is torch's, so that the selection sees the reference's scores).
inline float sigmoid(float x) {
  const float z = std::min(std::max(-x, -87.0f), 88.0f);
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  const float n = (z * 1.44269504088896341f + round) - round;
  const float r = (z - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t scale_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return 1.0f / (1.0f + e_r * scale);
}

struct BwdRows {
  const float *dh, *gate, *up;
  int64_t dh_ld, gate_ld, up_ld, F;
  const uint8_t* mask;
  const float *counts, *sums, *shares;  // null without the balance term
  float scale;
  const float* row_scale;  // null without it; else its gradient goes to drow_scale
  float* dfc1;
  float* drow_scale;
};

MONE_CLONES void bwd_rows(const BwdRows& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t F = a.F;
  for (int64_t t = begin; t < end; ++t) {
    const float *dh_t = a.dh + t * a.dh_ld, *x_t = a.gate + t * a.gate_ld;
    const float* up_t = a.up + t * a.up_ld;
    const uint8_t* m_t = a.mask + t * F;
    float* dgate_t = a.dfc1 + t * 2 * F;
    float* dup_t = dgate_t + F;
    float* s_t = scratch;  // sigmoid(gate) of this row
    for (int64_t j = 0; j < F; ++j) s_t[j] = sigmoid(x_t[j]);
    if (a.row_scale) {
      // h = (g m up) p: dp = dh . (g m up), and the rest sees dh p (in that order, as autograd
      // multiplies the incoming gradient by p before the activation's backward).
      const float p = a.row_scale[t];
      float lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= F; j += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t i = j + l;
          lanes[l] += dh_t[i] * (((x_t[i] * s_t[i]) * static_cast<float>(m_t[i])) * up_t[i]);
        }
      float dp = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) dp += lanes[l];
      for (; j < F; ++j) dp += dh_t[j] * (((x_t[j] * s_t[j]) * static_cast<float>(m_t[j])) * up_t[j]);
      a.drow_scale[t] = dp;
      for (int64_t i = 0; i < F; ++i) {
        const float dhm = (dh_t[i] * p) * static_cast<float>(m_t[i]);
        dup_t[i] = dhm * (x_t[i] * s_t[i]);
        dgate_t[i] = dhm * up_t[i];
      }
    } else {
      for (int64_t j = 0; j < F; ++j) {
        const float dhm = dh_t[j] * static_cast<float>(m_t[j]);
        dup_t[j] = dhm * (x_t[j] * s_t[j]);
        dgate_t[j] = dhm * up_t[j];
      }
    }
    if (a.counts) {
      // d balance / d g_tj = scale / s_t * (c_j - share_t) * sign(gate_tj)
      const float row_w = a.scale / a.sums[t], share = a.shares[t];
      for (int64_t j = 0; j < F; ++j) {
        const float sign = static_cast<float>((x_t[j] > 0.0f) - (x_t[j] < 0.0f));
        dgate_t[j] += ((a.counts[j] - share) * row_w) * sign;
      }
    }
    // d SiLU(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)
    for (int64_t j = 0; j < F; ++j) {
      const float x = x_t[j], s = s_t[j];
      dgate_t[j] = dgate_t[j] * s * (1.0f + x * (1.0f - s));
    }
  }
}

// Backward into a new [T, 2F] gradient of fc1 = [gate | up] (and, with row_scale, its [T]
// gradient). With the balance term (balance_scale != 0; counts/sums/shares from the forward),
// d balance / d g_tj = balance_scale / s_t * (c_j - share_t) * sign(gate_tj).
std::tuple<at::Tensor, at::Tensor> topk_swiglu_bwd(
    const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& mask,
    const at::Tensor& counts, const at::Tensor& sums, const at::Tensor& shares,
    double balance_scale, const std::optional<at::Tensor>& row_scale) {
  const int64_t T = gate.size(0), F = gate.size(1);
  check_rows(dh, "dh", T, F);
  check_rows(gate, "gate", T, F);
  check_rows(up, "up", T, F);
  check_row_scale(row_scale, T);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == T * F,
              "mask must be a contiguous [T, F] bool tensor");
  const bool with_balance = balance_scale != 0.0;
  if (with_balance) {
    TORCH_CHECK(counts.numel() == F && sums.numel() == T && shares.numel() == T &&
                    counts.is_contiguous() && sums.is_contiguous() && shares.is_contiguous(),
                "balance statistics must be counts [F], sums [T], shares [T]");
  }
  at::Tensor dfc1 = at::empty({T, 2 * F}, gate.options());
  at::Tensor drow_scale = at::empty({row_scale.has_value() ? T : 0}, gate.options());
  if (T == 0) return {dfc1, drow_scale};
  const BwdRows rows{dh.data_ptr<float>(),
                     gate.data_ptr<float>(),
                     up.data_ptr<float>(),
                     dh.stride(0),
                     gate.stride(0),
                     up.stride(0),
                     F,
                     reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
                     with_balance ? counts.data_ptr<float>() : nullptr,
                     with_balance ? sums.data_ptr<float>() : nullptr,
                     with_balance ? shares.data_ptr<float>() : nullptr,
                     static_cast<float>(balance_scale),
                     row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr,
                     dfc1.data_ptr<float>(),
                     row_scale.has_value() ? drow_scale.data_ptr<float>() : nullptr};
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(F);
    bwd_rows(rows, begin, end, scratch.data());
  });
  return {dfc1, drow_scale};
}

bool uses_avx512() { return kUseAvx512; }

}  // namespace

TORCH_LIBRARY(mone_cpu, m) {
  m.def("uses_avx512() -> bool", &uses_avx512);
  m.def("topk_swiglu_fwd(Tensor g, Tensor up, int k, bool with_balance, Tensor? row_scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk_swiglu_bwd(Tensor dh, Tensor gate, Tensor up, Tensor mask, Tensor counts, "
        "Tensor sums, Tensor shares, float balance_scale, Tensor? row_scale) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mone_cpu, CPU, m) {
  m.impl("topk_swiglu_fwd", &topk_swiglu_fwd);
  m.impl("topk_swiglu_bwd", &topk_swiglu_bwd);
}
