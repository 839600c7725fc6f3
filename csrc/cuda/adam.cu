// Adam / AdamW on the GPU: the generic launcher with AdamRule (step counters advance in the finalize kernel).
#include "multi_tensor.cuh"

namespace pyco::cuda {

void adam_step(const Launch& L) { run<AdamRule>(L, "adam"); }

}  // namespace pyco::cuda
