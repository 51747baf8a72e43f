// The Python extension module qpeft._C. Importing it runs the TORCH_LIBRARY registrations of this shared
// library (schema.cpp, cpu_ops.cpp, cuda_ops.cpp); the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include <string>

#include "../kernels/cpu/cpu_isa.h"
#include "../kernels/cpu/quant_cpu.h"
#include "../kernels/dropout_rng.h"
#include "matmul_4bit_cpu.h"
#include "op_args.h"

#ifndef QPEFT_CUDA_ARCHS
#define QPEFT_CUDA_ARCHS ""
#endif
#ifndef QPEFT_VERSION
#define QPEFT_VERSION "0.0.0"
#endif
#ifndef QPEFT_TORCH_VERSION
#define QPEFT_TORCH_VERSION ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "qpeft compiled kernels (ops are registered under torch.ops.qpeft)";
  m.def("_set_reciprocal_table", [](py::bytes table) {
    const std::string data = table;
    qpeft::cpu::set_reciprocal_table(reinterpret_cast<const uint8_t*>(data.data()), static_cast<int64_t>(data.size()));
  });
  m.def("_set_cuda_lora_tensor_cores", &qpeft::ops::set_cuda_lora_tensor_cores);
  m.def("_cuda_lora_tensor_cores", &qpeft::ops::cuda_lora_tensor_cores);
  m.attr("MAX_DROPOUT_P") = qpeft::kMaxDropoutP;
  py::tuple levels(qpeft::cpu::kCpuIsaCount);
  for (int i = 0; i < qpeft::cpu::kCpuIsaCount; ++i)
    levels[i] = qpeft::cpu::cpu_isa_name(static_cast<qpeft::cpu::CpuIsa>(i));
  m.attr("CPU_ISA_LEVELS") = levels;
  m.def("_cpu_isa", []() { return std::string(qpeft::cpu::cpu_isa_name(qpeft::cpu::cpu_isa())); });
  m.def("_detected_cpu_isa", []() { return std::string(qpeft::cpu::cpu_isa_name(qpeft::cpu::detected_cpu_isa())); });
  m.def("_set_cpu_isa_cap", [](const std::string& name) {
    qpeft::cpu::CpuIsa cap;
    if (!qpeft::cpu::parse_cpu_isa(name.c_str(), &cap)) throw py::value_error("qpeft: unknown CPU level " + name);
    return std::string(qpeft::cpu::cpu_isa_name(qpeft::cpu::set_cpu_isa_cap(cap)));
  });
  m.def("_cpu_linear_4bit_path", [](int64_t M, int64_t K, bool bf16) {
    return qpeft::ops::linear_4bit_cpu_path(M, K, bf16 ? at::kBFloat16 : at::kFloat);
  });
  m.def("build_info", []() {
    py::dict info;
    info["version"] = QPEFT_VERSION;
    info["torch"] = QPEFT_TORCH_VERSION;  // the torch the extension was compiled against
#ifdef QPEFT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(QPEFT_CUDA_ARCHS);
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = std::string("unknown");
#endif
    return info;
  });
}
