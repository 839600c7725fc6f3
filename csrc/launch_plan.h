// The launch plan: a checked table of records kept across steps (see launch_plan.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pyco {

// Adds the Plan class to the module.
void bind_launch_plan(pybind11::module_& m);

}  // namespace pyco
