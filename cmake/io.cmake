# switchmoe::io, the optional checkpoint target (include/switchmoe/io/): the core headers plus
# nlohmann-json. Included from the top-level CMakeLists.txt after the core target, before its tests.
#
#   SWITCHMOE_IO    build and export switchmoe::io (default: on when nlohmann-json is found, and
#                   always on in a top-level build, where its absence is an error)
#   SWITCHMOE_FUZZ  build the libFuzzer target safetensors_fuzzer (needs clang; see
#                   tests/fuzz/run.sh)

find_package(nlohmann_json 3.2 QUIET)
if(nlohmann_json_FOUND OR switchmoe_is_top_level)
  set(switchmoe_io_default ON)
else()
  set(switchmoe_io_default OFF)
endif()
option(SWITCHMOE_IO "Build the checkpoint I/O target switchmoe::io (needs nlohmann-json)"
  ${switchmoe_io_default})
option(SWITCHMOE_FUZZ "Build the libFuzzer target of the safetensors reader (clang only)" OFF)

if(NOT SWITCHMOE_IO)
  return()
endif()
if(NOT nlohmann_json_FOUND)
  message(FATAL_ERROR "switchmoe: SWITCHMOE_IO needs nlohmann-json (Debian: nlohmann-json3-dev, "
    "installed by cmake/install_deps.sh); or configure with -DSWITCHMOE_IO=OFF")
endif()

add_library(switchmoe_io INTERFACE)
add_library(switchmoe::io ALIAS switchmoe_io)
set_target_properties(switchmoe_io PROPERTIES EXPORT_NAME io)
target_link_libraries(switchmoe_io INTERFACE switchmoe nlohmann_json::nlohmann_json)

if(SWITCHMOE_INSTALL)
  # Its own export set and package file, which switchmoeConfig.cmake includes when present, so
  # find_package(switchmoe COMPONENTS io) works and plain find_package(switchmoe) does not need
  # nlohmann-json.
  install(TARGETS switchmoe_io EXPORT switchmoeIoTargets)
  install(EXPORT switchmoeIoTargets
    NAMESPACE switchmoe::
    DESTINATION "${switchmoe_config_dir}")
  install(FILES cmake/switchmoeIoConfig.cmake DESTINATION "${switchmoe_config_dir}")
endif()

if(SWITCHMOE_BUILD_TESTS)
  add_subdirectory(tests/io)
endif()

if(SWITCHMOE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "switchmoe: SWITCHMOE_FUZZ needs clang (libFuzzer), not "
      "${CMAKE_CXX_COMPILER_ID}")
  endif()
  add_executable(safetensors_fuzzer tests/fuzz/safetensors_fuzzer.cpp)
  target_link_libraries(safetensors_fuzzer PRIVATE switchmoe::io)
  set(switchmoe_fuzz_flags -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
  target_compile_options(safetensors_fuzzer PRIVATE ${switchmoe_fuzz_flags} -g -O1
    -fno-omit-frame-pointer)
  target_link_options(safetensors_fuzzer PRIVATE ${switchmoe_fuzz_flags})
endif()
