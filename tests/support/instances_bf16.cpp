// Explicit instantiations declared in instances.hpp: the bfloat16 configurations.
#include "support/instances.hpp"

SWITCHMOE_TEST_BF16_INSTANCES()
