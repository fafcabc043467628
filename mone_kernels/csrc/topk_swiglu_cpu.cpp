// The MoNE activation on CPU: one fused pass per direction over each row of [T, F].
//
// Same definition as mone_kernels/reference.py (which this is tested against):
//
//     g_TF    = SiLU(gate_TF)                 (computed by torch before the call: same bits)
//     mask_TF = top-K of |g_TF| per row, ties to the lower neuron index (exactly K per row)
//               (of |g_TF| * w_F with selection weights w: the neuron-level balance bias)
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
// The search has a portable version and hand-written AVX2 and AVX-512 ones; which one runs is
// chosen at run time (cpu_isa.h: the best the CPU has, capped by MONE_CPU_ISA or
// ATEN_CPU_CAPABILITY). All of them find the same threshold, so the results do not depend on it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu_isa.h"

#ifdef MONE_X86_VARIANTS
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using mone_isa::Isa;

constexpr float kTiny = 1.17549435e-38f;  // torch.finfo(torch.float32).tiny, as the reference
constexpr int64_t kLanes = 16;            // independent partial sums: vectorisable reductions
constexpr int64_t kPad = 16;              // scratch past a row: whole vectors of the widest set

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
  // An empty tensor may carry any strides (numpy's zero-size arrays have 0): nothing is read.
  TORCH_CHECK(t.stride(1) == 1 || cols <= 1 || rows == 0, name, " rows must be contiguous");
}

// ---- The K-th largest of n non-negative floats, exactly -----------------------------------
// Given as bit patterns (non-negative floats order like their bits), it is the largest x with
// #(v >= x) >= k, found bit by bit. The 8 exponent bits are searched over the whole row, the
// 23 mantissa bits over the row's values with that exponent only (gathered into cand: n + kPad
// entries of scratch, zero-padded to a multiple of kPad; zeros are below every x searched).

MONE_ALWAYS_INLINE int64_t count_at_least(const uint32_t* v, int64_t n, uint32_t x) {
  uint32_t count = 0;  // 32-bit lanes: the compare and the sum vectorise at full width
  for (int64_t j = 0; j < n; ++j) count += v[j] >= x;
  return count;
}

MONE_ALWAYS_INLINE int64_t gather_bucket(const uint32_t* v, int64_t n, uint32_t exponent,
                                         uint32_t* cand) {
  int64_t num_cand = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand[num_cand] = v[j];
    num_cand += (v[j] >> 23) == exponent;
  }
  return num_cand;
}

#ifdef MONE_X86_VARIANTS
// AVX2 has no unsigned compare, no compare-into-mask and no compress. But the values are |g|
// (sign bit clear: below 2^31) and every x searched is >= 1, so v >= x is the signed v > x - 1;
// a pass's count accumulates the compares (-1 each) in vector lanes; the bucket's values are
// gathered 8 at a time by a permutation looked up from the compare's 8-bit movemask.

struct CompressTable {
  std::array<std::array<uint8_t, 8>, 256> lanes{};  // for each 8-bit mask: its set lanes first
  constexpr CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask & (1 << lane)) lanes[mask][next++] = static_cast<uint8_t>(lane);
    }
  }
};
constexpr CompressTable kCompress{};

MONE_TARGET_AVX2 inline int64_t count_at_least_avx2(const uint32_t* v, int64_t n,
                                                                uint32_t x) {
  const __m256i below = _mm256_set1_epi32(static_cast<int>(x - 1));
  __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i* p = reinterpret_cast<const __m256i*>(v + j);
    even = _mm256_sub_epi32(even, _mm256_cmpgt_epi32(_mm256_loadu_si256(p), below));
    odd = _mm256_sub_epi32(odd, _mm256_cmpgt_epi32(_mm256_loadu_si256(p + 1), below));
  }
  const __m256i both = _mm256_add_epi32(even, odd);
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(both), _mm256_extracti128_si256(both, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4e));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xb1));
  int64_t count = _mm_cvtsi128_si32(sum);
  for (; j < n; ++j) count += v[j] >= x;
  return count;
}

MONE_TARGET_AVX2 inline int64_t gather_bucket_avx2(const uint32_t* v, int64_t n,
                                                               uint32_t exponent,
                                                               uint32_t* cand) {
  const __m256i bucket = _mm256_set1_epi32(static_cast<int>(exponent));
  int64_t num_cand = 0, j = 0;
  for (; j + 8 <= n; j += 8) {  // stores 8 lanes at cand + num_cand <= cand + j: in bounds
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j));
    const int in = _mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(x, 23), bucket)));
    const __m256i order = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.lanes[in].data())));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + num_cand),
                        _mm256_permutevar8x32_epi32(x, order));
    num_cand += _mm_popcnt_u32(static_cast<unsigned>(in));
  }
  for (; j < n; ++j) {
    cand[num_cand] = v[j];
    num_cand += (v[j] >> 23) == exponent;
  }
  return num_cand;
}

// (These are called, not inlined, from the per-set copies of the search: GCC does not inline a
// function for a wider target into the generic template before it is itself inlined.)

// AVX-512: a pass's count is the popcount of compare masks, the bucket gathered by compress.
// Lanes past n are masked off (they read as 0, below any x searched).
MONE_TARGET_AVX512 inline __mmask16 lanes_from(int64_t j, int64_t n) {
  return j + 16 <= n ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

MONE_TARGET_AVX512 inline int64_t count_at_least_avx512(const uint32_t* v,
                                                                    int64_t n, uint32_t x) {
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

MONE_TARGET_AVX512 inline int64_t gather_bucket_avx512(const uint32_t* v,
                                                                   int64_t n,
                                                                   uint32_t exponent,
                                                                   uint32_t* cand) {
  const __m512i bucket = _mm512_set1_epi32(static_cast<int>(exponent));
  int64_t num_cand = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_from(j, n);
    const __m512i x = _mm512_maskz_loadu_epi32(lanes, v + j);
    const __mmask16 in = _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_srli_epi32(x, 23), bucket);
    _mm512_storeu_si512(cand + num_cand, _mm512_maskz_compress_epi32(in, x));
    num_cand += _mm_popcnt_u32(in);
  }
  return num_cand;
}
#endif

template <Isa I>
MONE_ALWAYS_INLINE int64_t count_at_least_isa(const uint32_t* v, int64_t n, uint32_t x) {
#ifdef MONE_X86_VARIANTS
  if constexpr (I == Isa::kAvx512) return count_at_least_avx512(v, n, x);
  if constexpr (I == Isa::kAvx2) return count_at_least_avx2(v, n, x);
#endif
  return count_at_least(v, n, x);
}

template <Isa I>
MONE_ALWAYS_INLINE int64_t gather_bucket_isa(const uint32_t* v, int64_t n, uint32_t exponent,
                                             uint32_t* cand) {
#ifdef MONE_X86_VARIANTS
  if constexpr (I == Isa::kAvx512) return gather_bucket_avx512(v, n, exponent, cand);
  if constexpr (I == Isa::kAvx2) return gather_bucket_avx2(v, n, exponent, cand);
#endif
  return gather_bucket(v, n, exponent, cand);
}

template <Isa I>
MONE_ALWAYS_INLINE uint32_t kth_largest_bits(const uint32_t* v, int64_t n, int64_t k,
                                             uint32_t* cand) {
  uint32_t kth = 0;
  for (int bit = 30; bit >= 23; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least_isa<I>(v, n, x) >= k) kth = x;
  }
  const uint32_t exponent = kth >> 23;
  const int64_t k_in_bucket = k - count_at_least_isa<I>(v, n, (exponent + 1) << 23);
  int64_t num_cand = gather_bucket_isa<I>(v, n, exponent, cand);
  while (num_cand % kPad) cand[num_cand++] = 0;
  for (int bit = 22; bit >= 0; --bit) {
    const uint32_t x = kth | (1u << bit);
    if (count_at_least_isa<I>(cand, num_cand, x) >= k_in_bucket) kth = x;
  }
  return kth;
}

// ---- Row loops -------------------------------------------------------------------------------

MONE_ALWAYS_INLINE float abs_sum(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += std::fabs(x[j + l]);
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += std::fabs(x[j]);
  return total;
}

MONE_ALWAYS_INLINE float abs_dot(const float* x, const float* w, int64_t n) {
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
  const float* weight;     // null: select by |g|; else by |g| * weight[j] (> 0)
};

// The selection scores' bit patterns: |g|, or |g| * w (positive w keeps them non-negative).
MONE_ALWAYS_INLINE void score_bits(const float* __restrict g, const float* __restrict w,
                                   uint32_t* __restrict bits, int64_t F) {
  if (w == nullptr) {
    std::memcpy(bits, g, F * sizeof(float));
    for (int64_t j = 0; j < F; ++j) bits[j] &= 0x7fffffffu;
  } else {
    float* scores = reinterpret_cast<float*>(bits);
    for (int64_t j = 0; j < F; ++j) scores[j] = std::fabs(g[j]) * w[j];
  }
}

// Rows [begin, end): selection, mask, h, and (with sums) row sums and neuron counts.
template <Isa I>
MONE_ALWAYS_INLINE void fwd_rows_body(const FwdRows& a, int64_t begin, int64_t end,
                                      float* counts, uint32_t* bits, uint32_t* cand) {
  const int64_t F = a.F, k = a.k;
  for (int64_t t = begin; t < end; ++t) {
    const float* g_t = a.g + t * a.g_ld;
    const float* up_t = a.up + t * a.up_ld;
    float* h_t = a.h + t * F;
    uint8_t* m_t = a.mask + t * F;
    score_bits(g_t, a.weight, bits, F);
    const uint32_t kth = k < F ? kth_largest_bits<I>(bits, F, k, cand) : 0;
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

MONE_ISA_VARIANTS(fwd_rows, fwd_rows_body)

template <Isa I>
MONE_ALWAYS_INLINE void shares_rows_body(const float* g, int64_t g_ld, int64_t F,
                                         const float* counts, const float* sums, float* shares,
                                         int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) shares[t] = abs_dot(g + t * g_ld, counts, F) / sums[t];
}
MONE_ISA_VARIANTS(shares_rows, shares_rows_body)

void check_row_scale(const std::optional<at::Tensor>& row_scale, int64_t T) {
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous() &&
                    row_scale->numel() == T, "row_scale must be a contiguous float32 [", T, "]");
  }
}

// Forward. g and up: [T, F] fp32 with unit column stride (up is usually the right half of
// fc1); row_scale: optional [T] factor of each row's h (the router probability, applied as
// megatron's experts do after the activation); weight: optional [F] positive selection weights.
// Returns h [T, F], mask [T, F] bool, and when
// with_balance counts [F], sums [T], shares [T] (empty tensors otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_swiglu_fwd(
    const at::Tensor& g, const at::Tensor& up, int64_t k, bool with_balance,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& weight) {
  const int64_t T = g.size(0), F = g.size(1);
  check_rows(g, "g", T, F);
  check_rows(up, "up", T, F);
  check_row_scale(row_scale, T);
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                    weight->numel() == F, "weight must be a contiguous float32 [", F, "]");
  }
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
                     row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr,
                     weight.has_value() ? weight->data_ptr<float>() : nullptr};
  const int64_t blocks = num_blocks(T);
  std::vector<float> partial_counts(with_balance ? blocks * F : 0, 0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint32_t> scratch(2 * F + kPad);
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
MONE_ALWAYS_INLINE float sigmoid(float x) {
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

// The backward's loops, each over one row, with every pointer declared unaliased: the mask is
// bytes, and a byte pointer may alias anything, which otherwise stops GCC from vectorising
// any loop that reads it (it did, for AVX2 and the baseline).

// dp = dh . (g m up) with g = x s (the gradient of the row's router probability).
MONE_ALWAYS_INLINE float row_scale_grad(const float* __restrict dh, const float* __restrict x,
                                        const float* __restrict s, const uint8_t* __restrict m,
                                        const float* __restrict up, int64_t F) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= F; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = j + l;
      lanes[l] += dh[i] * (((x[i] * s[i]) * static_cast<float>(m[i])) * up[i]);
    }
  float dp = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) dp += lanes[l];
  for (; j < F; ++j) dp += dh[j] * (((x[j] * s[j]) * static_cast<float>(m[j])) * up[j]);
  return dp;
}

// d up = (dh [p]) m g and d g = (dh [p]) m up (d g becomes d gate below).
template <bool kScaled>
MONE_ALWAYS_INLINE void masked_grads(const float* __restrict dh, float p,
                                     const float* __restrict x, const float* __restrict s,
                                     const uint8_t* __restrict m, const float* __restrict up,
                                     float* __restrict dgate, float* __restrict dup, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float dhm = (kScaled ? dh[j] * p : dh[j]) * static_cast<float>(m[j]);
    dup[j] = dhm * (x[j] * s[j]);
    dgate[j] = dhm * up[j];
  }
}

template <Isa I>
MONE_ALWAYS_INLINE void bwd_rows_body(const BwdRows& a, int64_t begin, int64_t end,
                                      float* scratch) {
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
      a.drow_scale[t] = row_scale_grad(dh_t, x_t, s_t, m_t, up_t, F);
      masked_grads<true>(dh_t, a.row_scale[t], x_t, s_t, m_t, up_t, dgate_t, dup_t, F);
    } else {
      masked_grads<false>(dh_t, 1.0f, x_t, s_t, m_t, up_t, dgate_t, dup_t, F);
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

MONE_ISA_VARIANTS(bwd_rows, bwd_rows_body)

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

// The instruction set the row loops use now, and setting it (capped by the CPU; returns the
// one in use afterwards). An unknown name is an error.
std::string isa() { return mone_isa::isa_name(mone_isa::active()); }

std::string set_isa(const std::string& name) {
  const int wanted = mone_isa::parse_isa(name.c_str());
  TORCH_CHECK(wanted >= 0, "unknown instruction set '", name, "': avx512, avx2 or baseline");
  mone_isa::active_slot().store(static_cast<int>(mone_isa::capped(wanted)));
  return isa();
}

}  // namespace

TORCH_LIBRARY(mone_cpu, m) {
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("topk_swiglu_fwd(Tensor g, Tensor up, int k, bool with_balance, Tensor? row_scale, "
        "Tensor? weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk_swiglu_bwd(Tensor dh, Tensor gate, Tensor up, Tensor mask, Tensor counts, "
        "Tensor sums, Tensor shares, float balance_scale, Tensor? row_scale) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mone_cpu, CPU, m) {
  m.impl("topk_swiglu_fwd", &topk_swiglu_fwd);
  m.impl("topk_swiglu_bwd", &topk_swiglu_bwd);
}
