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

template <typename M>
struct ElemStats {
  M g, u, p;
};

}  // namespace pyco::cpu
