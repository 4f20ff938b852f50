#!/usr/bin/env bash
# Install everything meshfed needs on a fresh Debian-like machine: Python packages and, where apt
# exists, the Fashion-MNIST dataset package Chromium (for the browser test) and nginx (for the TLS proxy test). Safe to run again;
# needs no internet beyond the package registries. MESHFED_NO_BROWSER=1 skips Chromium (demo only).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ -n "${MESHFED_NO_BROWSER:-}" ] || command -v chromium >/dev/null 2>&1 || packages+=(chromium)
[ -n "${MESHFED_NO_BROWSER:-}" ] || command -v nginx >/dev/null 2>&1 || packages+=(nginx-light)
if command -v apt-get >/dev/null 2>&1 && [ ${#packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
