#!/usr/bin/env bash
# Installs the Debian 12 packages switchmoe needs to build, test, run its examples and check
# formatting. The one place the package list lives: tests/run.sh and .ci/run call this script,
# and README.md points at it.
#
#   bash cmake/install_deps.sh [extra-package ...]
#
# Does nothing (and needs no root) when every package is already installed. Otherwise runs
# `apt-get update` once and installs only what is missing, as root or through sudo.
set -euo pipefail

# Optional, not installed by default (pass it as an extra package): libdnnl-dev, for the oneDNN
# comparison benchmark (benchmarks/onednn_bench.cpp), which is skipped without it.
packages=(
  cmake            # build system (>= 3.16)
  make             # CMake's default generator
  g++              # C++17 compiler; brings libgomp, the OpenMP runtime
  libeigen3-dev    # Eigen 3.4, the only dependency of the headers
  libgtest-dev     # GoogleTest (tests)
  googletest       # GoogleTest sources and CMake package files
  libbenchmark-dev # Google Benchmark (benchmarks/)
  clang-format     # formatting check in CI
  fortunes         # text corpus of the language-model demo (examples/switch_lm)
  gnuplot-nox      # plots of the language-model demo
  nlohmann-json3-dev # JSON headers of the checkpoint target switchmoe::io
  python3-numpy    # independent safetensors writer/reader of the io interop tests
  libopenmpi-dev   # MPI for switchmoe::distributed (expert parallelism) and its tests
  openmpi-bin      # mpirun, which runs the MPI tests (ctest label mpi)
  "$@"
)

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true)
  [[ "$status" == ii* ]] || missing+=("$package")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_deps: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "install_deps: installing ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || {
    echo "install_deps: not root and no sudo; install these yourself: ${missing[*]}" >&2
    exit 1
  }
  sudo=(sudo)
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
