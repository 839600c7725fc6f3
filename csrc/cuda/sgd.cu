// SGD with momentum on the GPU: the generic launcher with SgdRule.
#include "multi_tensor.cuh"

namespace pyco::cuda {

void sgd_step(const Launch& L) { run<SgdRule>(L, "sgd"); }

}  // namespace pyco::cuda
