#!/usr/bin/env bash
# Formats the C++ sources with the repository's .clang-format, or only checks them (as CI does).
#
#   bash cmake/format.sh [--check] [file ...]
#
# Without files: every *.hpp and *.cpp that git tracks or would track (build trees are ignored).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=(-i)
if [[ ${1:-} == --check ]]; then
  mode=(--dry-run -Werror)
  shift
fi

if [[ $# -gt 0 ]]; then
  sources=("$@")
elif git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t sources < <(git ls-files --cached --others --exclude-standard '*.hpp' '*.cpp')
else
  mapfile -t sources < <(find include tests examples benchmarks -name '*.[hc]pp' 2>/dev/null)
fi

if [[ ${#sources[@]} -gt 0 ]]; then
  clang-format "${mode[@]}" "${sources[@]}"
fi
if [[ ${mode[0]} == -i ]]; then
  echo "clang-format: ${#sources[@]} files formatted"
else
  echo "clang-format: ${#sources[@]} files clean"
fi
