// The only PYBIND11_MODULE: converts Python arguments into the kernels' plain structs. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>
#include <vector>

#include "kernels.h"
#include "launch_plan.h"
#include "cpu/multi_tensor.h"

namespace py = pybind11;
using namespace pyco;

namespace {

// A tensor table arrives as any contiguous int64 buffer (Python's array('q')) of kRecordFields per tensor.
std::pair<const TensorRecord*, int64_t> records_from(const py::buffer& table) {
  py::buffer_info info = table.request();
  if (info.itemsize != sizeof(int64_t) || info.ndim != 1 || (info.ndim == 1 && info.strides[0] != 8))
    throw KernelError("tensor table must be a contiguous 1-d buffer of int64");
  if (info.size % kRecordFields != 0)
    throw KernelError("tensor table length " + std::to_string(info.size) + " is not a multiple of " +
                      std::to_string(kRecordFields));
  return {static_cast<const TensorRecord*>(info.ptr), info.size / kRecordFields};
}

LaunchOptions launch_options(double grad_scale, uintptr_t stats, int64_t num_blocks, int num_threads) {
  if (!(grad_scale > 0.0)) throw KernelError("grad_scale must be > 0, got " + std::to_string(grad_scale));
  if (num_threads < 1) throw KernelError("num_threads must be >= 1");
  LaunchOptions opt;
  opt.grad_scale = grad_scale;
  opt.stats = reinterpret_cast<double*>(stats);
  opt.num_blocks = num_blocks;
  opt.num_threads = num_threads;
  return opt;
}

template <typename Hyper, void (*Step)(const TensorRecord*, int64_t, const Hyper*, int64_t, const LaunchOptions&)>
void bind_step(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](const py::buffer& table, const std::vector<Hyper>& hypers, double grad_scale, uintptr_t stats,
         int64_t num_blocks, int num_threads) {
        auto [recs, n] = records_from(table);
        const LaunchOptions opt = launch_options(grad_scale, stats, num_blocks, num_threads);
        py::gil_scoped_release release;
        Step(recs, n, hypers.data(), static_cast<int64_t>(hypers.size()), opt);
      },
      py::arg("table"), py::arg("hypers"), py::kw_only(), py::arg("grad_scale") = 1.0,
      py::arg("stats") = 0, py::arg("num_blocks") = 0,
      py::arg("num_threads") = 1, doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyco's CPU kernels. Internal: use pyco.optim; the tensor-table layout is in csrc/common.h.";
  py::register_exception<KernelError>(m, "KernelError", PyExc_ValueError);

  py::class_<SgdHyper>(m, "SgdHyper")
      .def(py::init([](double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                       bool maximize) { return SgdHyper{lr, momentum, dampening, weight_decay, nesterov, maximize}; }),
           py::kw_only(), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
           py::arg("nesterov"), py::arg("maximize"));
  py::class_<AdamHyper>(m, "AdamHyper")
      .def(py::init([](double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                       bool maximize, bool decoupled_weight_decay) {
             return AdamHyper{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay};
           }),
           py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"));

  bind_step<SgdHyper, &cpu::sgd_step>(m, "sgd_step",
                                      "SGD update of every tensor in the table, statistics into `stats`.");
  bind_step<AdamHyper, &cpu::adam_step>(m, "adam_step",
                                        "Adam/AdamW update of every tensor in the table, statistics into `stats`.");
  m.def(
      "grads_all_finite",
      [](const py::buffer& table, int num_threads) {
        auto [recs, n] = records_from(table);
        py::gil_scoped_release release;
        return cpu::grads_all_finite(recs, n, std::max(1, num_threads));
      },
      py::arg("table"), py::kw_only(), py::arg("num_threads") = 1,
      "True when every gradient in the table is finite.");

  m.def(
      "stream_add",
      [](uintptr_t a, uintptr_t b, int64_t n, int num_threads) {
        py::gil_scoped_release release;
        cpu::stream_add(reinterpret_cast<float*>(a), reinterpret_cast<const float*>(b), n, std::max(1, num_threads));
      },
      py::arg("a"), py::arg("b"), py::arg("n"), py::kw_only(), py::arg("num_threads") = 1,
      "a[i] += b[i] over two contiguous float32 buffers (addresses): the benchmarks' memory-bandwidth probe.");

  m.def(
      "block_dot",
      [](uintptr_t rows, uintptr_t delta, int32_t dtype, int64_t num_rows, uintptr_t offsets, int64_t num_blocks,
         uintptr_t out, int num_threads) {
        py::gil_scoped_release release;
        cpu::block_dot(reinterpret_cast<const void*>(rows), reinterpret_cast<const void*>(delta), dtype, num_rows,
                       reinterpret_cast<const int64_t*>(offsets), num_blocks, reinterpret_cast<double*>(out),
                       std::max(1, num_threads));
      },
      py::arg("rows"), py::arg("delta"), py::arg("dtype"), py::arg("num_rows"), py::arg("offsets"),
      py::arg("num_blocks"), py::arg("out"), py::kw_only(), py::arg("num_threads") = 1,
      "Segmented dot products out[j, i] = sum over block i of delta * rows[j] (addresses of contiguous buffers: "
      "rows [num_rows, N], delta [N], int64 offsets [num_blocks + 1], float64 out [num_rows, num_blocks]).");

  bind_launch_plan(m);

  m.attr("RECORD_FIELDS") = kRecordFields;
  m.attr("FLAG_FRESH_MOMENTUM") = kFlagFreshMomentum;
  m.attr("FLAG_MOMENTUM_INIT") = kFlagMomentumInitFlag;
  m.attr("CHUNK_ELEMS") = cpu::kChunkElems;
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(kF32), py::arg("float64") = int(kF64),
                                   py::arg("float16") = int(kF16), py::arg("bfloat16") = int(kBF16));
  m.attr("HARDWARE_THREADS") = std::thread::hardware_concurrency();
  m.attr("KERNEL_ISA") = cpu::kernel_isa();
#ifdef PYCO_COMPILER_ID
  m.attr("COMPILER") = PYCO_COMPILER_ID;
#endif
#ifdef PYCO_CUDA_COMPILER
  m.attr("CUDA_COMPILER") = PYCO_CUDA_COMPILER;  // found at build time ("" if none); kernels: pyco._C_cuda
#endif
}
