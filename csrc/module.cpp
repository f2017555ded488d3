// The Python module bilateral_ops._C. Importing it loads this shared library, which runs the
// static TORCH_LIBRARY registrations of csrc/ops.cpp and of the kernels; every op is reached
// through torch.ops.bilateral_ops. PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
//
// The module also exposes the CUDA launch configuration (csrc/cuda/launch_config.h, pure C++, so
// it is in the CPU-only build too), for tests/test_launch_config.py and tools/ptxas_report.py:
//   launch_plans(op, pass_, N, C, D, Gh, Gw, H, W, Ci=0, has_offset=True, elem_size=4,
//                acc_size=4, dguide=False, mask=None, deterministic=False, sigma=None) -> [dict]
//       the launches one call of the op makes, in order, each {kernel, grid, block,
//       dynamic_smem, static_smem_budget, opt_in, launch_bounds, ...}. op: "slice",
//       "slice_apply" (pass_ "forward" or "backward"), "grid_splat" (pass_ "forward"; C input
//       channels of an H x W image into D x Gh x Gw cells; mask and dguide do not apply) or
//       "grid_blur" (pass_ "forward"; the grid N x C x D x Gh x Gw, H and W unused; sigma three
//       floats, default (1, 1, 1)).
//   curve_plans(pass_, N, C, H, W, K, elem_size=4, acc_size=4, mask=None, sms=0) -> [dict]
//       the same for curve_guide (mask: its backward's 7 flags; sms: the device's multiprocessors,
//       which cap the forward's grid at one resident wave), with table_size, table_shared,
//       rows_shared, registers, group and partial_rows
//   filter_plans(pass_, N, C, Cg, H, W, ky, kx, acc_size=4, self=True, mask=None, saved=False) -> [dict]
//       the launches of one bilateral_filter / _bilateral_filter_backward call
//   points_plans(pass_, P, M, C, D, Gh, Gw, mask=None) -> [dict]
//       the launches of one bilateral_slice_apply_points / its backward (mask: 3 flags)
//   tv_plans(pass_, M, B, numel, has_idx=False) -> [dict]
//       the launches of one grid_tv_loss / its backward, each with "partials"
//   kernel_info(acc_size) -> [dict]   __launch_bounds__ and largest dynamic request per kernel
//   limits() -> dict                  the architectural limits the plans are built against (and
//                                     grid_blur's largest tap count passed by value)
//   max_cells(tile, n, G) -> int      cells a tile of pixels can touch along one axis
//   curve_sorted(shifts, slopes, c, double=True) -> dict
//       one channel's curve at the points c through its sorted knots (bilateral_ops/curve_guide.h,
//       the CUDA kernels' path) in double or float: {"sorted", "pq", "f", "fp"}
//   slice_path(path=None) -> str     the CPU slice ops' path, "auto" (by the sizes), "rows" (the
//                                     row engine) or "pixels" (per-pixel gathers), set when given;
//                                     returns the previous setting (csrc/cpu/slice_path.h)
//   slice_path_for(D, Gh, Gw, H, W) -> str   the path "auto" takes for those sizes
//   filter_layout(N, H, W, ky, kx, border) -> (bool, int)   whether the CPU bilateral_filter runs
//                                     such a call as the image's transpose, and in how many column
//                                     segments (csrc/cpu/bilateral_filter.cpp)
//   cpu_isa() -> str                  the x86-64 level whose copy of the CPU kernels compiled per
//                                     instruction set runs ("x86-64-v4", "x86-64-v3", "x86-64";
//                                     csrc/cpu/simd.h, BILATERAL_OPS_CPU_ISA)
// Plain CPython API: no pybind11, nothing to link beyond what torch's extension build provides.

#include <Python.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bilateral_ops/curve_guide.h"
#include "cpu/bilateral_filter_cpu.h"
#include "cpu/simd.h"
#include "cpu/slice_path.h"
#include "cuda/launch_config.h"

namespace {

using bilateral_ops::AffineLayout;
using bilateral_ops::SliceGeometry;
namespace launch = bilateral_ops::launch;

// Adds value (a new reference, stolen) under key; false (with the Python error set) on failure.
bool put(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* int_value(int64_t v) { return PyLong_FromLongLong(static_cast<long long>(v)); }

PyObject* dim3_tuple(const launch::Dim3& d) {
  return Py_BuildValue("(LLL)", static_cast<long long>(d.x), static_cast<long long>(d.y),
                       static_cast<long long>(d.z));
}

// A launch as a dict; extras (key, value) pairs appended. Returns a new reference or nullptr.
struct Extra {
  const char* key;
  int64_t value;
};

PyObject* launch_dict(const launch::Launch& l, const Extra* extras = nullptr, int n_extras = 0) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  bool ok = put(d, "kernel", PyUnicode_FromString(l.kernel)) &&
            put(d, "grid", dim3_tuple(l.grid)) && put(d, "block", dim3_tuple(l.block)) &&
            put(d, "dynamic_smem", int_value(l.dynamic_smem)) &&
            put(d, "static_smem_budget", int_value(l.static_smem)) &&
            put(d, "opt_in", PyBool_FromLong(l.opt_in)) &&
            put(d, "launch_bounds", Py_BuildValue("(ii)", l.max_threads, l.min_blocks));
  for (int i = 0; ok && i < n_extras; ++i) ok = put(d, extras[i].key, int_value(extras[i].value));
  if (!ok) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

bool append(PyObject* list, PyObject* item) {
  if (item == nullptr) return false;
  const int rc = PyList_Append(list, item);
  Py_DECREF(item);
  return rc == 0;
}

// mask: None (everything wanted) or a sequence of k bools.
bool parse_mask(PyObject* mask, int k, bool* out) {
  for (int i = 0; i < k; ++i) out[i] = true;
  if (mask == Py_None) return true;
  PyObject* seq = PySequence_Fast(mask, "mask must be a sequence of bools");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != k) {
    Py_DECREF(seq);
    PyErr_Format(PyExc_ValueError, "mask must have %d entries, got %zd", k, n);
    return false;
  }
  for (int i = 0; i < k; ++i) {
    const int t = PyObject_IsTrue(PySequence_Fast_GET_ITEM(seq, i));
    if (t < 0) {
      Py_DECREF(seq);
      return false;
    }
    out[i] = t != 0;
  }
  Py_DECREF(seq);
  return true;
}

// The launches of a backward plan (also grid_splat's), appended to `out`; false with the Python
// error set on failure.
bool append_backward(PyObject* out, const launch::BackwardPlan& p) {
  if (!p.valid) {
    PyErr_SetString(PyExc_ValueError, "no valid plan: too many channels for the gather");
    return false;
  }
  bool ok = true;
  if (p.tile.present) {
    const Extra ex[] = {{"shared_cap", p.shared_cap},
                        {"box_x", p.box_x},
                        {"box_y", p.box_y},
                        {"header_bytes", launch::kScatterHeaderBytes}};
    ok = append(out, launch_dict(p.tile, ex, p.scatter ? 4 : 0));
  }
  if (ok && p.axis.present) ok = append(out, launch_dict(p.axis));
  if (ok && p.gather.present) {
    const Extra ex[] = {{"chunk", p.gather_chunk},   {"split", p.gather_split},
                        {"slices", p.gather_slices}, {"own", p.gather_own},
                        {"passes", p.gather_passes}, {"values", p.gather_values},
                        {"header_bytes", launch::kGatherHeaderBytes}};
    ok = append(out, launch_dict(p.gather, ex, 7));
  }
  if (ok && p.finish.present) ok = append(out, launch_dict(p.finish));
  return ok;
}

// grid_blur's passes for sigma (None: 1 on every axis; else three numbers).
PyObject* blur_plans(long long N, long long C, long long D, long long Gh, long long Gw,
                     PyObject* sigma) {
  double s[3] = {1.0, 1.0, 1.0};
  if (sigma != Py_None) {
    PyObject* seq = PySequence_Fast(sigma, "sigma must be a sequence of three floats");
    if (seq == nullptr) return nullptr;
    if (PySequence_Fast_GET_SIZE(seq) != 3) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_ValueError, "sigma must have three entries (D, Gh, Gw)");
      return nullptr;
    }
    for (int i = 0; i < 3; ++i) {
      s[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
      if (s[i] == -1.0 && PyErr_Occurred()) {
        Py_DECREF(seq);
        return nullptr;
      }
    }
    Py_DECREF(seq);
  }
  for (double v : s) {
    // The op's own check (check_grid_blur): finite, >= 0, at most kMaxBlurSigma.
    if (!(v >= 0.0 && v <= bilateral_ops::kMaxBlurSigma)) {
      PyErr_SetString(PyExc_ValueError, "sigma must be finite, >= 0 and <= 1e6");
      return nullptr;
    }
  }
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  const launch::BlurPlan p = launch::blur_plan(N, C, D, Gh, Gw, s);
  for (int k = 0; k < p.passes; ++k) {
    const launch::BlurPass& b = p.pass[k];
    const Extra ex[] = {{"axis", b.axis},          {"n", b.n},
                        {"inner", b.inner},        {"total", b.total},
                        {"taps", b.taps},          {"param_taps", b.param_taps ? 1 : 0},
                        {"wide", b.wide ? 1 : 0}};
    if (!append(out, launch_dict(b.launch, ex, 7))) {
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

PyObject* launch_plans(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"op",         "pass_",     "N",         "C",      "D",
                                   "Gh",         "Gw",        "H",         "W",      "Ci",
                                   "has_offset", "elem_size", "acc_size",  "dguide", "mask",
                                   "deterministic", "sigma",   nullptr};
  const char* op = nullptr;
  const char* pass = nullptr;
  long long N, C, D, Gh, Gw, H, W, Ci = 0, elem_size = 4, acc_size = 4;
  int has_offset = 1, dguide = 0, deterministic = 0;
  PyObject* mask = Py_None;
  PyObject* sigma = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssLLLLLLL|LpLLpOpO", const_cast<char**>(keywords),
                                   &op, &pass, &N, &C, &D, &Gh, &Gw, &H, &W, &Ci, &has_offset,
                                   &elem_size, &acc_size, &dguide, &mask, &deterministic, &sigma)) {
    return nullptr;
  }
  const bool apply = PyOS_stricmp(op, "slice_apply") == 0;
  const bool splat = PyOS_stricmp(op, "grid_splat") == 0;
  const bool blur = PyOS_stricmp(op, "grid_blur") == 0;
  if (!apply && !splat && !blur && PyOS_stricmp(op, "slice") != 0) {
    PyErr_Format(PyExc_ValueError,
                 "op must be 'slice', 'slice_apply', 'grid_splat' or 'grid_blur', got '%s'", op);
    return nullptr;
  }
  const bool forward = PyOS_stricmp(pass, "forward") == 0;
  if (!forward && PyOS_stricmp(pass, "backward") != 0) {
    PyErr_Format(PyExc_ValueError, "pass_ must be 'forward' or 'backward', got '%s'", pass);
    return nullptr;
  }
  if ((splat || blur) && !forward) {
    PyErr_Format(PyExc_ValueError, "%s has no backward op of its own: pass_ must be 'forward'",
                 op);
    return nullptr;
  }
  if (N < 0 || H < 0 || W < 0 || C < 1 || D < 1 || Gh < 1 || Gw < 1) {
    PyErr_SetString(PyExc_ValueError, "need N, H, W >= 0 and C, D, Gh, Gw >= 1");
    return nullptr;
  }
  if ((acc_size != 4 && acc_size != 8) || (elem_size != 2 && elem_size != 4 && elem_size != 8)) {
    PyErr_SetString(PyExc_ValueError, "acc_size must be 4 or 8, elem_size 2, 4 or 8");
    return nullptr;
  }
  if (blur) return blur_plans(N, C, D, Gh, Gw, sigma);
  if (splat) {
    PyObject* out = PyList_New(0);
    if (out == nullptr || N * H * W == 0) return out;  // an empty image: zeros, no launch
    const SliceGeometry g{N, C, D, Gh, Gw, H, W};
    if (!append_backward(out, launch::splat_plan(g, acc_size, deterministic != 0))) {
      Py_DECREF(out);
      return nullptr;
    }
    return out;
  }
  AffineLayout l{};
  if (apply) {
    if (Ci < 1 || C % bilateral_ops::affine_stride(Ci, has_offset != 0) != 0) {
      PyErr_Format(PyExc_ValueError, "slice_apply needs Ci >= 1 and C a multiple of Ci%s",
                   has_offset ? " + 1" : "");
      return nullptr;
    }
    l = bilateral_ops::affine_layout(C, Ci, has_offset != 0);
  }
  bool want[3];
  if (!parse_mask(mask, apply ? 3 : 2, want)) return nullptr;
  if (!forward && dguide && want[1]) {
    PyErr_SetString(PyExc_ValueError, "mask[1] (grad_guide) must be false with dguide");
    return nullptr;
  }
  const SliceGeometry g{N, C, D, Gh, Gw, H, W};

  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  // The launchers return before any launch for empty images, and in the backward when no
  // gradient is wanted.
  const bool any = forward || want[0] || want[1] || (apply && want[2]);
  if (g.pixels() == 0 || !any) return out;
  bool ok = true;
  if (forward) {
    const launch::ForwardPlan p = launch::forward_plan(g, apply, l, acc_size);
    if (p.pack.present) {
      const Extra ex[] = {{"rows", p.rows},
                          {"row_stride", p.row_stride},
                          {"row_len", 4 * p.chunks},
                          {"packed_elems", p.packed_elems}};
      ok = append(out, launch_dict(p.pack, ex, 4));
    }
    if (ok) {
      const Extra ex[] = {{"chunks", p.chunks}, {"rows", p.rows}};
      ok = append(out, launch_dict(p.forward, ex, p.vectorised ? 2 : 0));
    }
  } else {
    launch::BackwardRequest r;
    r.need_grid = want[0];
    r.need_guide = want[1];
    r.need_input = apply && want[2];
    r.deterministic = deterministic != 0;
    ok = append_backward(out, launch::backward_plan(g, apply, l, acc_size, r));
  }
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

PyObject* curve_plans(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"pass_", "N", "C", "H", "W", "K", "elem_size", "acc_size",
                                   "mask", "sms", nullptr};
  const char* pass = nullptr;
  long long N, C, H, W, K, elem_size = 4, acc_size = 4, sms = 0;
  PyObject* mask = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLLLLL|LLOL", const_cast<char**>(keywords),
                                   &pass, &N, &C, &H, &W, &K, &elem_size, &acc_size, &mask, &sms)) {
    return nullptr;
  }
  if (sms < 0) {
    PyErr_SetString(PyExc_ValueError, "sms must be >= 0");
    return nullptr;
  }
  const bool forward = PyOS_stricmp(pass, "forward") == 0;
  if (!forward && PyOS_stricmp(pass, "backward") != 0) {
    PyErr_Format(PyExc_ValueError, "pass_ must be 'forward' or 'backward', got '%s'", pass);
    return nullptr;
  }
  if (N < 0 || H < 0 || W < 0 || C < 1 || K < 1) {
    PyErr_SetString(PyExc_ValueError, "need N, H, W >= 0 and C, K >= 1");
    return nullptr;
  }
  if ((acc_size != 4 && acc_size != 8) || (elem_size != 2 && elem_size != 4 && elem_size != 8)) {
    PyErr_SetString(PyExc_ValueError, "acc_size must be 4 or 8, elem_size 2, 4 or 8");
    return nullptr;
  }
  bool want[7];
  if (!parse_mask(mask, 7, want)) return nullptr;
  launch::CurveRequest r;
  r.backward = !forward;
  r.need_input = want[0];
  r.need_params = want[1] || want[2] || want[3] || want[4] || want[5] || want[6];
  r.sms = sms;
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  // The launchers return before any launch for empty images and when no gradient is wanted.
  if (N * H * W == 0 || (r.backward && !r.need_input && !r.need_params)) return out;
  const launch::CurvePlan p = launch::curve_plan(N, C, H, W, K, acc_size, r);
  const Extra ex[] = {{"table_size", p.table_size},
                      {"table_shared", p.table_shared},
                      {"rows_shared", p.rows_shared},
                      {"registers", p.registers},
                      {"group", p.group},
                      {"partial_rows", p.partial_rows}};
  bool ok = append(out, launch_dict(p.main, ex, 6));
  if (ok && p.reduce.present) ok = append(out, launch_dict(p.reduce, ex, 6));
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

// filter_plans(pass_, N, C, Cg, H, W, ky, kx, acc_size=4, self=True, mask=None, saved=False): the
// launches of one bilateral_filter call ("forward") or _bilateral_filter_backward call ("backward";
// saved: given the forward's output and weight sums).
PyObject* filter_plans(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"pass_", "N",        "C",    "Cg",   "H",     "W",    "ky",
                                   "kx",    "acc_size", "self", "mask", "saved", nullptr};
  const char* pass = nullptr;
  long long N, C, Cg, H, W, ky, kx, acc_size = 4;
  int self = 1, saved = 0;
  PyObject* mask = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLLLLLLL|LpOp", const_cast<char**>(keywords), &pass,
                                   &N, &C, &Cg, &H, &W, &ky, &kx, &acc_size, &self, &mask, &saved)) {
    return nullptr;
  }
  const bool forward = PyOS_stricmp(pass, "forward") == 0;
  if (!forward && PyOS_stricmp(pass, "backward") != 0) {
    PyErr_Format(PyExc_ValueError, "pass_ must be 'forward' or 'backward', got '%s'", pass);
    return nullptr;
  }
  if (N < 0 || C < 0 || Cg < 0 || H < 0 || W < 0 || ky < 1 || kx < 1 || ky % 2 == 0 || kx % 2 == 0 ||
      (self && Cg != C)) {
    PyErr_SetString(PyExc_ValueError, "need N, C, Cg, H, W >= 0, odd ky, kx >= 1 and Cg == C with self");
    return nullptr;
  }
  if (acc_size != 4 && acc_size != 8) {
    PyErr_SetString(PyExc_ValueError, "acc_size must be 4 or 8");
    return nullptr;
  }
  bool want[4];
  if (!parse_mask(mask, 4, want)) return nullptr;
  if (self) want[1] = false;  // the launcher never computes a separate guidance gradient
  const launch::FilterPlan p =
      launch::filter_plan(launch::FilterSizes{N, C, Cg, H, W, ky, kx, self != 0}, acc_size, !forward, want, saved != 0);
  if (!p.valid) {
    PyErr_SetString(PyExc_ValueError, "no valid plan: too many tiles for one grid");
    return nullptr;
  }
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  const Extra ex[] = {{"tiled", p.tiled ? 1 : 0},
                      {"tile_bytes", p.tile_bytes},
                      {"staged_channels", p.staged_channels},
                      {"tiles_x", p.tiles_x},
                      {"tiles_y", p.tiles_y}};
  bool ok = true;
  for (const launch::Launch* l : {&p.forward, &p.pass1, &p.pass2, &p.fold_input, &p.fold_guidance, &p.finish}) {
    if (!ok || !l->present) continue;
    const bool tile = l == &p.forward || (l == &p.pass1 && !p.centre);
    ok = append(out, launch_dict(*l, tile ? ex : nullptr, tile ? 5 : 0));
  }
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

// points_plans(pass_, P, M, C, D, Gh, Gw, mask=None): bilateral_slice_apply_points' launches
// (mask: the backward's three flags); tv_plans(pass_, M, B, numel, has_idx=False): grid_tv_loss'
// (numel: elements of one grid), the forward's with "partials".
PyObject* points_plans(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"pass_", "P", "M", "C", "D", "Gh", "Gw", "mask", nullptr};
  const char* pass = nullptr;
  long long P, M, C, D, Gh, Gw;
  PyObject* mask = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLLLLLL|O", const_cast<char**>(keywords), &pass,
                                   &P, &M, &C, &D, &Gh, &Gw, &mask)) {
    return nullptr;
  }
  const bool forward = PyOS_stricmp(pass, "forward") == 0;
  if (!forward && PyOS_stricmp(pass, "backward") != 0) {
    PyErr_Format(PyExc_ValueError, "pass_ must be 'forward' or 'backward', got '%s'", pass);
    return nullptr;
  }
  if (P < 0 || M < 1 || C < 1 || D < 1 || Gh < 1 || Gw < 1) {
    PyErr_SetString(PyExc_ValueError, "need P >= 0 and M, C, D, Gh, Gw >= 1");
    return nullptr;
  }
  bool want[3];
  if (!parse_mask(mask, 3, want)) return nullptr;
  const launch::PointsPlan p = launch::points_plan(P, M, C, D * Gh * Gw, forward ? nullptr : want);
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  bool ok = true;
  // In launch order: pack, absmax, forward, samples, backward, finish.
  for (const launch::Launch* l : {&p.pack, &p.absmax, &p.forward, &p.samples, &p.backward, &p.finish}) {
    if (ok && l->present) ok = append(out, launch_dict(*l));
  }
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

PyObject* tv_plans(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"pass_", "M", "B", "numel", "has_idx", nullptr};
  const char* pass = nullptr;
  long long M, B, numel;
  int has_idx = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLLL|p", const_cast<char**>(keywords), &pass, &M,
                                   &B, &numel, &has_idx)) {
    return nullptr;
  }
  const bool forward = PyOS_stricmp(pass, "forward") == 0;
  if (!forward && PyOS_stricmp(pass, "backward") != 0) {
    PyErr_Format(PyExc_ValueError, "pass_ must be 'forward' or 'backward', got '%s'", pass);
    return nullptr;
  }
  if (M < 0 || B < 0 || numel < 0 || (!has_idx && B != M)) {
    PyErr_SetString(PyExc_ValueError, "need M, B, numel >= 0 and B == M without idx");
    return nullptr;
  }
  const launch::TvPlan p = launch::tv_plan(M, B, numel, has_idx != 0, !forward);
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  const Extra ex[] = {{"partials", p.partials}};
  bool ok = true;
  for (const launch::Launch* l : {&p.count, &p.loss, &p.reduce, &p.backward}) {
    if (ok && l->present) ok = append(out, launch_dict(*l, ex, 1));
  }
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

PyObject* kernel_info(PyObject*, PyObject* args) {
  long long acc_size;
  if (!PyArg_ParseTuple(args, "L", &acc_size)) return nullptr;
  if (acc_size != 4 && acc_size != 8) {
    PyErr_SetString(PyExc_ValueError, "acc_size must be 4 or 8");
    return nullptr;
  }
  const int n = launch::kernel_info(acc_size, nullptr);
  std::vector<launch::KernelInfo> infos(static_cast<size_t>(n));
  launch::kernel_info(acc_size, infos.data());
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* d = PyDict_New();
    const bool ok = d != nullptr && put(d, "kernel", PyUnicode_FromString(infos[i].kernel)) &&
                    put(d, "max_threads", PyLong_FromLong(infos[i].max_threads)) &&
                    put(d, "min_blocks", PyLong_FromLong(infos[i].min_blocks)) &&
                    put(d, "static_smem_budget", int_value(infos[i].static_smem)) &&
                    put(d, "max_dynamic_smem", int_value(infos[i].max_dynamic_smem));
    if (!ok) {
      Py_XDECREF(d);
      Py_DECREF(out);
      return nullptr;
    }
    if (!append(out, d)) {
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

PyObject* limits(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  PyObject* opt_in = PyDict_New();
  if (d == nullptr || opt_in == nullptr) {
    Py_XDECREF(d);
    Py_XDECREF(opt_in);
    return nullptr;
  }
  bool ok = true;
  for (int sm : {80, 86, 89, 90}) {
    char key[8];
    PyOS_snprintf(key, sizeof(key), "sm_%d", sm);
    ok = ok && put(opt_in, key, int_value(launch::opt_in_smem_limit(sm)));
  }
  ok = ok && put(d, "opt_in_smem", opt_in) &&
       put(d, "max_threads_per_block", int_value(launch::kMaxThreadsPerBlock)) &&
       put(d, "max_grid_x", int_value(launch::kMaxGridX)) &&
       put(d, "max_grid_yz", int_value(launch::kMaxGridYZ)) &&
       put(d, "smem_no_opt_in", int_value(launch::kSmemNoOptIn)) &&
       put(d, "registers_per_block", int_value(launch::kRegistersPerBlock)) &&
       put(d, "max_registers_per_thread", int_value(launch::kMaxRegistersPerThread)) &&
       put(d, "tile", Py_BuildValue("(ii)", launch::kTileW, launch::kTileH)) &&
       put(d, "gather_max_chunk", int_value(launch::kGatherMaxChunk)) &&
       put(d, "blur_param_taps", int_value(launch::kBlurParamTaps)) &&
       put(d, "max_kernel_param_bytes", int_value(launch::kMaxKernelParamBytes));
  if (!ok) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyObject* max_cells(PyObject*, PyObject* args) {
  long long tile, n, G;
  if (!PyArg_ParseTuple(args, "LLL", &tile, &n, &G)) return nullptr;
  if (tile < 1 || n < 1 || G < 1) {
    PyErr_SetString(PyExc_ValueError, "tile, n and G must be >= 1");
    return nullptr;
  }
  return int_value(launch::max_cells(tile, n, G));
}

// A sequence of floats as a vector (false, with the Python error set, on failure).
bool float_list(PyObject* seq, const char* name, std::vector<double>* out) {
  PyObject* fast = PySequence_Fast(seq, name);
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out->resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    (*out)[static_cast<size_t>(i)] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
    if (PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
  }
  Py_DECREF(fast);
  return true;
}

template <typename T>
PyObject* float_tuple(const std::vector<T>& v) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(v.size()));
  if (t == nullptr) return nullptr;
  for (size_t i = 0; i < v.size(); ++i) {
    PyObject* x = PyFloat_FromDouble(static_cast<double>(v[i]));
    if (x == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), x);
  }
  return t;
}

// The sorted-knot evaluation exactly as the CUDA kernels run it: every knot placed at its rank,
// the prefix sums, then the search per point.
template <typename T>
PyObject* curve_sorted_as(const std::vector<double>& sh, const std::vector<double>& sl,
                          const std::vector<double>& cs) {
  const int K = static_cast<int>(sh.size());
  std::vector<T> shifts(sh.begin(), sh.end()), sorted(K), pq(2 * (K + 1)), f, fp;
  for (int j = 0; j < K; ++j) {
    bilateral_ops::curve_place_knot(shifts[j], static_cast<T>(sl[j]),
                                    bilateral_ops::curve_knot_rank(shifts.data(), K, j),
                                    sorted.data(), pq.data());
  }
  bilateral_ops::curve_prefix(pq.data(), sorted.data(), K);
  for (double c : cs) {
    T d;
    f.push_back(bilateral_ops::curve_sorted_point(static_cast<T>(c), sorted.data(), pq.data(), K, d));
    fp.push_back(d);
  }
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  if (!(put(d, "sorted", float_tuple(sorted)) && put(d, "pq", float_tuple(pq)) &&
        put(d, "f", float_tuple(f)) && put(d, "fp", float_tuple(fp)))) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyObject* curve_sorted(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"shifts", "slopes", "c", "double", nullptr};
  PyObject *sh_obj, *sl_obj, *c_obj;
  int as_double = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|p", const_cast<char**>(keywords), &sh_obj,
                                   &sl_obj, &c_obj, &as_double)) {
    return nullptr;
  }
  std::vector<double> sh, sl, cs;
  if (!float_list(sh_obj, "shifts must be a sequence of floats", &sh) ||
      !float_list(sl_obj, "slopes must be a sequence of floats", &sl) ||
      !float_list(c_obj, "c must be a sequence of floats", &cs)) {
    return nullptr;
  }
  if (sh.empty() || sh.size() != sl.size()) {
    PyErr_SetString(PyExc_ValueError, "shifts and slopes need the same length K >= 1");
    return nullptr;
  }
  return as_double ? curve_sorted_as<double>(sh, sl, cs) : curve_sorted_as<float>(sh, sl, cs);
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  switch (bilateral_ops::cpu::cpu_isa()) {
    case bilateral_ops::cpu::Isa::kV4:
      return PyUnicode_FromString("x86-64-v4");
    case bilateral_ops::cpu::Isa::kV3:
      return PyUnicode_FromString("x86-64-v3");
    default:
      return PyUnicode_FromString("x86-64");
  }
}

// slice_path(path=None) -> str: the CPU slice ops' path ("auto", "rows" or "pixels",
// csrc/cpu/slice_path.h), set to `path` when given; returns the setting before the call.
PyObject* slice_path(PyObject*, PyObject* args) {
  static const char* const names[] = {"auto", "rows", "pixels"};
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "|z", &path)) return nullptr;
  const int before = bilateral_ops::cpu::g_slice_path.load();
  if (path != nullptr) {
    int chosen = -1;
    for (int i = 0; i < 3; ++i) {
      if (std::string(path) == names[i]) chosen = i;
    }
    if (chosen < 0) {
      PyErr_Format(PyExc_ValueError, "slice_path must be 'auto', 'rows' or 'pixels', got '%s'", path);
      return nullptr;
    }
    bilateral_ops::cpu::g_slice_path.store(chosen);
  }
  return PyUnicode_FromString(names[before]);
}

// slice_path_for(D, Gh, Gw, H, W) -> str: the path "auto" takes for one image of H x W on a
// D x Gh x Gw grid.
PyObject* slice_path_for(PyObject*, PyObject* args) {
  long long D, Gh, Gw, H, W;
  if (!PyArg_ParseTuple(args, "LLLLL", &D, &Gh, &Gw, &H, &W)) return nullptr;
  const SliceGeometry g{1, 1, D, Gh, Gw, H, W};
  return PyUnicode_FromString(bilateral_ops::cpu::pixels_cheaper(g) ? "pixels" : "rows");
}

// filter_layout(N, H, W, ky, kx, border) -> (transposed, segments), see the top of this file.
PyObject* filter_layout(PyObject*, PyObject* args) {
  long long N, H, W, ky, kx;
  const char* border;
  if (!PyArg_ParseTuple(args, "LLLLLs", &N, &H, &W, &ky, &kx, &border)) return nullptr;
  bilateral_ops::cpu::filter::Layout l;
  try {
    l = bilateral_ops::cpu::filter::cpu_layout(N, H, W, ky, kx, border);
  } catch (const c10::Error& e) {  // an unknown border (the ops' own parse_border)
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  return Py_BuildValue("(OL)", l.transposed ? Py_True : Py_False, static_cast<long long>(l.segments));
}

PyMethodDef methods[] = {
    {"slice_path", slice_path, METH_VARARGS, "The CPU slice ops' path: 'auto', 'rows' or 'pixels'."},
    {"slice_path_for", slice_path_for, METH_VARARGS, "The path 'auto' takes for one image and grid."},
    {"filter_layout", filter_layout, METH_VARARGS, "How the CPU bilateral_filter lays out a call of these sizes."},
    {"launch_plans", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(launch_plans)),
     METH_VARARGS | METH_KEYWORDS, "The CUDA launches of one op call (see csrc/module.cpp)."},
    {"curve_plans", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(curve_plans)),
     METH_VARARGS | METH_KEYWORDS, "The CUDA launches of one curve_guide call."},
    {"filter_plans", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(filter_plans)),
     METH_VARARGS | METH_KEYWORDS, "The CUDA launches of one bilateral_filter call (see csrc/module.cpp)."},
    {"points_plans", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(points_plans)),
     METH_VARARGS | METH_KEYWORDS, "The CUDA launches of one bilateral_slice_apply_points call."},
    {"tv_plans", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(tv_plans)),
     METH_VARARGS | METH_KEYWORDS, "The CUDA launches of one grid_tv_loss call."},
    {"kernel_info", kernel_info, METH_VARARGS,
     "__launch_bounds__ and largest dynamic shared memory request of every CUDA kernel."},
    {"limits", limits, METH_NOARGS, "Architectural limits the launch plans are checked against."},
    {"curve_sorted", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(curve_sorted)),
     METH_VARARGS | METH_KEYWORDS, "One curve through its sorted knots, as the CUDA kernels evaluate it."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The x86-64 level of the CPU kernel copies that run (csrc/cpu/simd.h)."},
    {"max_cells", max_cells, METH_VARARGS,
     "Cells a tile of `tile` pixels touches along an n-pixel axis of G cells (upper bound)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
