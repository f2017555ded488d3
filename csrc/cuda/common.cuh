#pragma once
// Device helpers shared by the CUDA kernels of every op: loads through the read-only cache
// converted to the accumulation type, warp reductions, and the warp-aggregated ("peer") atomic
// scatter of the slice backward and grid_splat.

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "bilateral_ops CUDA kernels need sm_70 or newer (__match_any_sync)"
#endif

namespace bilateral_ops {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// float for float32 / float16 / bfloat16, double for float64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// ---------------------------------------------------------------------------------------------
// Read-only loads. 16-bit types go through __ldg on their bits: c10::Half / c10::BFloat16 have no
// __ldg overload.

template <typename scalar_t>
struct Ldg;

template <>
struct Ldg<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
};
template <>
struct Ldg<double> {
  static __device__ __forceinline__ double load(const double* p) { return __ldg(p); }
};
template <>
struct Ldg<c10::Half> {
  static __device__ __forceinline__ float load(const c10::Half* p) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
};
template <>
struct Ldg<c10::BFloat16> {
  static __device__ __forceinline__ float load(const c10::BFloat16* p) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
};

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> ldg(const scalar_t* p) {
  return Ldg<scalar_t>::load(p);
}

// ---------------------------------------------------------------------------------------------
// Warp reductions. Every lane of the warp must call them (full mask).

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ int warp_min(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFullMask, v);
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
#endif
}

__device__ __forceinline__ int warp_max(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
#endif
}

// ---------------------------------------------------------------------------------------------
// Division of an unsigned n < 2^31 by a divisor fixed at launch, as a multiply-high, an add and a
// shift (Granlund and Montgomery's round-up method): index maps evaluated per element then cost a
// few instructions instead of a division's long sequence (a 64-bit one is some seventy).

struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;

  FastDiv() = default;
  __host__ explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint64_t{1} << s) < d) ++s;
    // floor(2^(32 + s) / d) - 2^32 + 1, below 2^32 because 2^s < 2 d.
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  // n / d for n < 2^31 (so that the sum below does not wrap).
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// ---------------------------------------------------------------------------------------------
// Adds v to the 64-bit integer *p in shared memory with two native 32-bit atomics, the low word's
// wrap carried into the high word. The sum modulo 2^64 is exact in any order (each add sees the
// low word it wrapped), so it is as deterministic as a 64-bit atomicAdd, which sm_80 to sm_90
// compile for shared memory into a compare-and-swap loop (ATOMS.CAST.SPIN.64) that contending
// warps retry.

__device__ __forceinline__ void shared_atomic_add_u64(unsigned long long* p, unsigned long long v) {
  unsigned* w = reinterpret_cast<unsigned*>(p);  // little-endian: w[0] the low word
  const unsigned lo = static_cast<unsigned>(v), hi = static_cast<unsigned>(v >> 32);
  const unsigned old = atomicAdd(w, lo);
  const unsigned up = hi + (old + lo < old ? 1u : 0u);
  if (up != 0u) atomicAdd(w + 1, up);
}

// ---------------------------------------------------------------------------------------------
// Warp-aggregated scatter. Lanes of a warp often add into the same destination (neighbouring
// pixels share grid cells); reducing them first turns up to 32 serialised atomics on one address
// into one per distinct destination.

// The lanes whose key equals this lane's (this lane included). Every lane must call it.
__device__ __forceinline__ unsigned match_peers(unsigned key) {
  return __match_any_sync(kFullMask, key);
}

// Whether this lane is the one of its peer group that performs the group's atomic.
__device__ __forceinline__ bool is_peer_leader(unsigned peers, int lane) {
  return __ffs(peers) - 1 == lane;
}

// Sum of x over the lanes of `peers` (this lane's group from match_peers), valid on the group's
// leader (its lowest lane); other lanes get partial sums. A tree over each group, all groups at
// once (E. Westphal, "Voting and shuffling to optimize atomic operations"). Every lane of the warp
// must call it, with the full mask, whatever its group: shuffles read from lanes of the group
// only, so lanes of other groups (or lanes holding zeros) never leak in.
template <typename T>
__device__ __forceinline__ T peer_sum(T x, unsigned peers, int lane) {
  if (peers == kFullMask) return warp_sum(x);  // uniform: every lane then has the full mask
  // Position among the peers, counted from the leader; lanes below this one are masked off
  // without shifting by 32 (lane 0: (1u << 0) - 1 == 0).
  int rel_pos = __popc(peers & ((1u << lane) - 1u));
  peers &= (0xfffffffeu << lane);  // peers above this lane
  while (__any_sync(kFullMask, peers != 0u)) {
    const int next = __ffs(peers);  // next remaining peer above, 1-based; 0 if none
    const T t = __shfl_sync(kFullMask, x, (next - 1) & 31);
    if (next != 0) x += t;
    // Lanes at odd positions have been summed into their left neighbour: drop them.
    peers &= ~__ballot_sync(kFullMask, rel_pos & 1);
    rel_pos >>= 1;
  }
  return x;
}

// *dst += x summed over the peer group, by one atomic from the group's leader. `dst` must be the
// same for every lane of a group (it is what the key identified). Every lane must call it.
template <typename T>
__device__ __forceinline__ void aggregated_atomic_add(T* dst, T x, unsigned peers, int lane) {
  const T s = peer_sum(x, peers, lane);
  if (is_peer_leader(peers, lane)) atomicAdd(dst, s);
}

}  // namespace cuda
}  // namespace bilateral_ops
