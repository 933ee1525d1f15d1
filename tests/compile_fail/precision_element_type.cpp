// expect: switchmoe supports float and Eigen::bfloat16 as the expert element type.
#include "switchmoe/core/precision.hpp"

switchmoe::Precision<double> policy;
