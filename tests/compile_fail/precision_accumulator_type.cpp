// expect: switchmoe accumulates in float32
#include "switchmoe/core/precision.hpp"

switchmoe::Precision<float, double> policy;
