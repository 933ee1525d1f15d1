// expect: Router's first template argument must be a switchmoe precision policy.
#include "switchmoe/routing/router.hpp"

switchmoe::Router<float>* router;
constexpr auto size = sizeof(switchmoe::Router<float>);
