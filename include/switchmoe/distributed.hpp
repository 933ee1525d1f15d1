#pragma once
// switchmoe's optional distributed part: expert parallelism over MPI (SEMANTICS 21). Needs an
// MPI implementation; link the CMake target switchmoe::distributed (which brings MPI::MPI_CXX).
// The core headers (switchmoe/switchmoe.hpp) never include this one and stay MPI-free.

#include "switchmoe/distributed/communicator.hpp"
#include "switchmoe/distributed/expert_parallel_layer.hpp"
#include "switchmoe/distributed/gradients.hpp"
#include "switchmoe/distributed/mpi_exchange.hpp"
#include "switchmoe/switchmoe.hpp"
