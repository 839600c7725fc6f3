// The door between Python and the kernels for a step that repeats: a launch plan.
//
// The first step of an optimizer (and any step after something changed) is prepared in Python, where every
// tensor is checked with a clear error (pyco/_kernels.py, pyco/optim/_fused.py). Its table of records then
// becomes a Plan, which keeps, for every parameter, the record and references to the tensors whose
// addresses the record holds (parameter, state tensors, step counter) together with their storages. A
// later step re-checks only what can change, through the tensors' own Python methods (the Python C API;
// no torch headers):
//   - the param groups still hold the same parameters, in the same order;
//   - every gradient: present exactly where it was, and its address, numel, dtype, device, layout
//     (contiguous, or the parameter's strides) and no negation/conjugation bit: it is new every step;
//   - every kept tensor: still the object in the optimizer's state dict, at the same address, and, when
//     its version counter moved (any in-place change), the same numel, dtype, device and layout.
// Anything else sends the step back to Python (refresh returns the reason). Because the plan holds the
// storages, an address that is unchanged is memory the plan keeps alive, so no buffer it writes can have
// been freed or shrunk, even by another thread while the kernel runs with the GIL released.
#include "launch_plan.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/multi_tensor.h"
#include "kernels.h"

namespace py = pybind11;

namespace pyco {
namespace {

// torch.Tensor's own attribute and method descriptors (from torch._C.TensorBase's __dict__), called
// directly: no attribute lookup through a subclass's MRO (nn.Parameter's), which is most of a call's cost.
struct Names {
  PyObject *grad, *data_ptr, *version, *numel, *dtype, *is_contiguous, *is_neg, *is_conj, *get_device,
      *untyped_storage, *stride, *is_complex, *cdata, *tensor_cdata;
};
Names names;  // one reference each, kept for the process' lifetime; filled by the first Plan

void resolve_names() {
  if (names.grad != nullptr) return;
  py::dict d = py::module_::import("torch._C").attr("TensorBase").attr("__dict__");
  auto get = [&](const char* name) { return py::object(d[name]).release().ptr(); };
  names = Names{get("grad"),       get("data_ptr"),      get("_version"),        get("numel"),
                get("dtype"),      get("is_contiguous"), get("is_neg"),          get("is_conj"),
                get("get_device"), get("untyped_storage"), get("stride"),        py::str("is_complex").release().ptr(),
                py::str("_cdata").release().ptr(), get("_cdata")};
}

// obj.<method>(): a new reference, or nullptr with a Python error set.
inline PyObject* call0(PyObject* obj, PyObject* method) { return PyObject_Vectorcall(method, &obj, 1, nullptr); }

// obj.<attribute> through its getset descriptor: a new reference, or nullptr with a Python error set.
inline PyObject* get(PyObject* obj, PyObject* descriptor) {
  return Py_TYPE(descriptor)->tp_descr_get(descriptor, obj, reinterpret_cast<PyObject*>(Py_TYPE(obj)));
}

inline bool to_int(PyObject* r, int64_t* out) {
  if (!r) return false;
  *out = PyLong_AsLongLong(r);
  Py_DECREF(r);
  return !(*out == -1 && PyErr_Occurred());
}

inline bool call_int(PyObject* obj, PyObject* method, int64_t* out) { return to_int(call0(obj, method), out); }
inline bool attr_int(PyObject* obj, PyObject* descriptor, int64_t* out) { return to_int(get(obj, descriptor), out); }

// obj.<method>() is True; a failure is reported through ok.
inline bool call_is_true(PyObject* obj, PyObject* method, bool* ok) {
  PyObject* r = call0(obj, method);
  if (!r) {
    *ok = false;
    return false;
  }
  const bool t = r == Py_True;
  Py_DECREF(r);
  return t;
}

// The parameter's entry in the optimizer's state dict (borrowed, or nullptr), looked up with the hash that
// torch.Tensor.__hash__ returns, its id, when that is its hash: then no Python code runs.
inline PyObject* state_of(PyObject* state, PyObject* param, bool hash_is_id) {
#if PY_VERSION_HEX < 0x030E0000
  if (hash_is_id)
    return _PyDict_GetItem_KnownHash(state, param, static_cast<Py_hash_t>(reinterpret_cast<intptr_t>(param)));
#endif
  (void)hash_is_id;
  return PyDict_GetItemWithError(state, param);
}

// What a tensor must be for its record to stay valid.
struct Expect {
  int64_t numel = 0;
  PyObject* dtype = nullptr;    // strong; torch's dtype objects are singletons, compared by identity
  int64_t device = -1;          // tensor.get_device(): -1 on the CPU
  PyObject* strides = nullptr;  // strong; nullptr: contiguous
  bool complex = false;         // also refuse the conjugation bit
};

// A tensor the plan keeps between steps: the parameter, a state tensor or a step counter.
struct Kept {
  PyObject* obj = nullptr;      // strong
  PyObject* storage = nullptr;  // strong: keeps the memory at `ptr` alive
  PyObject* key = nullptr;      // strong; its key in the parameter's state dict (nullptr: the parameter)
  int64_t ptr = 0;
  int64_t version = 0;
  uintptr_t impl = 0;          // its TensorImpl's and StorageImpl's addresses (torch's `_cdata`), only ever
  uintptr_t storage_impl = 0;  // prefetched: a hint to the memory system, never dereferenced
  int field = 0;  // which int64 of the TensorRecord holds its address
  Expect expect;
};

struct Entry {
  PyObject* param = nullptr;  // strong
  int64_t record = -1;        // its record, or -1: it had no gradient when the plan was made
  bool hash_is_id = false;    // hash(param) is id(param), as torch.Tensor.__hash__ has it
  Expect grad;                // what its gradient must be
  std::vector<Kept> kept;     // kept[0] is the parameter itself
};

void release(Expect& e) {
  Py_CLEAR(e.dtype);
  Py_CLEAR(e.strides);
}

// Checks numel, dtype, device, layout and the view bits of `t` against `e`. Returns nullptr when they hold,
// else what differs (a Python error that occurred is cleared and reported as such).
const char* check_layout(PyObject* t, const Expect& e) {
  int64_t numel = 0, device = 0;
  bool ok = true;
  if (!call_int(t, names.numel, &numel)) return "numel() raised";
  if (numel != e.numel) return "numel changed";
  PyObject* dtype = get(t, names.dtype);
  if (!dtype) return "dtype raised";
  Py_DECREF(dtype);  // the singleton stays alive: compare the address
  if (dtype != e.dtype) return "dtype changed";
  if (!call_int(t, names.get_device, &device)) return "get_device() raised";
  if (device != e.device) return "device changed";
  if (e.strides == nullptr) {
    if (!call_is_true(t, names.is_contiguous, &ok)) return ok ? "not contiguous" : "is_contiguous() raised";
  } else {
    PyObject* strides = call0(t, names.stride);
    if (!strides) return "stride() raised";
    const int same = PyObject_RichCompareBool(strides, e.strides, Py_EQ);
    Py_DECREF(strides);
    if (same != 1) return same < 0 ? "stride comparison raised" : "strides changed";
  }
  if (call_is_true(t, names.is_neg, &ok) || !ok) return ok ? "negation bit set" : "is_neg() raised";
  if (e.complex && (call_is_true(t, names.is_conj, &ok) || !ok)) return ok ? "conjugation bit set" : "is_conj() raised";
  return nullptr;
}

int64_t& record_field(TensorRecord& r, int field) { return reinterpret_cast<int64_t*>(&r)[field]; }

py::object reason(const std::string& what) {
  PyErr_Clear();
  return py::str(what);
}

}  // namespace

class Plan {
 public:
  Plan(const py::list& groups, const py::list& entries, const py::buffer& table) {
    resolve_names();
    py::buffer_info info = table.request();
    if (info.itemsize != 8 || info.ndim != 1 || info.size % kRecordFields != 0)
      throw KernelError("plan: the table must be a 1-d int64 buffer of whole records");
    const auto* first = static_cast<const TensorRecord*>(info.ptr);
    records_.assign(first, first + info.size / kRecordFields);
    // The table was launched once already: a fresh momentum buffer is fresh no more.
    for (TensorRecord& r : records_) r.codes &= ~(int64_t{kFlagFreshMomentum} << 16);
    for (const py::handle group : groups) {
      std::vector<PyObject*> params;
      for (const py::handle p : py::reinterpret_borrow<py::list>(group)) params.push_back(p.inc_ref().ptr());
      groups_.push_back(std::move(params));
    }
    try {
      for (const py::handle item : entries) add_entry(py::reinterpret_borrow<py::tuple>(item));
    } catch (...) {
      clear();
      throw;
    }
  }

  ~Plan() { clear(); }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // Re-checks the plan against the optimizer as it is now and puts this step's gradient addresses in the
  // records. None: the plan holds, launch it. A string: what changed (the step goes back to Python).
  py::object refresh(const py::list& groups, const py::dict& state) {
    drop_held();
    // Some of torch's methods take an argument tuple: thousands of them would start the cyclic garbage
    // collector over the whole heap for nothing (nothing here makes a cycle).
    const int gc_was_enabled = PyGC_Disable();
    py::object why = check(groups, state);
    if (gc_was_enabled) PyGC_Enable();
    if (!why.is_none()) drop_held();
    return why;
  }

  py::object check(const py::list& groups, const py::dict& state) {
    if (static_cast<size_t>(PyList_GET_SIZE(groups.ptr())) != groups_.size()) return reason("param groups changed");
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      PyObject* list = PyList_GET_ITEM(groups.ptr(), gi);
      if (!PyList_Check(list) || static_cast<size_t>(PyList_GET_SIZE(list)) != groups_[gi].size())
        return reason("param group " + std::to_string(gi) + " changed");
      for (size_t pi = 0; pi < groups_[gi].size(); ++pi)
        if (PyList_GET_ITEM(list, pi) != groups_[gi][pi]) return reason("param group " + std::to_string(gi) + " changed");
    }
    const size_t n = entries_.size();
    grads_.assign(n, nullptr);
    for (size_t j = 0; j < std::min(n, kGradAhead); ++j) read_grad(j);
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) prefetch(entries_[i + kAhead]);
      if (i + kGradAhead < n) read_grad(i + kGradAhead);
      Entry& e = entries_[i];
      PyObject* g = grads_[i];  // borrowed from held_
      if (!g) return reason("reading .grad raised");
      if (g == Py_None) {
        if (e.record >= 0) return reason("parameter " + std::to_string(i) + " has no gradient now");
        continue;
      }
      if (e.record < 0) return reason("parameter " + std::to_string(i) + " has a gradient now");
      if (const char* why = check_grad(g, e)) return reason("gradient " + std::to_string(i) + ": " + why);
      PyObject* entry_state = state_of(state.ptr(), e.param, e.hash_is_id);  // borrowed
      if (entry_state == nullptr && e.kept.size() > 1) return reason("state of parameter " + std::to_string(i) + " is gone");
      if (entry_state != nullptr && !PyDict_Check(entry_state)) return reason("state entry is not a dict");
      for (Kept& k : e.kept) {
        PyObject* now = k.key == nullptr ? k.obj : PyDict_GetItemWithError(entry_state, k.key);
        if (now != k.obj) return reason("state tensor of parameter " + std::to_string(i) + " was replaced");
        if (const char* why = check_kept(k)) return reason("tensor of parameter " + std::to_string(i) + ": " + why);
      }
    }
    return py::none();
  }

  template <typename Hyper, void (*Step)(const TensorRecord*, int64_t, const Hyper*, int64_t, const LaunchOptions&)>
  void step(const std::vector<Hyper>& hypers, double grad_scale, uintptr_t stats, int64_t num_blocks,
            int num_threads, const std::vector<int64_t>& skip_blocks) {
    if (!(grad_scale > 0.0)) throw KernelError("grad_scale must be > 0, got " + std::to_string(grad_scale));
    LaunchOptions opt;
    opt.grad_scale = grad_scale;
    opt.stats = reinterpret_cast<double*>(stats);
    opt.num_blocks = num_blocks;
    opt.num_threads = std::max(1, num_threads);
    std::vector<TensorRecord> kept_records;
    const std::vector<TensorRecord>* recs = &records_;
    if (!skip_blocks.empty()) {
      for (const TensorRecord& r : records_)
        if (std::find(skip_blocks.begin(), skip_blocks.end(), r.block) == skip_blocks.end()) kept_records.push_back(r);
      recs = &kept_records;
    }
    try {
      py::gil_scoped_release release;
      Step(recs->data(), static_cast<int64_t>(recs->size()), hypers.data(), static_cast<int64_t>(hypers.size()), opt);
    } catch (...) {
      drop_held();
      throw;
    }
    drop_held();
  }

  bool all_finite(int num_threads) {
    py::gil_scoped_release release;
    return cpu::grads_all_finite(records_.data(), static_cast<int64_t>(records_.size()), std::max(1, num_threads));
  }

  // Blocks (indices, ascending) with an inf or NaN in any of their gradients.
  std::vector<int64_t> nonfinite_blocks(int num_threads) {
    std::vector<int64_t> blocks;
    for (const TensorRecord& r : records_) blocks.push_back(r.block);
    std::sort(blocks.begin(), blocks.end());
    blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
    std::vector<int64_t> bad;
    py::gil_scoped_release release;
    for (int64_t b : blocks) {
      std::vector<TensorRecord> part;
      for (const TensorRecord& r : records_)
        if (r.block == b) part.push_back(r);
      if (!cpu::grads_all_finite(part.data(), static_cast<int64_t>(part.size()), std::max(1, num_threads))) bad.push_back(b);
    }
    return bad;
  }

  py::bytes records() const {
    return py::bytes(reinterpret_cast<const char*>(records_.data()), records_.size() * sizeof(TensorRecord));
  }

  int64_t num_records() const { return static_cast<int64_t>(records_.size()); }

  // Lets go of this step's gradients (after a launch, or when the caller takes another path).
  void drop_held() {
    for (PyObject* o : held_) Py_DECREF(o);
    held_.clear();
    grads_.clear();
  }

 private:
  void add_entry(const py::tuple& item) {
    // (param, record index or -1, [(field, key or None, tensor), ...])
    if (item.size() != 3) throw KernelError("plan: an entry is (param, record, kept)");
    Entry e;
    e.param = py::object(item[0]).release().ptr();
    e.record = item[1].cast<int64_t>();
    const Py_hash_t hash = PyObject_Hash(e.param);
    if (hash == -1) PyErr_Clear();
    e.hash_is_id = hash == static_cast<Py_hash_t>(reinterpret_cast<intptr_t>(e.param));
    entries_.push_back(std::move(e));
    Entry& entry = entries_.back();
    if (entry.record < 0) return;
    if (entry.record >= static_cast<int64_t>(records_.size())) throw KernelError("plan: record index out of range");
    const TensorRecord& r = records_[entry.record];
    entry.grad = expect_of(entry.param);
    // The record's numel is in real elements (a complex tensor counts twice).
    if (r.numel != entry.grad.numel * (entry.grad.complex ? 2 : 1)) throw KernelError("plan: record numel differs");
    Kept param;
    param.obj = entry.param;
    Py_INCREF(param.obj);
    param.field = 0;
    entry.kept.push_back(param);
    for (const py::handle k : py::reinterpret_borrow<py::list>(item[2])) {
      auto spec = py::reinterpret_borrow<py::tuple>(k);
      Kept kept;
      kept.field = spec[0].cast<int>();
      if (!spec[1].is_none()) kept.key = py::object(spec[1]).release().ptr();
      kept.obj = py::object(spec[2]).release().ptr();
      entry.kept.push_back(kept);
    }
    for (Kept& k : entry.kept) {
      k.expect = expect_of(k.obj);
      k.storage = call0(k.obj, names.untyped_storage);
      if (!k.storage) throw py::error_already_set();
      k.impl = address_of(k.obj, names.tensor_cdata);
      k.storage_impl = address_of(k.storage);
      if (!call_int(k.obj, names.data_ptr, &k.ptr) || !attr_int(k.obj, names.version, &k.version))
        throw py::error_already_set();
      if (record_field(records_[entry.record], k.field) != k.ptr)
        throw KernelError("plan: a record's address differs from its tensor's");
    }
  }

  // How many entries ahead refresh asks for the memory it will read: the checks are chains of dependent loads
  // (Python object, TensorImpl, StorageImpl) that the processor cannot start early on its own.
  static constexpr size_t kAhead = 6;
  static constexpr size_t kGradAhead = 3;

  // A prefetch is only a hint: an address that is stale or 0 costs a wasted request, never a fault.
  static void prefetch_lines(uintptr_t address, int lines) {
    for (int i = 0; i < lines; ++i) __builtin_prefetch(reinterpret_cast<const void*>(address + 64 * i));
  }

  static void prefetch(const Entry& e) {
    for (const Kept& k : e.kept) {
      prefetch_lines(reinterpret_cast<uintptr_t>(k.obj), 1);
      prefetch_lines(k.impl, 2);
      prefetch_lines(k.storage_impl, 1);
    }
  }

  // Reads entry j's gradient a few entries before it is checked (kept in held_; grads_[j] is nullptr when the
  // read raised, Py_None when there is none) and asks for the memory of its TensorImpl.
  void read_grad(size_t j) {
    PyObject* g = get(entries_[j].param, names.grad);
    if (!g) {
      PyErr_Clear();
      return;
    }
    held_.push_back(g);
    grads_[j] = g;
    if (g != Py_None) prefetch_lines(address_of(g, names.tensor_cdata), 2);
  }

  // The address torch publishes as `obj._cdata` (its C++ object's), read through `descriptor` (nullptr:
  // attribute lookup), or 0.
  static uintptr_t address_of(PyObject* obj, PyObject* descriptor = nullptr) {
    PyObject* r = descriptor ? get(obj, descriptor) : PyObject_GetAttr(obj, names.cdata);
    uintptr_t a = 0;
    if (r) {
      a = reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(r));
      Py_DECREF(r);
    }
    if (PyErr_Occurred()) {
      PyErr_Clear();
      a = 0;
    }
    return a;
  }

  // What t (and tensors that must look like it) is now.
  static Expect expect_of(PyObject* t) {
    Expect e;
    if (!call_int(t, names.numel, &e.numel) || !call_int(t, names.get_device, &e.device)) throw py::error_already_set();
    e.dtype = get(t, names.dtype);
    if (!e.dtype) throw py::error_already_set();
    bool ok = true;
    if (!call_is_true(t, names.is_contiguous, &ok)) {
      if (!ok) throw py::error_already_set();
      e.strides = call0(t, names.stride);
      if (!e.strides) throw py::error_already_set();
    }
    PyObject* flag = PyObject_GetAttr(e.dtype, names.is_complex);
    if (!flag) throw py::error_already_set();
    e.complex = flag == Py_True;
    Py_DECREF(flag);
    return e;
  }

  // The gradient is held (held_) until the launch is over; its address, layout and view bits are checked.
  const char* check_grad(PyObject* g, const Entry& e) {
    int64_t ptr = 0;
    if (!call_int(g, names.data_ptr, &ptr)) return "data_ptr() raised (a sparse gradient, or one without storage?)";
    if (const char* why = check_layout(g, e.grad)) return why;
    record_field(records_[e.record], 1) = ptr;
    return nullptr;
  }

  static const char* check_kept(Kept& k) {
    int64_t ptr = 0, version = 0;
    if (!call_int(k.obj, names.data_ptr, &ptr)) return "data_ptr() raised";
    if (ptr != k.ptr) return "address changed";
    if (!attr_int(k.obj, names.version, &version)) return "_version raised";
    if (version == k.version) return nullptr;
    if (const char* why = check_layout(k.obj, k.expect)) return why;  // changed in place: look again
    k.version = version;
    return nullptr;
  }

  void clear() {
    drop_held();
    for (Entry& e : entries_) {
      for (Kept& k : e.kept) {
        Py_CLEAR(k.obj);
        Py_CLEAR(k.storage);
        Py_CLEAR(k.key);
        release(k.expect);
      }
      release(e.grad);
      Py_CLEAR(e.param);
    }
    entries_.clear();
    for (auto& group : groups_)
      for (PyObject* p : group) Py_DECREF(p);
    groups_.clear();
  }

  std::vector<TensorRecord> records_;
  std::vector<Entry> entries_;
  std::vector<std::vector<PyObject*>> groups_;  // strong: the param groups' parameters when planned
  std::vector<PyObject*> held_;                 // strong: this step's gradients and their storages
  std::vector<PyObject*> grads_;                // borrowed (from held_): this refresh's gradient of each entry
};

void bind_launch_plan(py::module_& m) {
  py::class_<Plan>(m, "Plan",
                   "A launch cached across steps (see csrc/launch_plan.cpp): the records of a table that was "
                   "checked and launched once, with the tensors they address kept alive.")
      .def(py::init<const py::list&, const py::list&, const py::buffer&>(), py::arg("groups"), py::arg("entries"),
           py::arg("table"))
      .def("refresh", &Plan::refresh, py::arg("groups"), py::arg("state"),
           "None when the plan still holds (this step's gradient addresses are in its records), else why not.")
      .def("sgd_step", &Plan::step<SgdHyper, &cpu::sgd_step>, py::arg("hypers"), py::kw_only(),
           py::arg("grad_scale") = 1.0, py::arg("stats") = 0, py::arg("num_blocks") = 0, py::arg("num_threads") = 1,
           py::arg("skip_blocks") = std::vector<int64_t>{})
      .def("adam_step", &Plan::step<AdamHyper, &cpu::adam_step>, py::arg("hypers"), py::kw_only(),
           py::arg("grad_scale") = 1.0, py::arg("stats") = 0, py::arg("num_blocks") = 0, py::arg("num_threads") = 1,
           py::arg("skip_blocks") = std::vector<int64_t>{})
      .def("all_finite", &Plan::all_finite, py::kw_only(), py::arg("num_threads") = 1)
      .def("nonfinite_blocks", &Plan::nonfinite_blocks, py::kw_only(), py::arg("num_threads") = 1)
      .def("records", &Plan::records, "The records as bytes (10 int64 each).")
      .def("drop_held", &Plan::drop_held)
      .def_property_readonly("num_records", &Plan::num_records);
}

}  // namespace pyco
