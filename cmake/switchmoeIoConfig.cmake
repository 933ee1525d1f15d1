# The optional component io of the switchmoe package (target switchmoe::io): included by
# switchmoeConfig.cmake. Without nlohmann-json the component is reported missing, and only a
# find_package(switchmoe COMPONENTS io) fails.
find_package(nlohmann_json 3.2 QUIET)
if(nlohmann_json_FOUND)
  include("${CMAKE_CURRENT_LIST_DIR}/switchmoeIoTargets.cmake")
  set(switchmoe_io_FOUND TRUE)
else()
  set(switchmoe_io_FOUND FALSE)
endif()
