// pyco._C_cuda: the CUDA kernels' module, separate from pyco._C so that `import pyco` never depends on a
// CUDA driver (cudart is linked statically and loads the driver on first use). Converts Python arguments
// into csrc/cuda/launch.h's plain structs; no math here. The hyper-parameter classes (SgdHyper, AdamHyper)
// are pyco._C's: pybind11 shares registered types between modules.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/multi_tensor.h"
#include "cuda/launch.h"

namespace py = pybind11;
using namespace pyco;

namespace {

std::pair<const TensorRecord*, int64_t> records_from(const py::buffer& table) {
  py::buffer_info info = table.request();
  if (info.itemsize != sizeof(int64_t) || info.ndim != 1 || info.strides[0] != 8)
    throw KernelError("tensor table must be a contiguous 1-d buffer of int64");
  if (info.size % kRecordFields != 0)
    throw KernelError("tensor table length " + std::to_string(info.size) + " is not a multiple of " +
                      std::to_string(kRecordFields));
  return {static_cast<const TensorRecord*>(info.ptr), info.size / kRecordFields};
}

py::bytes as_bytes(const void* data, size_t n) { return py::bytes(static_cast<const char*>(data), n); }

// The plan of a table for one rule, checked against that rule's needs (state slots, step counters).
template <typename Hyper>
py::tuple plan(const py::buffer& table, const std::vector<Hyper>& hypers, int64_t num_blocks, const char* rule,
               cpu::RecordNeeds (*needs_of)(const Hyper&), bool step_counters) {
  auto [recs, n] = records_from(table);
  std::vector<cpu::RecordNeeds> needs;
  for (const Hyper& h : hypers) needs.push_back(needs_of(h));
  cpu::check_records(recs, n, static_cast<int64_t>(hypers.size()), LaunchOptions{}, rule, needs);
  int64_t num_chunks = 0, dtypes = 0;
  const std::vector<int64_t> words = cuda::make_plan(recs, n, static_cast<int64_t>(hypers.size()), num_blocks,
                                                     step_counters, num_chunks, dtypes);
  return py::make_tuple(as_bytes(words.data(), words.size() * sizeof(int64_t)), num_chunks, dtypes);
}

cpu::RecordNeeds sgd_needs(const SgdHyper& h) { return {h.momentum != 0.0, false, false, false}; }
cpu::RecordNeeds adam_needs(const AdamHyper& h) { return {true, true, h.amsgrad, true}; }

// Per-group device structs: the host hyper-parameters plus where each group's lr is read from.
template <typename Params, typename Hyper>
py::bytes pack(const std::vector<Hyper>& hypers, const std::vector<int64_t>& lr_addresses,
               const std::vector<int32_t>& lr_dtypes) {
  if (lr_addresses.size() != hypers.size() || lr_dtypes.size() != hypers.size())
    throw KernelError("one lr address and dtype per param group expected");
  std::vector<Params> params(hypers.size());
  for (size_t g = 0; g < hypers.size(); ++g) {
    if (lr_addresses[g] && lr_dtypes[g] != kF32 && lr_dtypes[g] != kF64)
      throw KernelError("a device learning rate must be float32 or float64");
    params[g].hyper = hypers[g];
    params[g].lr = {lr_addresses[g], lr_dtypes[g]};
  }
  return as_bytes(params.data(), params.size() * sizeof(Params));
}

cuda::Launch make_launch(int64_t plan, int64_t num_records, int64_t num_chunks, int64_t num_blocks, int64_t dtypes,
                         int64_t params, int64_t num_groups, int64_t grad_scale, double grad_scale_value,
                         int64_t found_inf, int64_t partials, int64_t stats, int device, int64_t stream) {
  cuda::Launch L;
  L.plan = plan;
  L.num_records = num_records;
  L.num_chunks = num_chunks;
  L.num_blocks = num_blocks;
  L.dtypes = dtypes;
  L.params = params;
  L.num_groups = num_groups;
  L.grad_scale = grad_scale;
  L.grad_scale_value = grad_scale_value;
  L.found_inf = found_inf;
  L.partials = partials;
  L.stats = stats;
  L.device = device;
  L.stream = stream;
  return L;
}

#define PYCO_LAUNCH_ARGS                                                                                   \
  py::kw_only(), py::arg("plan"), py::arg("num_records"), py::arg("num_chunks"), py::arg("num_blocks"),    \
      py::arg("dtypes"), py::arg("params"), py::arg("num_groups"), py::arg("grad_scale") = 0, py::arg("grad_scale_value") = 1.0, \
      py::arg("found_inf") = 0, py::arg("partials") = 0, py::arg("stats") = 0, py::arg("device"),          \
      py::arg("stream")

template <void (*Step)(const cuda::Launch&)>
void bind_step(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](int64_t plan, int64_t num_records, int64_t num_chunks, int64_t num_blocks, int64_t dtypes, int64_t params,
         int64_t num_groups, int64_t grad_scale, double grad_scale_value, int64_t found_inf, int64_t partials,
         int64_t stats, int device, int64_t stream) {
        Step(make_launch(plan, num_records, num_chunks, num_blocks, dtypes, params, num_groups, grad_scale,
                         grad_scale_value, found_inf, partials, stats, device, stream));
      },
      PYCO_LAUNCH_ARGS, doc);
}

void flag_nonfinite(int64_t flag, int64_t plan, int64_t num_records, int64_t num_chunks, int64_t num_blocks, int device,
                    int64_t stream) {
  cuda::flag_nonfinite(
      make_launch(plan, num_records, num_chunks, num_blocks, 0, 0, 0, 0, 1.0, 0, 0, 0, device, stream), flag);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyco's CUDA kernels. Internal: use pyco.optim; the buffers' layout is in csrc/cuda/launch.h.";
  // pyco._C registers SgdHyper, AdamHyper and the translation of KernelError (to pyco._C.KernelError, a
  // ValueError: invalid arguments), which pybind11 applies to this module's functions too. Failures of the
  // CUDA runtime or driver are CudaError, a RuntimeError.
  m.attr("KernelError") = py::module_::import("pyco._C").attr("KernelError");
  py::register_exception<cuda::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def(
      "sgd_plan",
      [](const py::buffer& table, const std::vector<SgdHyper>& hypers, int64_t num_blocks) {
        return plan(table, hypers, num_blocks, "sgd", &sgd_needs, false);
      },
      py::arg("table"), py::arg("hypers"), py::kw_only(), py::arg("num_blocks"),
      "(plan bytes, number of chunks, dtype mask) of an SGD tensor table: records sorted by block, chunk and "
      "block starts.");
  m.def(
      "adam_plan",
      [](const py::buffer& table, const std::vector<AdamHyper>& hypers, int64_t num_blocks) {
        return plan(table, hypers, num_blocks, "adam", &adam_needs, true);
      },
      py::arg("table"), py::arg("hypers"), py::kw_only(), py::arg("num_blocks"),
      "(plan bytes, number of chunks, dtype mask) of an Adam tensor table: records sorted by block, chunk and "
      "block starts.");
  m.def("sgd_params", &pack<cuda::SgdParams, SgdHyper>, py::arg("hypers"), py::kw_only(), py::arg("lr_addresses"),
        py::arg("lr_dtypes"), "Per-group device structs of SGD (bytes): hyper-parameters and lr source.");
  m.def("adam_params", &pack<cuda::AdamParams, AdamHyper>, py::arg("hypers"), py::kw_only(),
        py::arg("lr_addresses"), py::arg("lr_dtypes"),
        "Per-group device structs of Adam (bytes): hyper-parameters and lr source.");
  m.def(
      "upload",
      [](int64_t dst, const py::buffer& data, int device, int64_t stream) {
        py::buffer_info info = data.request();
        cuda::upload(dst, info.ptr, static_cast<size_t>(info.size * info.itemsize), device, stream);
      },
      py::arg("dst"), py::arg("data"), py::kw_only(), py::arg("device"), py::arg("stream"),
      "Asynchronous host-to-device copy of a bytes-like object on `stream`, through pinned staging memory.");

  bind_step<&cuda::sgd_step>(m, "sgd_step",
                             "SGD update of every tensor of the plan on `stream`, statistics into `stats`.");
  bind_step<&cuda::adam_step>(m, "adam_step",
                              "Adam/AdamW update of every tensor of the plan on `stream`, statistics into `stats`.");
  m.def("flag_nonfinite", &flag_nonfinite, py::kw_only(), py::arg("flag"), py::arg("plan"), py::arg("num_records"),
        py::arg("num_chunks"), py::arg("num_blocks"), py::arg("device"), py::arg("stream"),
        "Stores 1.0 into the float32 `flag` when any gradient of the plan is inf or NaN.");
  m.def(
      "staging_stats",
      [] {
        const cuda::StagingCounters c = cuda::staging_counters();
        return py::dict(py::arg("buffers") = c.buffers, py::arg("bytes") = c.bytes, py::arg("captured") = c.captured,
                        py::arg("captured_bytes") = c.captured_bytes, py::arg("allocations") = c.allocations,
                        py::arg("frees") = c.frees, py::arg("waits") = c.waits, py::arg("max_buffers") = c.max_buffers,
                        py::arg("max_bytes") = c.max_bytes);
      },
      "The pinned staging pool of upload(): buffers and bytes held, buffers kept for captured graphs, "
      "allocations, frees, uploads that waited for the device, and the limits.");
  m.def("set_staging_limits", &cuda::set_staging_limits, py::arg("max_buffers"), py::arg("max_bytes"),
        "Limits of the pinned staging pool; returns the previous (max_buffers, max_bytes).");
  m.def("stream_is_capturing", &cuda::stream_is_capturing, py::arg("device"), py::arg("stream"));
  m.def(
      "check_device",
      [](int device) {
#ifdef PYCO_CUDA_ARCHITECTURES
        cuda::check_device(device, PYCO_CUDA_ARCHITECTURES);
#else
        cuda::check_device(device, "(unknown)");
#endif
      },
      py::arg("device"),
      "Raises CudaError (a RuntimeError saying what to install) unless the NVIDIA driver can run this build's "
      "kernels on `device`: driver new enough for the CUDA runtime pyco was built with, the device present, "
      "a kernel image for its architecture.");
  m.def(
      "driver_problem",
      [](int driver_version, int runtime_version, int device_count, int device, const std::string& count_error,
         const std::string& kernel_module) {
        cuda::DriverFacts f;
        f.driver_version = driver_version;
        f.runtime_version = runtime_version;
        f.device_count = device_count;
        f.count_error = count_error;
        f.kernel_module = kernel_module;
        return cuda::driver_problem(f, device);
      },
      py::kw_only(), py::arg("driver_version"), py::arg("runtime_version"), py::arg("device_count"),
      py::arg("device") = 0, py::arg("count_error") = "", py::arg("kernel_module") = "",
      "check_device's verdict on given facts: '' when usable, else the error message.");
  m.def(
      "driver_facts",
      [] {
        const cuda::DriverFacts f = cuda::driver_facts();
        return py::dict(py::arg("driver_version") = f.driver_version, py::arg("runtime_version") = f.runtime_version,
                        py::arg("device_count") = f.device_count, py::arg("count_error") = f.count_error,
                        py::arg("kernel_module") = f.kernel_module,
                        py::arg("minimum_driver") = cuda::minimum_driver(f.runtime_version / 1000));
      },
      "What check_device reads: the driver's and the runtime's CUDA versions, the device count (and its "
      "error), the NVIDIA kernel module's version, the oldest driver this build's runtime accepts.");
  m.def("device_count", &cuda::device_count, "CUDA devices this module's runtime sees (0 without a driver).");

  m.attr("CHUNK_ELEMS") = cuda::kChunkElems;
  // SGD's device init flag (a record flag, csrc/common.h) and the dtype-mask bit of plans that hold one.
  m.attr("FLAG_MOMENTUM_INIT_FLAG") = kFlagMomentumInitFlag;
  m.attr("PLAN_INIT_FLAGS") = cuda::kPlanInitFlags;
  m.attr("PARAMS_BYTES") = py::dict(py::arg("sgd") = sizeof(cuda::SgdParams), py::arg("adam") = sizeof(cuda::AdamParams));
#ifdef PYCO_CUDA_ARCHITECTURES
  m.attr("ARCHITECTURES") = PYCO_CUDA_ARCHITECTURES;
#endif
#ifdef PYCO_CUDA_VERSION
  m.attr("CUDA_VERSION") = PYCO_CUDA_VERSION;
#endif
}
