#!/usr/bin/env bash
# The README's "run" command: installs what is missing, builds the sockshare command
# (Release, in build/), then runs it in the foreground: 2 built-in HTTP workers behind a
# dispatcher on 127.0.0.1:8080. Try `curl http://127.0.0.1:8080/` from another terminal; stop
# it with Ctrl-C (a graceful drain). Extra arguments go to `sockshare serve`, e.g.
#   scripts/run.sh --policy rr             scripts/run.sh --mode inherit
# SOCKSHARE_LISTEN replaces the address (scripts/test.sh runs it on 127.0.0.1:0).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
# WERROR off explicitly: scripts/test.sh turns it on in the same build directory, and a
# warning of another optimisation level must not keep the server from starting.
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSOCKSHARE_WERROR=OFF >/dev/null
cmake --build build -j"$(nproc)" --target sockshare_cli
exec build/cli/sockshare serve --listen "${SOCKSHARE_LISTEN:-127.0.0.1:8080}" --workers 2 "$@"
