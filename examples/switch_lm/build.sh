# Shared by run.sh and paper.sh (sourced from the repository root): installs what the demo needs
# and builds switch_lm (Release) in $build_dir, the CMake build tree; sets $exe to the program.
# Expects build_dir and jobs to be set.
if [[ -f cmake/install_deps.sh ]]; then
  bash cmake/install_deps.sh
else
  need=(cmake make g++ libeigen3-dev fortunes gnuplot-nox)
  missing=()
  for p in "${need[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"
  fi
fi

# Configure only if needed (CI has already built the whole project into build/), and build only
# the demo's program.
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DSWITCHMOE_BUILD_TESTS=OFF \
    -DSWITCHMOE_BUILD_BENCHMARKS=OFF -DSWITCHMOE_BUILD_EXAMPLES=ON
elif grep -q '^SWITCHMOE_BUILD_EXAMPLES:BOOL=OFF' "$build_dir/CMakeCache.txt"; then
  cmake -S . -B "$build_dir" -DSWITCHMOE_BUILD_EXAMPLES=ON
fi
cmake --build "$build_dir" -j "$jobs" --target switch_lm
exe=$(find "$build_dir" -type f -name switch_lm -perm -u+x | head -n 1)
[[ -n "$exe" ]] || { echo "${0##*/}: switch_lm was not built in $build_dir" >&2; exit 1; }

