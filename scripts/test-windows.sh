#!/usr/bin/env bash
# Builds the Windows backend with mingw-w64 and runs its tests under Wine.
# Usage: scripts/test-windows.sh [build-dir]   (default: build-windows)
# Exits non-zero on any failure. See docs/WINDOWS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${1:-build-windows}
case $build in /*) ;; *) build=$root/$build ;; esac

if ! command -v x86_64-w64-mingw32-g++-posix >/dev/null || [ ! -x /usr/lib/wine/wine64 ]; then
  echo "== installing mingw-w64 and wine64"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    g++-mingw-w64-x86-64-posix wine64 >/dev/null
fi

wine=/usr/lib/wine/wine64
wineserver=/usr/lib/wine/wineserver
export WINEPREFIX=$build/wineprefix
export WINEDEBUG=-all
export WINEDLLOVERRIDES="mscoree,mshtml="  # no Mono/Gecko installer prompts
mkdir -p "$WINEPREFIX"

# Wine's background services inherit the stderr of the first Wine process; if that is a
# test, CTest waits for them. So start the server and boot the prefix first, detached from
# our output, and kill everything Wine started when we leave, whatever happens.
# -k then -w: stop this prefix's server and wait until it is gone, so that a server still
# shutting down (from an earlier or interrupted run) never serves the next one.
stop_wine() { "$wineserver" -k 2>/dev/null || true; "$wineserver" -w 2>/dev/null || true; }
trap stop_wine EXIT
stop_wine
"$wineserver" -p
echo "== booting the Wine prefix $WINEPREFIX"
"$wine" wineboot -i </dev/null >"$build/wineboot.log" 2>&1

echo "== configure (mingw-w64) and build"
cmake -S . -B "$build" -DCMAKE_TOOLCHAIN_FILE="$root/cmake/mingw-w64.cmake" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSOCKSHARE_WERROR=ON -DSOCKSHARE_BUILD_TESTS=ON \
  -DSOCKSHARE_BUILD_CLI=OFF -DSOCKSHARE_BUILD_BENCH=OFF -DSOCKSHARE_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target sockshare_windows_tests

echo "== tests under Wine"
ctest --test-dir "$build" -j2 --timeout 60 --output-on-failure
