// Shared vocabulary of pyco's kernels: dtype codes, the tensor table that Python hands over, the
// hyper-parameter structs, and float16/bfloat16 conversions. No torch headers: the Python side owns
// tensors and passes raw addresses and sizes (see pyco/_kernels.py for the other half of this contract).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyco {

// Storage types of parameters, gradients and optimizer state. Arithmetic is float64 for kF64 and
// float32 for everything else (bfloat16/float16 are widened on load and rounded once on store).
enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline const char* dtype_name(int32_t code) {
  switch (code) {
    case kF32: return "float32";
    case kF64: return "float64";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
    default: return "unknown";
  }
}

// One tensor of a multi-tensor update. Python packs these as 10 int64 values each (an array('q')), so the
// layout is part of the binding contract. All buffers of one record have `numel` elements of `dtype`
// and the same (dense) memory layout; the kernels treat them as flat arrays.
struct TensorRecord {
  int64_t param;   // address of the parameter (updated in place)
  int64_t grad;    // address of the gradient (rewritten only when it is unscaled by grad_scale)
  int64_t state0;  // SGD: momentum buffer (0 when momentum == 0); Adam: exp_avg
  int64_t state1;  // Adam: exp_avg_sq
  int64_t state2;  // Adam: max_exp_avg_sq (0 unless amsgrad)
  int64_t step;    // Adam: address of the scalar step counter, incremented by the kernel
  int64_t numel;   // elements in every buffer of this record
  int64_t codes;   // dtype | step_dtype << 8 | flags << 16
  int64_t group;   // index into the hyper-parameter array
  int64_t block;   // index of the statistics block this tensor belongs to
};
static_assert(sizeof(TensorRecord) == 10 * sizeof(int64_t), "TensorRecord is packed as 10 int64");

constexpr int64_t kRecordFields = 10;
constexpr int32_t kFlagFreshMomentum = 1;  // SGD: momentum buffer was just allocated; set it to d
// SGD (CUDA): `step` holds the address of a device int32; the momentum buffer is fresh iff it is 0, and the
// kernels set it to 1 when the step is applied (a skipped step leaves it 0)
constexpr int32_t kFlagMomentumInitFlag = 2;

inline int32_t record_dtype(const TensorRecord& r) { return static_cast<int32_t>(r.codes & 0xff); }
inline int32_t record_step_dtype(const TensorRecord& r) { return static_cast<int32_t>((r.codes >> 8) & 0xff); }
inline int32_t record_flags(const TensorRecord& r) { return static_cast<int32_t>((r.codes >> 16) & 0xff); }

// Per-block statistics, computed in the same memory pass as the update (summed in the arithmetic type
// over blocks of a few thousand elements, then in float64):
// Σg² (g: the gradient after unscaling, before maximize/weight decay), Σu² (u = θ_after − θ_before as
// stored), Σg·u, and Σθ² (θ before the step).
enum StatField : int { kGradSq = 0, kUpdateSq = 1, kGradDotUpdate = 2, kParamSq = 3, kNumStats = 4 };

struct SgdHyper {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
};

struct AdamHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool maximize = false;
  bool decoupled_weight_decay = false;  // AdamW
};

// What every launch needs besides the tensors and the rule's hyper-parameters.
struct LaunchOptions {
  double grad_scale = 1.0;    // GradScaler's scale: gradients are divided by it and the unscaled values
                              // written back, as torch's fused optimizers do; 1.0: gradients untouched
  double* stats = nullptr;    // [num_blocks][kNumStats], overwritten; nullptr: no statistics
  int64_t num_blocks = 0;
  int num_threads = 1;
};

class KernelError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// ---- float16 / bfloat16 <-> float32, round-to-nearest-even, NaN preserved ----

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in float32
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal or zero: round |f| * 2^24 to an integer, ties to even
    const float mag = bits_to_float(a) * 16777216.0f;  // exact scaling by a power of two
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(mag)));
  }
  // normal: rebias the exponent and round the mantissa from 23 to 10 bits, ties to even
  uint32_t v = a - 0x38000000u;  // exponent bias 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

// Storage <-> arithmetic type, one specialisation per storage type.
template <typename S> struct Storage;
template <> struct Storage<float> {
  using Math = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float x) { p[i] = x; }
};
template <> struct Storage<double> {
  using Math = double;
  static double load(const double* p, int64_t i) { return p[i]; }
  static void store(double* p, int64_t i, double x) { p[i] = x; }
};
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
template <> struct Storage<Half> {
  using Math = float;
  static float load(const Half* p, int64_t i) { return f16_to_float(p[i].bits); }
  static void store(Half* p, int64_t i, float x) { p[i].bits = float_to_f16(x); }
};
template <> struct Storage<BFloat16> {
  using Math = float;
  static float load(const BFloat16* p, int64_t i) { return bf16_to_float(p[i].bits); }
  static void store(BFloat16* p, int64_t i, float x) { p[i].bits = float_to_bf16(x); }
};

// Calls f(S{}) with the storage type named by a dtype code.
template <typename F>
decltype(auto) dispatch_dtype(int32_t code, F&& f) {
  switch (code) {
    case kF32: return f(float{});
    case kF64: return f(double{});
    case kF16: return f(Half{});
    case kBF16: return f(BFloat16{});
    default: throw KernelError("unsupported dtype code " + std::to_string(code));
  }
}

}  // namespace pyco
