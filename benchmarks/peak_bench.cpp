// The machine's fp32 FMA and bf16 dot-product peak per core (see peak.hpp).
#include "peak.hpp"
