// The Python module linattn._C.
//
// It does not compile against torch: Python describes each tensor by its data pointer, dtype
// code, shape and strides in elements, so one build works with every torch version. A tensor
// argument is either a View or the plain tuple (data_ptr, dtype, shape, strides): the tuple is
// what linattn/backends/cpu.py passes, because building a pybind11 View object per tensor cost
// more host time than a small call's kernels. The callers keep the tensors alive during a call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <sstream>
#include <stdexcept>

#include "cpu/feature_map.h"
#include "cpu/linear_attention.h"
#include "cpu/simd.h"
#include "cpu/view.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

linattn::View make_view(std::uintptr_t data_ptr, linattn::DType dtype,
                        const std::vector<std::int64_t>& shape,
                        const std::vector<std::int64_t>& strides) {
  if (shape.size() != strides.size()) {
    throw std::invalid_argument("View: shape and strides must have the same length, got " +
                                std::to_string(shape.size()) + " and " +
                                std::to_string(strides.size()));
  }
  if (shape.empty() || shape.size() > std::size_t(linattn::kMaxRank)) {
    throw std::invalid_argument("View: rank must be 1 to 4, got " + std::to_string(shape.size()));
  }
  linattn::View view;
  view.data = reinterpret_cast<char*>(data_ptr);
  view.dtype = dtype;
  view.rank = int(shape.size());
  bool empty = false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw std::invalid_argument("View: negative size in shape");
    empty = empty || shape[i] == 0;
    view.shape[i] = shape[i];
    view.stride[i] = strides[i];
  }
  if (view.data == nullptr && !empty) {
    throw std::invalid_argument("View: null data pointer for a non-empty tensor");
  }
  return view;
}

// A tensor argument: a View, or the tuple (data_ptr, DType, shape, strides). `what` names the
// argument in the error message.
linattn::View as_view(py::handle arg, const char* what) {
  if (py::isinstance<py::tuple>(arg)) {
    const auto t = py::reinterpret_borrow<py::tuple>(arg);
    if (t.size() != 4) {
      throw std::invalid_argument(std::string(what) + ": expected a View or a tuple (data_ptr, "
                                  "dtype, shape, strides), got a tuple of " +
                                  std::to_string(t.size()));
    }
    return make_view(t[0].cast<std::uintptr_t>(), t[1].cast<linattn::DType>(),
                     t[2].cast<std::vector<std::int64_t>>(),
                     t[3].cast<std::vector<std::int64_t>>());
  }
  return arg.cast<linattn::View>();
}

std::optional<linattn::View> as_optional_view(py::handle arg, const char* what) {
  if (arg.is_none()) return std::nullopt;
  return as_view(arg, what);
}

std::vector<linattn::View> as_views(py::handle arg, const char* what) {
  std::vector<linattn::View> views;
  for (py::handle item : arg) views.push_back(as_view(item, what));
  return views;
}

// One side's norm: None, or (kind, over_heads, eps, start, stop, weight | None, bias | None)
// (NormCall of linattn/pre_attention/spec.py with its tensors as views).
linattn::NormArg as_norm_arg(py::handle arg, const char* what) {
  linattn::NormArg norm;
  if (arg.is_none()) return norm;
  const auto t = py::reinterpret_borrow<py::tuple>(arg);
  if (t.size() != 7) {
    throw std::invalid_argument(std::string(what) + ": expected None or a tuple (kind, "
                                "over_heads, eps, start, stop, weight, bias)");
  }
  norm.kind = t[0].cast<int>();
  norm.over_heads = t[1].cast<bool>();
  norm.eps = t[2].cast<double>();
  norm.start = t[3].cast<std::int64_t>();
  norm.stop = t[4].cast<std::int64_t>();
  norm.weight = as_optional_view(t[5], what);
  norm.bias = as_optional_view(t[6], what);
  return norm;
}

// The pre-attention work of a call (PreArgs): None, or the tuple (q_norm, k_norm, rope,
// q_stats | None, k_stats | None), rope None or (style, start, cos, sin); linattn/backends/cpu.py
// builds it. Plain tuples for the reason tensors cross as tuples (the module docstring).
linattn::PreArgs as_pre_args(py::handle arg) {
  linattn::PreArgs pre;
  if (arg.is_none()) return pre;
  const auto t = py::reinterpret_borrow<py::tuple>(arg);
  if (t.size() != 5) {
    throw std::invalid_argument("pre: expected None or a tuple (q_norm, k_norm, rope, q_stats, "
                                "k_stats)");
  }
  pre.q_norm = as_norm_arg(t[0], "pre.q_norm");
  pre.k_norm = as_norm_arg(t[1], "pre.k_norm");
  if (!t[2].is_none()) {
    const auto rope = py::reinterpret_borrow<py::tuple>(t[2]);
    if (rope.size() != 4) {
      throw std::invalid_argument("pre.rope: expected None or a tuple (style, start, cos, sin)");
    }
    pre.rope.style = rope[0].cast<int>();
    pre.rope.start = rope[1].cast<std::int64_t>();
    pre.rope.cos = as_view(rope[2], "pre.rope.cos");
    pre.rope.sin = as_view(rope[3], "pre.rope.sin");
  }
  pre.q_stats = as_optional_view(t[3], "pre.q_stats");
  pre.k_stats = as_optional_view(t[4], "pre.k_stats");
  return pre;
}

std::string view_repr(const linattn::View& v) {
  std::ostringstream out;
  out << "View(" << v.describe() << ", strides (";
  for (int i = 0; i < v.rank; ++i) out << (i ? ", " : "") << v.stride[i];
  out << "))";
  return out.str();
}

py::dict build_info() {
  py::dict info;
  info["openmp"] = _OPENMP;
  info["vector_bytes"] = linattn::kVecBytes;
#ifdef LINATTN_NATIVE_ARCH
  info["native_arch"] = true;
#else
  info["native_arch"] = false;
#endif
#if defined(__FLT16_MAX__)
  info["native_float16"] = true;
#else
  info["native_float16"] = false;
#endif
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  info["fma"] = true;
#else
  info["fma"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "linattn's native kernels. Tensors are passed as View(data_ptr, dtype, shape, "
            "strides); see linattn/backends/cpu.py.";

  py::enum_<linattn::DType>(m, "DType")
      .value("float16", linattn::DType::float16)
      .value("bfloat16", linattn::DType::bfloat16)
      .value("float32", linattn::DType::float32)
      .value("float64", linattn::DType::float64)
      .value("bool", linattn::DType::bool8);

  py::class_<linattn::View>(m, "View")
      .def(py::init(&make_view), "data_ptr"_a, "dtype"_a, "shape"_a, "strides"_a,
           "A tensor's memory: data pointer, dtype code, shape and strides (in elements).")
      .def_property_readonly("dtype", [](const linattn::View& v) { return v.dtype; })
      .def_property_readonly("shape", [](const linattn::View& v) {
        return std::vector<std::int64_t>(v.shape, v.shape + v.rank);
      })
      .def_property_readonly("strides", [](const linattn::View& v) {
        return std::vector<std::int64_t>(v.stride, v.stride + v.rank);
      })
      .def("__repr__", &view_repr);

  // Arguments are converted with the GIL held; the kernels run without it.
  m.def(
      "cpu_forward",
      [](py::handle q, py::handle k, py::handle v, py::handle key_mask, const std::string& q_map,
         py::handle q_params, const std::string& k_map, py::handle k_params, double eps,
         py::handle o, py::handle state, py::handle normaliser, int num_threads, py::handle pre) {
        linattn::ForwardArgs args{as_view(q, "q"), as_view(k, "k"), as_view(v, "v"),
                                  as_optional_view(key_mask, "key_mask"),
                                  {q_map, as_views(q_params, "q_params")},
                                  {k_map, as_views(k_params, "k_params")}, eps,
                                  as_view(o, "o"), as_view(state, "state"),
                                  as_view(normaliser, "normaliser"), num_threads,
                                  as_pre_args(pre)};
        py::gil_scoped_release release;
        linattn::cpu_forward(args);
      },
      "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a, "k_params"_a,
      "eps"_a, "o"_a, "state"_a, "normaliser"_a, "num_threads"_a, "pre"_a = py::none(),
      "Fills o (B, Nq, H, Dv), state S (B, H, D', Dv) and normaliser z (B, H, D'), and the "
      "statistics of q/k norms over all heads (pre's q_stats, k_stats).");

  m.def(
      "cpu_backward",
      [](py::handle grad_out, py::handle q, py::handle k, py::handle v, py::handle key_mask,
         const std::string& q_map, py::handle q_params, const std::string& k_map,
         py::handle k_params, double eps, py::handle state, py::handle normaliser,
         py::handle dq, py::handle dk, py::handle dv, py::handle d_q_params,
         py::handle d_k_params, int num_threads, py::handle pre, py::handle d_q_norm_weight,
         py::handle d_q_norm_bias, py::handle d_k_norm_weight, py::handle d_k_norm_bias) {
        linattn::BackwardArgs args{as_view(grad_out, "grad_out"), as_view(q, "q"),
                                   as_view(k, "k"), as_view(v, "v"),
                                   as_optional_view(key_mask, "key_mask"),
                                   {q_map, as_views(q_params, "q_params")},
                                   {k_map, as_views(k_params, "k_params")}, eps,
                                   as_view(state, "state"), as_view(normaliser, "normaliser"),
                                   as_view(dq, "dq"), as_view(dk, "dk"), as_view(dv, "dv"),
                                   as_views(d_q_params, "d_q_params"),
                                   as_views(d_k_params, "d_k_params"), num_threads,
                                   as_pre_args(pre),
                                   as_optional_view(d_q_norm_weight, "d_q_norm_weight"),
                                   as_optional_view(d_q_norm_bias, "d_q_norm_bias"),
                                   as_optional_view(d_k_norm_weight, "d_k_norm_weight"),
                                   as_optional_view(d_k_norm_bias, "d_k_norm_bias")};
        py::gil_scoped_release release;
        linattn::cpu_backward(args);
      },
      "grad_out"_a, "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a,
      "k_params"_a, "eps"_a, "state"_a, "normaliser"_a, "dq"_a, "dk"_a, "dv"_a, "d_q_params"_a,
      "d_k_params"_a, "num_threads"_a, "pre"_a = py::none(),
      "d_q_norm_weight"_a = py::none(), "d_q_norm_bias"_a = py::none(),
      "d_k_norm_weight"_a = py::none(), "d_k_norm_bias"_a = py::none(),
      "Fills dq, dk, dv, the maps' parameter gradients and the q/k norms' weight and bias "
      "gradients from grad_out and forward's S, z (and pre's norm statistics).");

  // The phases (linear_attention.h), for context parallelism.
  m.def(
      "cpu_forward_state",
      [](py::handle k, py::handle v, py::handle key_mask, const std::string& k_map,
         py::handle k_params, py::handle state, py::handle normaliser, int num_threads,
         py::handle pre) {
        linattn::StateArgs args{as_view(k, "k"), as_view(v, "v"),
                                as_optional_view(key_mask, "key_mask"),
                                {k_map, as_views(k_params, "k_params")}, as_view(state, "state"),
                                as_view(normaliser, "normaliser"), num_threads,
                                as_pre_args(pre)};
        py::gil_scoped_release release;
        linattn::cpu_forward_state(args);
      },
      "k"_a, "v"_a, "key_mask"_a, "k_map"_a, "k_params"_a, "state"_a, "normaliser"_a,
      "num_threads"_a, "pre"_a = py::none(),
      "Fills state S (B, H, D', Dv) and normaliser z (B, H, D') from k, v (with pre's k norm "
      "and RoPE applied to k, writing pre's k_stats).");

  m.def(
      "cpu_forward_output",
      [](py::handle q, const std::string& q_map, py::handle q_params, double eps,
         py::handle state, py::handle normaliser, py::handle o, int num_threads,
         py::handle pre) {
        linattn::OutputArgs args{as_view(q, "q"), {q_map, as_views(q_params, "q_params")}, eps,
                                 as_view(state, "state"), as_view(normaliser, "normaliser"),
                                 as_view(o, "o"), num_threads, as_pre_args(pre)};
        py::gil_scoped_release release;
        linattn::cpu_forward_output(args);
      },
      "q"_a, "q_map"_a, "q_params"_a, "eps"_a, "state"_a, "normaliser"_a, "o"_a,
      "num_threads"_a, "pre"_a = py::none(),
      "Fills o (B, Nq, H, Dv) from q and a given S, z (with pre's q norm and RoPE applied to q, "
      "writing pre's q_stats).");

  m.def(
      "cpu_backward_queries",
      [](py::handle grad_out, py::handle q, const std::string& q_map, py::handle q_params,
         double eps, py::handle state, py::handle normaliser, py::handle dq, py::handle d_state,
         py::handle d_normaliser, py::handle d_q_params, int num_threads, py::handle pre,
         py::handle d_norm_weight, py::handle d_norm_bias) {
        linattn::QueryGradArgs args{as_view(grad_out, "grad_out"), as_view(q, "q"),
                                    {q_map, as_views(q_params, "q_params")}, eps,
                                    as_view(state, "state"), as_view(normaliser, "normaliser"),
                                    as_view(dq, "dq"), as_view(d_state, "d_state"),
                                    as_view(d_normaliser, "d_normaliser"),
                                    as_views(d_q_params, "d_q_params"), num_threads,
                                    as_pre_args(pre),
                                    as_optional_view(d_norm_weight, "d_norm_weight"),
                                    as_optional_view(d_norm_bias, "d_norm_bias")};
        py::gil_scoped_release release;
        linattn::cpu_backward_queries(args);
      },
      "grad_out"_a, "q"_a, "q_map"_a, "q_params"_a, "eps"_a, "state"_a, "normaliser"_a, "dq"_a,
      "d_state"_a, "d_normaliser"_a, "d_q_params"_a, "num_threads"_a, "pre"_a = py::none(),
      "d_norm_weight"_a = py::none(), "d_norm_bias"_a = py::none(),
      "Fills dq, these queries' dS, dz, the q map's parameter gradients and the q norm's weight "
      "and bias gradients (with pre's q norm and RoPE, reading pre's q_stats).");

  m.def(
      "cpu_backward_keys",
      [](py::handle k, py::handle v, py::handle key_mask, const std::string& k_map,
         py::handle k_params, py::handle d_state, py::handle d_normaliser, py::handle dk,
         py::handle dv, py::handle d_k_params, int num_threads, py::handle pre,
         py::handle d_norm_weight, py::handle d_norm_bias) {
        linattn::KeyGradArgs args{as_view(k, "k"), as_view(v, "v"),
                                  as_optional_view(key_mask, "key_mask"),
                                  {k_map, as_views(k_params, "k_params")},
                                  as_view(d_state, "d_state"),
                                  as_view(d_normaliser, "d_normaliser"), as_view(dk, "dk"),
                                  as_view(dv, "dv"), as_views(d_k_params, "d_k_params"),
                                  num_threads, as_pre_args(pre),
                                  as_optional_view(d_norm_weight, "d_norm_weight"),
                                  as_optional_view(d_norm_bias, "d_norm_bias")};
        py::gil_scoped_release release;
        linattn::cpu_backward_keys(args);
      },
      "k"_a, "v"_a, "key_mask"_a, "k_map"_a, "k_params"_a, "d_state"_a, "d_normaliser"_a,
      "dk"_a, "dv"_a, "d_k_params"_a, "num_threads"_a, "pre"_a = py::none(),
      "d_norm_weight"_a = py::none(), "d_norm_bias"_a = py::none(),
      "Fills dk, dv, the k map's parameter gradients and the k norm's weight and bias gradients "
      "from a given dS, dz (with pre's k norm and RoPE, reading pre's k_stats).");

  m.def("cpu_feature_maps", &linattn::fused_feature_maps,
        "Names of the feature maps the CPU kernels fuse.");
  m.def("build_info", &build_info, "How this module was compiled.");
}
