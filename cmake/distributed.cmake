# The optional MPI part of switchmoe (issue 11, SEMANTICS 21): the header-only target
# switchmoe::distributed = switchmoe::switchmoe + MPI::MPI_CXX, for <switchmoe/distributed.hpp>.
# Defined when an MPI implementation is found (Debian: libopenmpi-dev, openmpi-bin); the core
# target never depends on MPI. Included by the top-level CMakeLists.txt after the core target
# and its install rules.
option(SWITCHMOE_DISTRIBUTED "Provide switchmoe::distributed (expert parallelism over MPI) when MPI is found" ON)

if(SWITCHMOE_DISTRIBUTED)
  if(NOT TARGET MPI::MPI_CXX)
    find_package(MPI QUIET COMPONENTS CXX)
  endif()
  if(TARGET MPI::MPI_CXX)
    add_library(switchmoe_distributed INTERFACE)
    add_library(switchmoe::distributed ALIAS switchmoe_distributed)
    set_target_properties(switchmoe_distributed PROPERTIES EXPORT_NAME distributed)
    target_link_libraries(switchmoe_distributed INTERFACE switchmoe MPI::MPI_CXX)
    if(SWITCHMOE_INSTALL)
      # Its own export file, which the package file includes only where MPI is found.
      install(TARGETS switchmoe_distributed EXPORT switchmoeDistributedTargets)
      install(EXPORT switchmoeDistributedTargets
        NAMESPACE switchmoe::
        DESTINATION "${switchmoe_config_dir}")
    endif()
  else()
    message(STATUS "switchmoe: MPI not found; switchmoe::distributed and its tests skipped")
  endif()
endif()
