#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian 12 packages that building, testing and running fedl need. Idempotent and
# quiet when everything is already there; `make` runs it before configuring.
set -eu

# Build: compiler, CMake, and the libraries (all from Debian; nothing is downloaded elsewhere).
build_pkgs="cmake ninja-build g++ make pkg-config libtorch-dev libcli11-dev nlohmann-json3-dev
  libasio-dev libssl-dev libfmt-dev doctest-dev libexpected-dev libseccomp-dev libcap-dev zlib1g-dev
  libkissfft-dev"
# Run time: OpenBLAS instead of the reference BLAS (14x faster training, see docs/PERFORMANCE.md).
run_pkgs="libopenblas0-openmp"
# Tests, demo and benchmarks: the openssl CLI, man page lint, PyTorch, NumPy and mpmath as independent
# references, the full Fashion-MNIST, GNU time for peak memory, and a headless browser (with a
# font) that renders fedl report's page.
test_pkgs="openssl mandoc python3 python3-torch python3-numpy python3-mpmath dataset-fashion-mnist time
  chromium fonts-dejavu-core"

# What one make target needs besides, given as arguments (make fuzz: clang and its libFuzzer).
extra_pkgs="$*"

missing=""
for p in $build_pkgs $run_pkgs $test_pkgs $extra_pkgs; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=sudo
  else
    echo "fedl setup: these Debian packages are missing:$missing" >&2
    echo "fedl setup: run as root: apt-get install --no-install-recommends$missing" >&2
    exit 1
  fi
else
  SUDO=
fi
echo "fedl setup: installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# --no-install-recommends: libasio-dev would otherwise pull in 160 MB of Boost.
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
