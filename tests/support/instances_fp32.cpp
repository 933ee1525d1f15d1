// Explicit instantiations declared in instances.hpp: the float32 configurations.
#include "support/instances.hpp"

SWITCHMOE_TEST_FP32_INSTANCES()
