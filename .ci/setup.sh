#!/usr/bin/env bash
# Install everything meshfed needs on a fresh Debian-like machine: Python packages and, where apt
# exists, Debian's Fashion-MNIST package, plus Chromium (browser test), nginx and redis-server
# (TLS proxy and scale-out test), iproute2 (mesh test across network namespaces) and kubectl (Debian's
# kubernetes-client, only where no kubectl is installed: it renders the Kustomize manifests in tests/test_k8s.py).
# Safe to run again; needs no internet beyond the package registries.
# MESHFED_DEMO_ONLY=1 skips the test-only packages (Debian's and requirements-test.txt).
# MESHFED_CPU_TORCH=1 installs PyTorch's CPU-only build from download.pytorch.org first (no CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ -n "${MESHFED_DEMO_ONLY:-}" ] || command -v chromium >/dev/null 2>&1 || packages+=(chromium)
[ -n "${MESHFED_DEMO_ONLY:-}" ] || command -v nginx >/dev/null 2>&1 || packages+=(nginx-light)
[ -n "${MESHFED_DEMO_ONLY:-}" ] || command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
[ -n "${MESHFED_DEMO_ONLY:-}" ] || command -v ip >/dev/null 2>&1 || packages+=(iproute2)  # netns mesh test
[ -n "${MESHFED_DEMO_ONLY:-}" ] || command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
if command -v apt-get >/dev/null 2>&1 && [ ${#packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
CPU_TORCH="python3 -m pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1"
requirements=(-r requirements.txt)
[ -n "${MESHFED_DEMO_ONLY:-}" ] || requirements+=(-r requirements-test.txt)
if [ -n "${MESHFED_CPU_TORCH:-}" ]; then
  echo "setup: installing PyTorch's CPU build (MESHFED_CPU_TORCH=1): $CPU_TORCH"
  $CPU_TORCH
elif ! python3 -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch from PyPI: its default wheel is the CUDA build (about 4.4 GB installed). On a"
  echo "setup: machine without a GPU, Ctrl-C and run again with MESHFED_CPU_TORCH=1 for the CPU build (under 1 GB)."
fi
# no -q: pip shows what it downloads, with a progress bar on a terminal (torch alone is minutes on a slow link)
python3 -m pip install --disable-pip-version-check --progress-bar on "${requirements[@]}"
