"""Drives real SGLang 0.5.23 cache objects over CPU token pools the way its
scheduler does: match the prompt (``match_kv_cache``), lock the matched node,
take a req_to_token row and KV slots (``alloc_token_slots``, which evicts
through the tree), then finish through SGLang's own ``release_kv_cache``.
No model runs: the KV *content* is not what these tests look at, the tree is.
"""

from __future__ import annotations

import itertools
import os
import warnings
from array import array

import pytest

if os.environ.get("KVTTL_REQUIRE_SGLANG") == "1":
    import sglang  # noqa: F401  (the SGLang test run must not skip)
else:
    pytest.importorskip("sglang", reason="SGLang runs in its own venv (scripts/test.sh makes .venv-sglang)")

warnings.filterwarnings("ignore", message=r"Only CUDA")
import torch  # noqa: E402
from sglang.srt.managers.kv_hints import decode_kv_hints_envelope  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req  # noqa: E402
from sglang.srt.mem_cache.allocation import alloc_req_slots, alloc_token_slots  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.common import match_kv_cache, release_kv_cache  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.unified_cache.components import ComponentType  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.runtime_context import publish  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from kvttl_sglang import make_kv_hints  # noqa: E402
from kvttl_sglang.cache import KvttlRadixCache  # noqa: E402

_published = False
_rids = itertools.count()
_entries = itertools.count(1)


def publish_server_args() -> None:
    """SGLang's request and cache code read the process-wide config; publish a CPU one once."""
    global _published
    if not _published:
        import atexit
        import shutil
        import tempfile

        import transformers

        model_dir = tempfile.mkdtemp(prefix="kvttl-sglang-model-")  # a config only: no weights load
        atexit.register(shutil.rmtree, model_dir, ignore_errors=True)
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=2048,
                                 architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
        publish(ServerArgs(model_path=model_dir, device="cpu"), role="scheduler")
        _published = True


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_cache(kind: str = "kvttl", *, tokens: int = 256, rows: int = 8, clock=None, config=None, tp_group=None,
               metrics: bool = False, queue_clock=None):
    """A real cache over a real MHA token pool (2 layers, fp16, CPU); ``metrics``:
    as under SGLang's --enable-metrics; ``queue_clock``: what the waiting
    queue's entry stamps are on (SGLang's is perf_counter; here ``clock``
    unless given, so a test that moves its clock moves queue time too)."""
    publish_server_args()
    kv = MHATokenToKVPool(size=tokens, page_size=1, dtype=torch.float16, head_num=2, head_dim=4, layer_num=2,
                          device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(tokens, torch.float16, "cpu", kv, need_sort=False)
    req_to_token = ReqToTokenPool(size=rows, max_context_len=4 * tokens, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_to_token, token_to_kv_pool_allocator=allocator,
                             page_size=1, tree_components=(ComponentType.FULL,), tp_cache_group=tp_group,
                             enable_metrics=metrics)
    import contextlib

    from sglang.srt.runtime_context import get_parallel

    # a server publishes its ranks before building the cache; SGLang's metric labels read them
    ranks = get_parallel().override(tp_rank=0, pp_rank=0) if metrics else contextlib.nullcontext()
    with ranks:
        if kind == "kvttl":
            clock = clock or FakeClock()
            return KvttlRadixCache(params, config=config or {}, clock=clock, queue_clock=queue_clock or clock)
        return UnifiedRadixCache(params)


class Turn:
    """One request in flight: admitted (matched, locked, allocated), not yet finished."""

    def __init__(self, cache, prompt, n_out, *, hints=None, cache_salt=None, entered=None):
        self.cache = cache
        self.req = Req(f"r{next(_rids)}", "", array("q", prompt), SamplingParams(max_new_tokens=n_out),
                       kv_hints=decode_kv_hints_envelope(hints) if hints is not None else None,
                       cache_salt=cache_salt)
        self.n_out = n_out
        # the scheduler stamps a request when it enters the waiting queue: here on the cache's queue
        # clock, a nanosecond per request later than the one before, so that stamps keep arrival order
        if entered is None:
            entered = getattr(cache, "_queue_clock", lambda: 0.0)() + next(_entries) * 1e-9
        self.req.time_stats.wait_queue_entry_time = float(entered)

    def arrive(self):
        """The scheduler matches a waiting request (calc_priority, init_next_round_input)."""
        match_kv_cache(self.req, self.cache)
        return self

    def admit(self):
        """PrefillAdder locks the matched node; prepare_for_extend takes a row and slots."""
        cache, req = self.cache, self.req
        match_kv_cache(req, cache)
        req.lock = cache.lock(req.last_node)
        alloc_req_slots(cache.req_to_token_pool, [req], cache)
        prefix = req.prefix_len
        total = len(req.origin_input_ids) + self.n_out
        new = alloc_token_slots(cache, total - prefix)  # evicts through the tree when short
        row = cache.req_to_token_pool
        if prefix:
            row.write((req.kv.req_pool_idx, slice(0, prefix)), cache.path_device_indices(req.last_node)[:prefix].to(row.req_to_token.dtype))
        row.write((req.kv.req_pool_idx, slice(prefix, total)), new.to(row.req_to_token.dtype))
        req.kv.cache_protected_len = prefix
        req.kv.kv_committed_len = req.kv.kv_allocated_len = total
        return self

    def finish(self, *, abort: bool = False):
        """Decode produced n_out tokens; the request finishes through SGLang's release path."""
        req = self.req
        req.output_ids = array("q", [1_000_000 + i for i in range(self.n_out)])
        req.finished_reason = FINISH_ABORT("aborted by test") if abort else FINISH_LENGTH(length=self.n_out)
        release_kv_cache(req, self.cache, checkpoint=not abort)
        return self

    @property
    def context(self) -> list[int]:
        return list(self.req.origin_input_ids) + list(self.req.output_ids)

    @property
    def prefix_len(self) -> int:
        return self.req.prefix_len


def run_turn(cache, prompt, n_out=8, **hint_kwargs):
    """A whole turn: arrive, admit, finish. hint_kwargs go to make_kv_hints (program_id=...)."""
    hints = make_kv_hints(**hint_kwargs) if hint_kwargs else None
    return Turn(cache, prompt, n_out, hints=hints).arrive().admit().finish()


def tokens(seed: int, n: int) -> list[int]:
    """Distinct token streams per seed (ids never collide with outputs)."""
    return [seed * 10_000 + i for i in range(n)]


def locked_tokens(cache) -> int:
    return cache.protected_size()


def assert_no_leak(cache):
    """Everything the tree holds is unlocked and every slot is accounted for."""
    assert cache.protected_size() == 0, f"{cache.protected_size()} tokens still locked"
    total = cache.token_to_kv_pool_allocator.size
    assert cache.token_to_kv_pool_allocator.available_size() + cache.evictable_size() == total


def _kv_content(token_ids, layer: int, which: int, shape) -> torch.Tensor:
    """The KV a model would write for these tokens at positions 0..n-1 (a
    stand-in: any function of token and position, exact in fp16)."""
    tok = torch.tensor(list(token_ids), dtype=torch.int64)
    base = (tok * 7 + torch.arange(len(tok)) * 3 + layer * 11 + which * 5) % 1024
    return (base.view(-1, 1, 1) + torch.arange(shape[1] * shape[2]).view(1, shape[1], shape[2])).to(torch.float16)


def write_kv(turn: Turn) -> None:
    """The forward pass of an admitted turn: writes its whole context's KV
    (the prefix it matched is rewritten with the same values)."""
    cache, req = turn.cache, turn.req
    total = len(req.origin_input_ids) + turn.n_out
    row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :total].long()
    ids = list(req.origin_input_ids) + [1_000_000 + i for i in range(turn.n_out)]
    kv = cache.token_to_kv_pool_allocator.get_kvcache()
    for layer in range(len(kv.k_buffer)):
        for which, buffers in enumerate((kv.k_buffer, kv.v_buffer)):
            buffers[layer][row] = _kv_content(ids, layer, which, buffers[layer].shape)


def kv_matches(cache, indices, token_ids) -> bool:
    """Whether the KV at pool ``indices`` is what ``token_ids`` at positions 0.. wrote."""
    kv = cache.token_to_kv_pool_allocator.get_kvcache()
    idx = indices.long()
    return all(torch.equal(buffers[layer][idx], _kv_content(token_ids, layer, which, buffers[layer].shape))
               for layer in range(len(kv.k_buffer)) for which, buffers in enumerate((kv.k_buffer, kv.v_buffer)))
