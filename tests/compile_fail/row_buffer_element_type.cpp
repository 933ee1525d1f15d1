// expect: RowBuffer holds plain numbers only.
#include <string>

#include "switchmoe/core/buffer.hpp"

switchmoe::detail::RowBuffer<std::string> buffer;
