// Turns runtime switches into template parameters, so each rule's inner loop is compiled without branches.
#pragma once

#include <type_traits>

namespace pyco::cpu {

template <typename F>
decltype(auto) dispatch_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

// Value an element had after a store/load round trip in storage type S (what was "applied").
template <typename S>
inline typename Storage<S>::Math as_stored(typename Storage<S>::Math x) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    return x;
  } else {
    S tmp;
    Storage<S>::store(&tmp, 0, x);
    return Storage<S>::load(&tmp, 0);
  }
}

// Element i's gradient; with kUnscale (GradScaler) divided by the scale and written back unscaled, as
// torch's fused optimizers leave .grad. Multiplying by 1/scale is exact for GradScaler's powers of two.
template <bool kUnscale, typename S, typename M>
inline M load_grad(S* grad, int64_t i, M inv_scale) {
  M g = Storage<S>::load(grad, i);
  if constexpr (kUnscale) {
    g = g * inv_scale;
    Storage<S>::store(grad, i, g);
  }
  return g;
}

}  // namespace pyco::cpu
