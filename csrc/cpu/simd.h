#pragma once
// Portable short vectors for the CPU engine: GCC/Clang vector extensions of 32 bytes (8 floats,
// 4 doubles; 64 in the AVX-512 copies of the kernels compiled per instruction set, isa_vec.h).
// Every target_clones copy of a task function compiles them for its own instruction set (ymm
// registers under AVX2 and AVX-512; pairs of xmm on the baseline), which the auto-vectoriser
// does not do reliably for these loops (reductions, selects, accumulators held in registers
// across an inner loop).

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bilateral_ops/grid_coords.h"

// Helpers passing vectors by value must be inlined into each target_clones copy: an out-of-line
// copy is compiled for the baseline ABI, which passes 32-byte vectors differently from the AVX
// clones that call it (silently wrong values).
#if defined(__GNUC__)
#define BO_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define BO_ALWAYS_INLINE inline
#endif

// The same for a lambda, written after its parameter list: `[&](int x) BO_LAMBDA_INLINE { ... }`.
#if defined(__GNUC__)
#define BO_LAMBDA_INLINE __attribute__((always_inline))
#else
#define BO_LAMBDA_INLINE
#endif

// One build runs fast on any x86-64: GCC emits an AVX-512, an AVX2+FMA and a baseline copy of each
// task function and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BO_NO_TARGET_CLONES)
#define BO_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BO_TARGET_CLONES
#endif

// Kernels whose vector comparisons feed selects or masked sums are compiled once per instruction
// set instead: their file includes a kernel header three times through isa_copies.h, each under
// a `#pragma GCC target` and in a namespace of its own, and BO_ISA_CALL picks one at run time.
// GCC gives a vector comparison its type (a vector of integers, or an AVX-512 mask) when it
// parses the template, with the options in force there, so every target_clones copy, the
// AVX-512 one included, compiles `m ? a + b : a` to a compare into a vector and a blend; parsed
// under the AVX-512 pragma it is a compare into a mask register and one masked add. The same
// holds for any template a copy calls with its vectors: one that compares them must be parsed
// inside the copy too (curve_pointwise.h is included again in each), or the AVX-512 copy's
// 64-byte selects compile lane by lane.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BO_NO_TARGET_CLONES)
#define BO_ISA_COPIES 1
#else
#define BO_ISA_COPIES 0
#endif

namespace bilateral_ops {
namespace cpu {

// The instruction set of the kernel copies to run (BO_ISA_COPIES): x86-64-v4 (AVX-512), v3
// (AVX2 and FMA) or the baseline, the levels target_clones chooses between. The environment
// variable BILATERAL_OPS_CPU_ISA=x86-64-v3 or x86-64 caps it (read once), so that the tests can
// run every copy on one machine; a level the CPU lacks is never chosen.
enum class Isa { kDefault, kV3, kV4 };

inline Isa cpu_isa() {
#if BO_ISA_COPIES
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kDefault;
    if (__builtin_cpu_supports("x86-64-v4")) {
      best = Isa::kV4;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      best = Isa::kV3;
    }
    const char* cap = std::getenv("BILATERAL_OPS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "x86-64") == 0) return Isa::kDefault;
    if (cap != nullptr && std::strcmp(cap, "x86-64-v3") == 0 && best == Isa::kV4) return Isa::kV3;
    return best;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

// Calls FN (a name in each copy's namespace, isa_v4, isa_v3 or isa_default: isa_copies.h) of
// this CPU's copy.
#if BO_ISA_COPIES
#define BO_ISA_CALL(FN, ...)                                               \
  do {                                                                     \
    switch (::bilateral_ops::cpu::cpu_isa()) {                             \
      case ::bilateral_ops::cpu::Isa::kV4:                                 \
        return isa_v4::FN(__VA_ARGS__);                                    \
      case ::bilateral_ops::cpu::Isa::kV3:                                 \
        return isa_v3::FN(__VA_ARGS__);                                    \
      default:                                                             \
        return isa_default::FN(__VA_ARGS__);                               \
    }                                                                      \
  } while (0)
#else
#define BO_ISA_CALL(FN, ...) return isa_default::FN(__VA_ARGS__)
#endif

// The engine's vectors: 32 bytes (8 floats, 4 doubles). The kernels compiled once per
// instruction set (isa_copies.h) may take wider ones in their AVX-512 copy, through isa_vec.h: the
// types and helpers below take the width in bytes, B, as a template argument, 32 by default.
constexpr int kVecBytes = 32;

// The widest vectors of any copy (AVX-512's 64 bytes): the alignment of scratch shared by the
// copies, and the lanes every row margin must leave room for.
constexpr int kVecBytesMax = 64;

template <typename T, int B>
struct VecN;
template <int B>
struct VecN<float, B> {
  typedef float type __attribute__((vector_size(B)));
  typedef int32_t mask __attribute__((vector_size(B)));
};
template <int B>
struct VecN<double, B> {
  typedef double type __attribute__((vector_size(B)));
  typedef int64_t mask __attribute__((vector_size(B)));
};

template <typename T>
struct VecOf : VecN<T, kVecBytes> {};

template <typename T, int B = kVecBytes>
using vec_t = typename VecN<T, B>::type;

// int32 lanes, as many as vec_t<T> has: cell indices.
template <typename T>
struct IndexVecOf;
template <>
struct IndexVecOf<float> {
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct IndexVecOf<double> {
  typedef int32_t type __attribute__((vector_size(16)));
};

template <typename T>
using ivec_t = typename IndexVecOf<T>::type;

template <typename T, int B = kVecBytes>
constexpr int64_t vec_width() {
  return B / static_cast<int64_t>(sizeof(T));
}

// Unaligned load and store (memcpy compiles to one vector move).
template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE vec_t<T, B> vload(const T* p) {
  vec_t<T, B> v;
  __builtin_memcpy(&v, p, B);
  return v;
}

template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE void vstore(T* p, vec_t<T, B> v) {
  __builtin_memcpy(p, &v, B);
}

template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE vec_t<T, B> vsplat(T x) {
  return vec_t<T, B>{} + x;
}

// vsplat of a value loaded from memory in an inner loop, as the integer of the same bits: GCC
// cannot fold vsplat's add of zero (-0 + 0 is +0) and emits a scalar add before the broadcast,
// and lane-by-lane initialisers compile to chains of inserts under target_clones; an integer
// splat of a loaded value is one broadcast from memory (a load, no arithmetic). Bit-exact, -0
// included. (Not a general replacement: for constants and computed values vsplat compiles
// better, e.g. as operands of min/max patterns.)
template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE vec_t<T, B> vbroadcast(const T& x) {
  using M = typename VecN<T, B>::mask;
  using I = typename std::remove_reference<decltype(M{}[0])>::type;
  I bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  const M m = M{} + bits;
  vec_t<T, B> v;
  __builtin_memcpy(&v, &m, sizeof(v));
  return v;
}

// x in every lane, as a vector the compiler cannot see as a constant (x is read back through a
// volatile). A select against it, `b > a ? b : a`, compiles to one max, which is exactly that
// select (x86's max returns a when a is NaN, and a -0 passes as a); against a literal, GCC
// emits a compare and a blend (an and-not for zero). Made outside the inner loops (a store and a
// load each time).
template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE vec_t<T, B> vopaque(T x) {
  volatile T v = x;
  return vsplat<T, B>(v);
}

// Sum of the lanes, as a tree of half-swaps (a 64-byte vector: its halves added first).
template <typename T, int B = kVecBytes>
BO_ALWAYS_INLINE T vsum(vec_t<T, B> v) {
  if constexpr (B == 64) {
    // The halves by shuffles (register extracts); copies through memory would store the vector
    // and reload its halves, which the store cannot forward.
    if constexpr (vec_width<T, B>() == 16) {
      return vsum<T, 32>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    } else {
      return vsum<T, 32>(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
    }
  } else {
    static_assert(B == 32, "32- or 64-byte vectors");
    using M = typename VecN<T, B>::mask;
    if constexpr (vec_width<T, B>() == 8) {
      v += __builtin_shuffle(v, M{4, 5, 6, 7, 0, 1, 2, 3});
      v += __builtin_shuffle(v, M{2, 3, 0, 1, 6, 7, 4, 5});
      v += __builtin_shuffle(v, M{1, 0, 3, 2, 5, 4, 7, 6});
    } else {
      v += __builtin_shuffle(v, M{2, 3, 0, 1});
      v += __builtin_shuffle(v, M{1, 0, 3, 2});
    }
    return v[0];
  }
}

// Lane sums of W vectors at once (W = vec_width): out[i] = vsum(v[i]). A transposing tree of
// shuffles, three adds per pair of inputs, instead of a reduction tree per vector. The inputs are
// taken in the order that makes the tree's output order the natural one.
template <typename T>
BO_ALWAYS_INLINE vec_t<T> vsum_many(const vec_t<T>* v) {
  using V = vec_t<T>;
  using M = typename VecOf<T>::mask;
  if constexpr (vec_width<T>() == 8) {
    const V* p[8] = {v + 0, v + 4, v + 2, v + 6, v + 1, v + 5, v + 3, v + 7};
    V t[4], u[2];
    for (int i = 0; i < 4; ++i) {
      const V a = *p[2 * i], b = *p[2 * i + 1];
      t[i] = __builtin_shuffle(a, b, M{0, 1, 2, 3, 8, 9, 10, 11}) +
             __builtin_shuffle(a, b, M{4, 5, 6, 7, 12, 13, 14, 15});
    }
    for (int i = 0; i < 2; ++i) {
      u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], M{0, 1, 8, 9, 4, 5, 12, 13}) +
             __builtin_shuffle(t[2 * i], t[2 * i + 1], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
    return __builtin_shuffle(u[0], u[1], M{0, 8, 2, 10, 4, 12, 6, 14}) +
           __builtin_shuffle(u[0], u[1], M{1, 9, 3, 11, 5, 13, 7, 15});
  } else {
    const V t0 = __builtin_shuffle(v[0], v[2], M{0, 1, 4, 5}) + __builtin_shuffle(v[0], v[2], M{2, 3, 6, 7});
    const V t1 = __builtin_shuffle(v[1], v[3], M{0, 1, 4, 5}) + __builtin_shuffle(v[1], v[3], M{2, 3, 6, 7});
    return __builtin_shuffle(t0, t1, M{0, 4, 2, 6}) + __builtin_shuffle(t0, t1, M{1, 5, 3, 7});
  }
}

// The vector form of axis_taps (grid_coords.h) at grid positions g: the same operations in the
// same order, so the same bits. The clamp's comparisons map NaN to the lower edge; s >= 0, so the
// truncating conversion is the floor.
template <typename T>
struct VecTaps {
  ivec_t<T> i0, i1;
  vec_t<T> gc, w0, w1, slope;
};

template <typename T>
BO_ALWAYS_INLINE VecTaps<T> vaxis_taps(vec_t<T> g, int64_t G) {
  using V = vec_t<T>;
  using I = ivec_t<T>;
  const T hi = static_cast<T>(G) - T(0.5);
  V gc = g > T(0.5) ? g : vsplat<T>(T(0.5));
  gc = gc < hi ? gc : vsplat<T>(hi);
  VecTaps<T> t;
  t.gc = gc;
  const V s = gc - T(0.5);
  t.i0 = __builtin_convertvector(s, I);
  t.w1 = s - __builtin_convertvector(t.i0, V);
  t.w0 = T(1) - t.w1;
  const I next = t.i0 + 1;
  t.i1 = next < static_cast<int32_t>(G) ? next : I{} + static_cast<int32_t>(G - 1);
  const V one = vsplat<T>(T(1));
  t.slope = ((g > T(0.5)) & (g < hi)) ? one : V{};
  return t;
}

// The vector form of guide_taps without dguide.
template <typename T>
BO_ALWAYS_INLINE VecTaps<T> vguide_taps(vec_t<T> v, int64_t D, bool align_corners) {
  return vaxis_taps<T>(v * guide_scale<T>(D, align_corners) + guide_offset<T>(align_corners), D);
}

// Transposes W vectors of W lanes in place: r[i][j] becomes r[j][i].
template <typename T>
BO_ALWAYS_INLINE void vtranspose(vec_t<T>* r) {
  using V = vec_t<T>;
  using M = typename VecOf<T>::mask;
  if constexpr (vec_width<T>() == 8) {
    V t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
      t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
    }
    // u[4 h + c]: lanes 0-3 column c (rows 4 h .. 4 h + 3), lanes 4-7 column c + 4.
    for (int h = 0; h < 2; ++h) {
      const V* a = t + 4 * h;
      u[4 * h + 0] = __builtin_shuffle(a[0], a[2], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[4 * h + 1] = __builtin_shuffle(a[0], a[2], M{2, 3, 10, 11, 6, 7, 14, 15});
      u[4 * h + 2] = __builtin_shuffle(a[1], a[3], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[4 * h + 3] = __builtin_shuffle(a[1], a[3], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = __builtin_shuffle(u[c], u[4 + c], M{0, 1, 2, 3, 8, 9, 10, 11});
      r[c + 4] = __builtin_shuffle(u[c], u[4 + c], M{4, 5, 6, 7, 12, 13, 14, 15});
    }
  } else {
    const V t0 = __builtin_shuffle(r[0], r[1], M{0, 4, 2, 6});
    const V t1 = __builtin_shuffle(r[0], r[1], M{1, 5, 3, 7});
    const V t2 = __builtin_shuffle(r[2], r[3], M{0, 4, 2, 6});
    const V t3 = __builtin_shuffle(r[2], r[3], M{1, 5, 3, 7});
    r[0] = __builtin_shuffle(t0, t2, M{0, 1, 4, 5});
    r[1] = __builtin_shuffle(t1, t3, M{0, 1, 4, 5});
    r[2] = __builtin_shuffle(t0, t2, M{2, 3, 6, 7});
    r[3] = __builtin_shuffle(t1, t3, M{2, 3, 6, 7});
  }
}

// Tent weight of cell k (centre kc = k + 0.5) at clamped positions gc, and its slope with the
// one-sided convention of grid_coords.h: the vector forms of tent_weight / tent_weight_slope.
template <typename T>
BO_ALWAYS_INLINE vec_t<T> vtent(vec_t<T> gc, T kc) {
  const vec_t<T> t = gc - kc;
  const vec_t<T> a = t < T(0) ? -t : t;
  const vec_t<T> w = T(1) - a;
  return w > T(0) ? w : vec_t<T>{};
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vtent_slope(vec_t<T> gc, T kc) {
  const vec_t<T> d = gc - kc;
  const vec_t<T> one = vsplat<T>(T(1));
  const vec_t<T> up = ((d >= T(-1)) & (d < T(0))) ? one : vec_t<T>{};
  return ((d >= T(0)) & (d < T(1))) ? -one : up;
}

}  // namespace cpu
}  // namespace bilateral_ops
