// numbabn's C entry points (numbabn/_kernels_cpu.py, "C entry points") as its compiled
// framework ops see them: their types, and the table of slots their addresses are handed
// over in (by numbabn/_native/__init__.py's `register`; keep the order in step with
// SLOTS there): the element-free entry points, then six per element type (float32,
// float64, float16 bits, bfloat16 bits).

#ifndef NUMBABN_ENTRY_POINTS_H_
#define NUMBABN_ENTRY_POINTS_H_

#include <atomic>
#include <cstdint>

namespace numbabn {

enum Slot { kPlan, kTrainCoeffs, kNormCoeffs, kGradCoeffs, kFirstElementSlot };
enum ElementEntry {
  kStats, kAffine, kGradSums, kGradInput, kStatsShort, kGradSumsShort, kPerElementType
};
constexpr int kElementTypes = 4;
constexpr int kSlots = kFirstElementSlot + kElementTypes * kPerElementType;

using PlanFn = void (*)(int64_t, int64_t, int64_t, int64_t*);
using StatsFn = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t, double*,
                         double*, double*);
using TrainCoeffsFn = void (*)(const double*, const double*, const double*, int64_t, int64_t,
                               const double*, double, double*, double*, double*, double*);
using NormCoeffsFn = void (*)(const double*, int64_t, double, const double*, double*,
                              double*);
using AffineFn = void (*)(const void*, void*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          const double*, const double*, const double*);
using GradSumsFn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, int64_t,
                            int64_t, const double*, double*, double*);
using GradCoeffsFn = void (*)(const double*, const double*, int64_t, int64_t, int64_t,
                              const double*, const double*, double*, double*, double*,
                              double*, double*);
using GradInputFn = void (*)(const void*, const void*, void*, int64_t, int64_t, int64_t,
                             int64_t, int64_t, const double*, const double*, const double*,
                             const double*);
using StatsShortFn = void (*)(const void*, int64_t, int64_t, int64_t, double*, double*);
using GradSumsShortFn = void (*)(const void*, const void*, int64_t, int64_t, int64_t,
                                 const double*, double*, double*);

// The entry points an op of one element type calls (null: not handed over).
struct Entries {
  PlanFn plan;
  TrainCoeffsFn train_coeffs;
  NormCoeffsFn norm_coeffs;
  GradCoeffsFn grad_coeffs;
  StatsFn stats;
  AffineFn affine;
  GradSumsFn grad_sums;
  GradInputFn grad_input;
  StatsShortFn stats_short;
  GradSumsShortFn grad_sums_short;

  // Whether every entry point is there.
  bool Complete() const {
    return plan && train_coeffs && norm_coeffs && grad_coeffs && stats && affine &&
           grad_sums && grad_input && stats_short && grad_sums_short;
  }
};

// Whether a dense (outer, C, inner) block takes the short-run reductions (stats_short,
// grad_sums_short), as the NumPy API's train_short / backward_short do: channels-first
// runs shorter than `lanes` (numbabn.config.LANES).
inline bool ShortRuns(int64_t inner, int64_t lanes) { return inner > 1 && inner < lanes; }

// The entry points of element type `index` (0 float32, 1 float64, 2 float16 bits,
// 3 bfloat16 bits) in `table` (kSlots addresses).
inline Entries EntriesAt(const std::atomic<void*>* table, int index) {
  const int first = kFirstElementSlot + index * kPerElementType;
  auto at = [table](int slot) { return table[slot].load(); };
  return Entries{reinterpret_cast<PlanFn>(at(kPlan)),
                 reinterpret_cast<TrainCoeffsFn>(at(kTrainCoeffs)),
                 reinterpret_cast<NormCoeffsFn>(at(kNormCoeffs)),
                 reinterpret_cast<GradCoeffsFn>(at(kGradCoeffs)),
                 reinterpret_cast<StatsFn>(at(first + kStats)),
                 reinterpret_cast<AffineFn>(at(first + kAffine)),
                 reinterpret_cast<GradSumsFn>(at(first + kGradSums)),
                 reinterpret_cast<GradInputFn>(at(first + kGradInput)),
                 reinterpret_cast<StatsShortFn>(at(first + kStatsShort)),
                 reinterpret_cast<GradSumsShortFn>(at(first + kGradSumsShort))};
}

}  // namespace numbabn

#endif  // NUMBABN_ENTRY_POINTS_H_
