// The curve guide's per-point functions (curve_guide.h has the formula), for a GCC vector of
// pixels or a scalar V. No include guard, on purpose: curve_guide.h includes this inside
// namespace bilateral_ops (the CUDA kernels and the host), and the CPU kernels include it again
// inside each instruction-set copy's namespace (isa_copies.h), so that each copy parses these
// templates under its own target options. GCC types a vector comparison with the options in
// force where the template is parsed; parsed outside the AVX-512 copy, a select on a comparison
// of that copy's 64-byte vectors is lowered lane by lane (16 extracts and branches). Include
// nothing here.

// relu that lets NaN through, as torch.relu does: zero > a ? zero : a, which is x86's
// maxps(zero, a) exactly (a NaN or a -0 passes as a). The zero is an argument so that the CPU
// kernels can pass one the compiler cannot see as a constant: against a literal zero GCC emits a
// compare and an and-not rather than that one max.
template <typename V>
BO_HOST_DEVICE V curve_relu(V a, V zero = V{}) {
  return zero > a ? zero : a;
}

// One point of a channel's curve: adds its value to f.
template <typename V>
BO_HOST_DEVICE void curve_value(V c, V shift, V slope, V& f, V zero = V{}) {
  f += slope * curve_relu(c - shift, zero);
}

// One point of a channel's curve: adds its value to f and its slope to fp.
template <typename V>
BO_HOST_DEVICE void curve_point(V c, V shift, V slope, V& f, V& fp, V zero = V{}) {
  const V a = c - shift;
  f += slope * curve_relu(a, zero);
  fp += a > V{} ? slope : V{};
}

// The clamp to [0, 1]; NaN stays NaN (torch.clamp).
template <typename V>
BO_HOST_DEVICE V curve_clamp01(V g) {
  const V one = V{} + 1;
  const V lo = g < V{} ? V{} : g;
  return lo > one ? one : lo;
}

// The gradient that passes the clamp: go where 0 <= g <= 1 (g before the clamp), else 0.
template <typename V>
BO_HOST_DEVICE V curve_clamp_pass(V g, V go) {
  const V one = V{} + 1;
  return (g >= V{}) & (g <= one) ? go : V{};
}

// Contributions of one curve point to the shift and slope gradient rows, for a pixel whose
// channel value is c and whose curve output receives the gradient df.
template <typename V>
BO_HOST_DEVICE void curve_point_grads(V c, V shift, V df, V& d_shift, V& d_slope, V zero = V{}) {
  const V a = c - shift;
  d_slope += df * curve_relu(a, zero);
  d_shift += a > V{} ? df : V{};
}
