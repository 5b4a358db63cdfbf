// The Python module linattn._C.
//
// It does not compile against torch: Python describes each tensor as a View (data pointer,
// dtype code, shape, strides in elements), so one build works with every torch version.
// linattn/backends/cpu.py builds the views; the callers keep the tensors alive during a call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <sstream>
#include <stdexcept>

#include "cpu/feature_map.h"
#include "cpu/linear_attention.h"
#include "cpu/simd.h"
#include "cpu/view.h"

#ifndef LINATTN_HAS_CUDA_KERNELS
#define LINATTN_HAS_CUDA_KERNELS 0
#endif

#if LINATTN_HAS_CUDA_KERNELS
// Defined by the CUDA sources (csrc/cuda/*.cu) when CMake compiled them: adds their functions.
void register_cuda_kernels(pybind11::module_& m);
#endif

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

  m.def(
      "cpu_forward",
      [](const linattn::View& q, const linattn::View& k, const linattn::View& v,
         std::optional<linattn::View> key_mask, const std::string& q_map,
         const std::vector<linattn::View>& q_params, const std::string& k_map,
         const std::vector<linattn::View>& k_params, double eps, const linattn::View& o,
         const linattn::View& state, const linattn::View& normaliser, int num_threads) {
        linattn::ForwardArgs args{q, k, v, key_mask, {q_map, q_params}, {k_map, k_params},
                                  eps, o, state, normaliser, num_threads};
        linattn::cpu_forward(args);
      },
      "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a, "k_params"_a,
      "eps"_a, "o"_a, "state"_a, "normaliser"_a, "num_threads"_a,
      py::call_guard<py::gil_scoped_release>(),
      "Fills o (B, Nq, H, Dv), state S (B, H, D', Dv) and normaliser z (B, H, D').");

  m.def(
      "cpu_backward",
      [](const linattn::View& grad_out, const linattn::View& q, const linattn::View& k,
         const linattn::View& v, std::optional<linattn::View> key_mask, const std::string& q_map,
         const std::vector<linattn::View>& q_params, const std::string& k_map,
         const std::vector<linattn::View>& k_params, double eps, const linattn::View& state,
         const linattn::View& normaliser, const linattn::View& dq, const linattn::View& dk,
         const linattn::View& dv, const std::vector<linattn::View>& d_q_params,
         const std::vector<linattn::View>& d_k_params, int num_threads) {
        linattn::BackwardArgs args{grad_out, q, k, v, key_mask, {q_map, q_params},
                                   {k_map, k_params}, eps, state, normaliser, dq, dk, dv,
                                   d_q_params, d_k_params, num_threads};
        linattn::cpu_backward(args);
      },
      "grad_out"_a, "q"_a, "k"_a, "v"_a, "key_mask"_a, "q_map"_a, "q_params"_a, "k_map"_a,
      "k_params"_a, "eps"_a, "state"_a, "normaliser"_a, "dq"_a, "dk"_a, "dv"_a, "d_q_params"_a,
      "d_k_params"_a, "num_threads"_a, py::call_guard<py::gil_scoped_release>(),
      "Fills dq, dk, dv and the maps' parameter gradients from grad_out and forward's S, z.");

  m.def("cpu_feature_maps", &linattn::fused_feature_maps,
        "Names of the feature maps the CPU kernels fuse.");
  m.def("build_info", &build_info, "How this module was compiled.");
  m.attr("has_cuda_kernels") = bool(LINATTN_HAS_CUDA_KERNELS);
#if LINATTN_HAS_CUDA_KERNELS
  register_cuda_kernels(m);
#endif
}
