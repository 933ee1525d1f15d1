# The optional MPI part, as a consumer uses it: where MPI is found, switchmoe must provide
# switchmoe::distributed, and a program linking it runs on 2 ranks. Included by each consumer.
find_package(MPI QUIET COMPONENTS CXX)
if(MPI_CXX_FOUND)
  if(NOT TARGET switchmoe::distributed)
    message(FATAL_ERROR "MPI is found but switchmoe provides no switchmoe::distributed")
  endif()
  add_executable(distributed_consumer "${CMAKE_CURRENT_LIST_DIR}/distributed_consumer.cpp")
  target_link_libraries(distributed_consumer PRIVATE switchmoe::distributed)
  add_test(NAME distributed_consumer
    COMMAND "${MPIEXEC_EXECUTABLE}" ${MPIEXEC_NUMPROC_FLAG} 2 --oversubscribe
      $<TARGET_FILE:distributed_consumer>)
  set_tests_properties(distributed_consumer PROPERTIES ENVIRONMENT
    "OMP_NUM_THREADS=1;OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_btl_vader_single_copy_mechanism=none")
endif()
