// The vector type and helpers of one kernel copy (isa_copies.h) at its own width, kIsaVecBytes:
// included inside the copy's namespace (BO_ISA_NS), these shadow simd.h's 32-byte vec_t, VecOf,
// vec_width, vload, vstore, vsplat, vbroadcast, vopaque and vsum for the kernel code that
// follows, which is written once for any width. Why 64 bytes in the AVX-512 copy of a kernel
// whose loops are long chains of arithmetic: a core that runs a 64-byte operation as two 32-byte
// halves (as AMD's Zen 4 does) still issues half as many instructions, and the loops were bound
// by issuing them (the exact filter: 1.3x faster on one core). No include guard: one include per
// copy.

// 64 bytes (16 floats) in the AVX-512 copy, 32 in the AVX2 and baseline ones.
constexpr int kIsaVecBytes = BO_ISA_LEVEL >= 4 ? 64 : 32;

template <typename T>
using vec_t = ::bilateral_ops::cpu::vec_t<T, kIsaVecBytes>;

template <typename T>
struct VecOf : ::bilateral_ops::cpu::VecN<T, kIsaVecBytes> {};

template <typename T>
constexpr int64_t vec_width() {
  return ::bilateral_ops::cpu::vec_width<T, kIsaVecBytes>();
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vload(const T* p) {
  return ::bilateral_ops::cpu::vload<T, kIsaVecBytes>(p);
}

template <typename T>
BO_ALWAYS_INLINE void vstore(T* p, vec_t<T> v) {
  ::bilateral_ops::cpu::vstore<T, kIsaVecBytes>(p, v);
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vsplat(T x) {
  return ::bilateral_ops::cpu::vsplat<T, kIsaVecBytes>(x);
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vbroadcast(const T& x) {
  return ::bilateral_ops::cpu::vbroadcast<T, kIsaVecBytes>(x);
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vopaque(T x) {
  return ::bilateral_ops::cpu::vopaque<T, kIsaVecBytes>(x);
}

template <typename T>
BO_ALWAYS_INLINE T vsum(vec_t<T> v) {
  return ::bilateral_ops::cpu::vsum<T, kIsaVecBytes>(v);
}
