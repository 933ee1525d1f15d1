# Builds and runs the consumer project tests/package/<METHOD>/ against this source tree.
#
#   cmake -D METHOD=add_subdirectory|find_package|fetch_content -D SOURCE_DIR=<switchmoe tree>
#         -D BUILD_DIR=<configured switchmoe build> -D WORK_DIR=<scratch dir>
#         [-D GENERATOR=<generator>] [-D CXX_COMPILER=<compiler>] -P check_consumer.cmake
#
# find_package installs BUILD_DIR into WORK_DIR/prefix first; fetch_content packs the files a
# release archive holds into WORK_DIR/switchmoe-src.tar.gz and fetches that by file:// URL.

foreach(required METHOD SOURCE_DIR BUILD_DIR WORK_DIR)
  if(NOT DEFINED ${required})
    message(FATAL_ERROR "check_consumer.cmake: -D ${required}=... is required")
  endif()
endforeach()

function(run_step description)
  message(STATUS "package.${METHOD}: ${description}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "package.${METHOD}: ${description} failed (${result})")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(consumer_build "${WORK_DIR}/build")

set(configure_args -S "${SOURCE_DIR}/tests/package/${METHOD}" -B "${consumer_build}")
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

# The consumer also builds against switchmoe::io when the tested build has that target.
file(STRINGS "${BUILD_DIR}/CMakeCache.txt" io_option REGEX "^SWITCHMOE_IO:BOOL=")
if(io_option MATCHES "=(ON|TRUE|1)$")
  list(APPEND configure_args -DSWITCHMOE_CONSUMER_IO=ON)
endif()

if(METHOD STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DSWITCHMOE_SOURCE_DIR=${SOURCE_DIR}")
elseif(METHOD STREQUAL "find_package")
  set(prefix "${WORK_DIR}/prefix")
  run_step("install into ${prefix}"
    "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(METHOD STREQUAL "fetch_content")
  set(archive "${WORK_DIR}/switchmoe-src.tar.gz")
  run_step("pack ${archive}"
    "${CMAKE_COMMAND}" -E chdir "${SOURCE_DIR}"
    "${CMAKE_COMMAND}" -E tar czf "${archive}" CMakeLists.txt cmake include LICENSE)
  file(SHA256 "${archive}" archive_hash)
  list(APPEND configure_args "-DSWITCHMOE_URL=file://${archive}"
    "-DSWITCHMOE_URL_HASH=SHA256=${archive_hash}")
else()
  message(FATAL_ERROR "check_consumer.cmake: unknown METHOD '${METHOD}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" ${configure_args})

if(METHOD STREQUAL "find_package")
  # The package must come from the fresh install, not from some other copy on the system.
  file(STRINGS "${consumer_build}/CMakeCache.txt" package_dir REGEX "^switchmoe_DIR:")
  string(FIND "${package_dir}" "${prefix}/" position)
  if(NOT position GREATER -1)
    message(FATAL_ERROR "package.find_package: found the wrong package: ${package_dir}")
  endif()
endif()

run_step("build" "${CMAKE_COMMAND}" --build "${consumer_build}" --config Release)
run_step("run" "${CMAKE_COMMAND}" -E chdir "${consumer_build}"
  "${CMAKE_CTEST_COMMAND}" --output-on-failure -C Release)
