// Which vector instruction set the CPU operators' row loops use, chosen at run time.
//
// Every row loop is compiled three times from one body: for AVX-512, for AVX2 and for the
// x86-64 baseline (SSE2). The loops are written so that the three give the same bits (sums go
// through a fixed number of explicit lanes, products and sums are rounded separately:
// -ffp-contract=off), so the choice changes speed only. The tests check that.
//
// The set used is the best the CPU has, capped by (first that is set)
//     MONE_CPU_ISA          avx512 | avx2 | baseline
//     ATEN_CPU_CAPABILITY   torch's own switch (avx512 | avx2 | default)
// so that `ATEN_CPU_CAPABILITY=avx2` makes torch and these operators behave as on a CPU
// without AVX-512, and one machine can run and measure every path. `mone_cpu::set_isa`
// changes it inside a running process (tests and benchmarks).

#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mone_isa {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MONE_X86_VARIANTS 1
#define MONE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,popcnt")))
#define MONE_TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#endif
#define MONE_ALWAYS_INLINE __attribute__((always_inline)) inline

inline Isa best_supported() {
#ifdef MONE_X86_VARIANTS
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// -1 for a name that is none of the sets (the Python side turns that into one error line).
inline int parse_isa(const char* name) {
  if (std::strcmp(name, "avx512") == 0) return static_cast<int>(Isa::kAvx512);
  if (std::strcmp(name, "avx2") == 0) return static_cast<int>(Isa::kAvx2);
  if (std::strcmp(name, "baseline") == 0 || std::strcmp(name, "default") == 0)
    return static_cast<int>(Isa::kBaseline);
  return -1;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

inline Isa capped(int cap) {
  const Isa best = best_supported();
  return cap >= 0 && cap < static_cast<int>(best) ? static_cast<Isa>(cap) : best;
}

inline Isa from_environment() {
  for (const char* variable : {"MONE_CPU_ISA", "ATEN_CPU_CAPABILITY"}) {
    const char* value = std::getenv(variable);
    if (value != nullptr && *value != '\0') return capped(parse_isa(value));
  }
  return best_supported();
}

// One value for the whole library (all translation units see the same variable).
inline std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(from_environment())};
  return slot;
}

inline Isa active() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

}  // namespace mone_isa

// Defines `name(args...)`, which runs `body<Isa>(args...)` compiled for the active set. The
// body must be a MONE_ALWAYS_INLINE function template over mone_isa::Isa, so that each
// wrapper's copy is compiled with the wrapper's target.
#ifdef MONE_X86_VARIANTS
#define MONE_ISA_VARIANTS(name, body)                                                       \
  template <typename... Args>                                                               \
  MONE_TARGET_AVX512 void name##_avx512(Args... args) {                                     \
    body<mone_isa::Isa::kAvx512>(args...);                                                  \
  }                                                                                         \
  template <typename... Args>                                                               \
  MONE_TARGET_AVX2 void name##_avx2(Args... args) {                                         \
    body<mone_isa::Isa::kAvx2>(args...);                                                    \
  }                                                                                         \
  template <typename... Args>                                                               \
  void name##_baseline(Args... args) {                                                      \
    body<mone_isa::Isa::kBaseline>(args...);                                                \
  }                                                                                         \
  template <typename... Args>                                                               \
  void name(Args... args) {                                                                 \
    switch (mone_isa::active()) {                                                           \
      case mone_isa::Isa::kAvx512: return name##_avx512(args...);                           \
      case mone_isa::Isa::kAvx2: return name##_avx2(args...);                               \
      default: return name##_baseline(args...);                                             \
    }                                                                                       \
  }
#else
#define MONE_ISA_VARIANTS(name, body)                                                       \
  template <typename... Args>                                                               \
  void name(Args... args) {                                                                 \
    body<mone_isa::Isa::kBaseline>(args...);                                                \
  }
#endif
