#!/usr/bin/env bash
# Installs the Debian packages sockshare's build, tests, examples and benchmarks use, if any
# is missing. Safe to run again; does nothing when everything is present. systemd brings the
# real socket-activation tools (systemd-socket-activate, systemd-socket-proxyd) the CLI tests
# run serve with and under; nodejs runs examples/node/inherit_worker.js in them; wrk, ab
# (apache2-utils) and curl are HTTP clients the tests send to the built-in worker.
set -euo pipefail
packages=(cmake make g++ pkg-config googletest libgtest-dev libbenchmark-dev libcli11-dev
          libfmt-dev libasio-dev clang libclang-rt-14-dev python3 wrk curl
          apache2-utils systemd nodejs)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
