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
         py::handle o, py::handle state, py::handle normaliser, int num_threads) {
        linattn::ForwardArgs args{as_view(q, "q"), as_view(k, "k"), as_view(v, "v"),
                                  as_optional_view(key_mask, "key_mask"),
                                  {q_map, as_views(q_params, "q_params")},
                                  {k_map, as_views(k_params, "k_params")}, eps,
                                  as_view(o, "o"), as_view(state, "state"),
                                  as_view(normaliser, "normaliser"), num_threads};
        py::gil_scoped_release release;
        linattn::cpu_forward(args);
      },
      "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a, "k_params"_a,
      "eps"_a, "o"_a, "state"_a, "normaliser"_a, "num_threads"_a,
      "Fills o (B, Nq, H, Dv), state S (B, H, D', Dv) and normaliser z (B, H, D').");

  m.def(
      "cpu_backward",
      [](py::handle grad_out, py::handle q, py::handle k, py::handle v, py::handle key_mask,
         const std::string& q_map, py::handle q_params, const std::string& k_map,
         py::handle k_params, double eps, py::handle state, py::handle normaliser,
         py::handle dq, py::handle dk, py::handle dv, py::handle d_q_params,
         py::handle d_k_params, int num_threads) {
        linattn::BackwardArgs args{as_view(grad_out, "grad_out"), as_view(q, "q"),
                                   as_view(k, "k"), as_view(v, "v"),
                                   as_optional_view(key_mask, "key_mask"),
                                   {q_map, as_views(q_params, "q_params")},
                                   {k_map, as_views(k_params, "k_params")}, eps,
                                   as_view(state, "state"), as_view(normaliser, "normaliser"),
                                   as_view(dq, "dq"), as_view(dk, "dk"), as_view(dv, "dv"),
                                   as_views(d_q_params, "d_q_params"),
                                   as_views(d_k_params, "d_k_params"), num_threads};
        py::gil_scoped_release release;
        linattn::cpu_backward(args);
      },
      "grad_out"_a, "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a,
      "k_params"_a, "eps"_a, "state"_a, "normaliser"_a, "dq"_a, "dk"_a, "dv"_a, "d_q_params"_a,
      "d_k_params"_a, "num_threads"_a,
      "Fills dq, dk, dv and the maps' parameter gradients from grad_out and forward's S, z.");

  m.def("cpu_feature_maps", &linattn::fused_feature_maps,
        "Names of the feature maps the CPU kernels fuse.");
  m.def("build_info", &build_info, "How this module was compiled.");
}
