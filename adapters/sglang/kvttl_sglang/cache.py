"""KvttlRadixCache: Continuum-style TTL leases inside SGLang's unified radix tree.

A lease is one SGLang tree lock (``UnifiedRadixCache.lock``) on the node a
finished turn's insert ended on, so the whole path from the root stays out of
eviction. This module only translates: the lifecycle (programs, TTLs,
grants, hand-over, expiry, revocation in the policy's order, counters) is
the engine kit's (``kvttl.kit.EngineKit``), over one block id per KV page.

The hooks, all on the scheduler thread, all called identically on every
tensor-parallel rank (SGLang's own contract for its cache):

- ``match_prefix``   a hinted request is matched for the first time: ``kit.arrived``
- (any hook)         a hinted request now holds its lock: ``kit.admitted`` (SGLang
                     has no admission callback, so :meth:`tick` looks)
- ``on_release``     a turn ended: ``kit.finished`` -- TTL, grant (lock
                     ``req.last_node``), or release on a last turn or an abort
- ``evict`` / ``evict_for_alloc``
                     due leases go, SGLang evicts what is unlocked, and only
                     when that falls short are leases revoked and evicted
                     again: a pin never makes SGLang retract a running request
- ``on_batch_result`` (from the hook after ``Scheduler.process_batch_result``)
                     a prefill step is timed (``kit.observe_step``: the
                     re-prefill cost the TTL rule weighs is this engine's),
                     and returning turns with their first output token say
                     so (``kit.first_token``)
- ``relieve_pressure`` (from the scheduling hook, see ``plugin.py``) the head
                     of the waiting queue does not fit: leases are revoked as
                     the policy allows (later programs only, unless nothing
                     runs); a pass where the head fits reads no clock

With a host tier (``host_tier_blocks`` or ``host_tier_gib``), a lease that
expires or is revoked -- and, under the default ``on_unpin``, a turn that got
none -- is copied to host memory while its pages are still locked, and a
hinted request's ``match_prefix`` reloads the pages the device lost into
fresh slots and inserts them into the tree, so SGLang sees an ordinary
device hit. Why not SGLang's HiCache: it is the same tree class, but its host
pool is registered with the CUDA runtime and its controller runs on device
streams, so it cannot run (or be tested) without a GPU; and it backs up
nodes by tree policy (on insert or on eviction), not by lease. The two are
alternatives: kvttl refuses to start with both.

Time: every decision reads one clock value per call, agreed across ranks
(``all_reduce(MAX)`` of each rank's clock; only in calls about hinted requests
or while leases exist), so deadlines, policy inputs and expiry are the same on
every rank and each rank expires the same leases at the same call.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import attrs
import torch

from kvttl.errors import BadArgumentError
from kvttl.kit import (HOST_TIER_KEYS, EngineKit, HostIndex, KitConfig, hint_report, host_tier_slots, page_hashes,
                       payload_from_envelope, read_hints)
from kvttl.kit import load_config as load_kit_config
from kvttl.policy import TurnHints
from kvttl_sglang.metrics import KvttlMetrics
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, InsertParams
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

logger = logging.getLogger("kvttl.sglang")

__all__ = ["KvttlRadixCache", "turn_hints", "load_config", "CONFIG_ENV"]

#: Where the server's kvttl settings come from: a JSON object.
CONFIG_ENV = "KVTTL_SGLANG_CONFIG"


def load_config(text: str | None = None) -> KitConfig:
    """The adapter's settings from ``$KVTTL_SGLANG_CONFIG`` (or ``text``), a
    JSON object of ``kvttl.kit.KitConfig`` keys and the host tier's size
    (``host_tier_blocks`` or ``host_tier_gib``). Unknown keys and bad values
    fail here, at server start, naming the key."""
    return _load_config(text)[0]


def _load_config(text: str | None) -> tuple[KitConfig, dict]:
    text = os.environ.get(CONFIG_ENV, "") if text is None else text
    given = {}
    if text.strip():
        try:
            given = json.loads(text)
        except ValueError as e:
            raise BadArgumentError(f"{CONFIG_ENV} is not JSON: {e}") from None
    config, extras = load_kit_config(given, source=CONFIG_ENV, extra_keys=HOST_TIER_KEYS)
    host_tier_slots(extras, 1, source=CONFIG_ENV)  # values checked now; the size in bytes comes with the pool
    return config, extras


def isolation_key(req) -> str:
    """The request's tenant: SGLang's own cache-isolation key, the
    ``extra_key`` (LoRA id included) and ``cache_salt`` its radix tree keys
    prefixes by. Program ids are scoped by it."""
    extra, salt = getattr(req, "extra_key", None) or "", getattr(req, "cache_salt", None) or ""
    return f"{extra}\0{salt}" if extra or salt else ""


def turn_hints(req, errors: list | None = None) -> TurnHints | None:
    """The kvttl hints a request carries in ``kv_hints`` (action type
    ``kvttl.turn``), or None. Bad hints are dropped with a warning (and why,
    appended to ``errors``)."""
    return read_hints(payload_from_envelope(getattr(req, "kv_hints", None)), log=logger,
                      request=getattr(req, "rid", "?"), tenant=isolation_key(req),
                      quota=getattr(req, "extra_key", None) or "", errors=errors)


#: The key of the lease report in SGLang's response ``meta_info`` (a
#: request-level ``customized_info`` entry: plugin.py marks it so).
REPORT_KEY = "kvttl"


def _report(req, report: dict) -> None:
    """Puts the turn's lease report where SGLang carries per-request output
    fields to the client: ``meta_info["kvttl"]`` is ``[report]``."""
    info = req.customized_info if req.customized_info is not None else {}
    info[REPORT_KEY] = [report]
    req.customized_info = info


_UNPARSED = object()
_NO_BYTES = {"offloaded_bytes": 0, "reloaded_bytes": 0}


def _hints_of(req) -> TurnHints | None:
    """turn_hints, parsed once per request (a bad hint warns once, not on every
    scheduling pass): the result rides on the request, so it goes with it."""
    if req.kv_hints is None:
        return None
    hints = getattr(req, "_kvttl_hints", _UNPARSED)
    if hints is _UNPARSED:
        errors = []
        hints = req._kvttl_hints = turn_hints(req, errors)
        req._kvttl_hint_errors = errors
    return hints


def _chunk_tokens() -> int | None:
    """SGLang's chunked-prefill size (a prompt longer than it is prefilled
    over several steps, each paying the step's fixed cost), None when off or
    not published."""
    try:
        from sglang.srt.runtime_context import get_server_args

        size = getattr(get_server_args(), "chunked_prefill_size", None)
    except (ImportError, ValueError):  # an SGLang without them, or none published (a cache outside a server)
        return None
    return size if isinstance(size, int) and size > 0 else None


def _entry_time(req) -> float:
    """When the request entered SGLang's waiting queue. Each rank stamps it with
    its own clock, but in the same arrival order, so comparisons between these
    stamps come out the same on every rank."""
    return getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0) or 0.0


@attrs.frozen
class _Context:
    """What a lease pins and what a host copy of it needs: the tree node the
    turn's insert ended on, and the tokens on the path to it (with the
    tenant, they name the pages' content in the host tier)."""

    node: object
    tokens: object  # the request's token ids, prompt then output
    tenant: str


class _Hooks:
    """kvttl.kit.EngineHooks over SGLang's radix tree: a lease's hold is a
    tree lock on the node the turn's insert ended on; a copy out goes to the
    host tier while that lock (or the fresh insert) keeps the pages."""

    def __init__(self, cache: "KvttlRadixCache"):
        self.cache = cache

    def pin(self, context: _Context):
        return self.cache.lock(context.node), context

    def unpin(self, hold, *, reason: str, copy_out: bool) -> None:
        lock, context = hold
        try:
            if copy_out:
                self.cache.host.offload(context)
        finally:
            self.cache.unlock(lock)

    def copy_out(self, context: _Context) -> None:
        self.cache.host.offload(context)


def _page_layers(kv_pool, page: int) -> list:
    """SGLang's KV pool as block-first layers of one page each: the MHA
    pool's per-layer K and V buffers (``[tokens, heads, dim]``), or the MLA
    pool's per-layer buffers, viewed ``[pages, page x row]``."""
    buffers = [*getattr(kv_pool, "k_buffer", ()), *getattr(kv_pool, "v_buffer", ())] or \
        list(getattr(kv_pool, "kv_buffer", ()))
    if not buffers:
        raise BadArgumentError(f"kvttl host tier: SGLang's {type(kv_pool).__name__} has no per-layer k_buffer/v_buffer "
                               "or kv_buffer; the host tier supports MHA and MLA token pools")
    layers = []
    for buf in buffers:
        if not buf.is_contiguous() or buf.shape[0] % page:
            raise BadArgumentError(f"kvttl host tier: a KV buffer of shape {tuple(buf.shape)} is not "
                                   f"{page}-token pages of contiguous rows")
        layers.append(buf.view(buf.shape[0] // page, -1))
    return layers


class _HostTier:
    """The SGLang backend's host tier: the kit's ``HostIndex`` (which slot
    holds which page content, named by ``page_hashes`` of the tokens) and
    the swap layer's ``HostCopier`` over the KV pool's page layers. Copies
    run to completion on the scheduler thread, every rank the same ones;
    whether a copy worked is agreed across ranks (a copy that failed on any
    rank counts as failed on all), so every rank's index stays the same."""

    def __init__(self, cache: "KvttlRadixCache", num_slots: int, layers: list):
        from kvttl.swap.copier import HostCopier

        self.cache = cache
        self.page = cache._page
        self.index = HostIndex(num_slots)
        cuda = layers[0].is_cuda
        self.copier = HostCopier(layers, num_slots, after=torch.cuda.current_stream if cuda else None)
        self.stats = {"offloaded_bytes": 0, "reloaded_bytes": 0, "copy_failures": 0}

    def _copied(self, ok: bool, num_pages: int, key: str) -> bool:
        ok = self.cache._agree(ok)
        nbytes, seconds = self.copier.take_timing()
        if ok:
            self.stats[key] += num_pages * self.copier.slot_bytes
            if self.cache.tp_world_size == 1 and self.cache.pp_size == 1:  # rank timings differ: priors only
                self.cache.kit.observe_host_copy(nbytes, seconds)
        else:
            self.stats["copy_failures"] += 1
        return ok

    def offload(self, context: _Context) -> None:
        """Copies the pages on the path to ``context.node`` that the host
        tier does not hold yet."""
        indices = self.cache.path_device_indices(context.node)
        num_pages = len(indices) // self.page
        if not num_pages:
            return
        pages = (indices[:num_pages * self.page:self.page] // self.page).tolist()
        hashes = page_hashes(context.tokens[:num_pages * self.page], self.page, context.tenant)
        self.index.offload(pages, hashes)
        offloads, _ = self.index.take()
        if offloads and not self._copied(self.copier.offload(offloads), len(offloads), "offloaded_bytes"):
            self.index.forget([slot for _, slot in offloads])

    def reload(self, req, key, result) -> bool:
        """Reloads the pages of ``key`` past the device match ``result`` that
        the host holds (never the page of the last token: it is computed
        again) into fresh slots inserted into the tree. Whether any were."""
        page = self.page
        limit = (len(key) - 1) // page
        first = result.device_prefix_len // page
        if limit <= first:
            return False
        cached = getattr(req, "_kvttl_page_hashes", None)
        if cached is None or cached[0] != limit:
            cached = req._kvttl_page_hashes = (limit, page_hashes(key.raw_token_ids()[:limit * page], page,
                                                                  isolation_key(req)))
        slots = self.index.match(cached[1])
        if len(slots) <= first:
            self.index.release(slots)
            return False
        lock = self.cache.lock(result.last_device_node)  # the device part stays while slots are found
        try:
            return self._reload_pages(req, key, result, slots[first:], first)
        finally:
            self.cache.unlock(lock)
            self.index.release(slots)

    def _reload_pages(self, req, key, result, slots: list[int], first: int) -> bool:
        allocator = self.cache.token_to_kv_pool_allocator
        need = len(slots) * self.page
        if allocator.available_size() < need:  # room from unlocked nodes only: leases stay
            UnifiedRadixCache.evict(self.cache, EvictParams(num_tokens=need - allocator.available_size()))
        fresh = allocator.alloc(need) if allocator.available_size() >= need else None
        if fresh is None:
            return False
        pages = (fresh[::self.page] // self.page).tolist()
        failed = self.copier.reload(list(zip(slots, pages)))
        if not self._copied(not failed, len(slots), "reloaded_bytes"):
            allocator.free(fresh)
            self.index.forget([slot for slot, p in zip(slots, pages) if p in failed] or slots)
            return False
        start = first * self.page
        held = self.cache.path_device_indices(result.last_device_node)[:start]
        # prev_prefix_len: the head is the tree's own (SGLang's load-back passes it too); past it, the
        # insert itself frees whatever fresh slots duplicate what the tree holds
        self.cache.insert(InsertParams(key=key[:start + need], value=torch.cat([held, fresh.to(held.dtype)]),
                                       prev_prefix_len=start))
        req._kvttl_reloaded = need
        return True

    def reset(self) -> None:
        self.index.reset()


class KvttlRadixCache(UnifiedRadixCache):
    """UnifiedRadixCache whose finished turns may keep their KV under a TTL lease.

    The kit's block ids are KV pages (``index // page_size``), so the
    pinned-share cap counts distinct pinned pages when programs share a
    prefix, while SGLang's tree lock does the actual pinning.
    """

    def __init__(self, params, *, config: dict | None = None, clock: Callable[[], float] | None = None,
                 queue_clock: Callable[[], float] = time.perf_counter):
        super().__init__(params)
        #: the clock SGLang stamps a request's entry into the waiting queue with (how long a head waited)
        self._queue_clock = queue_clock
        self.kvttl_config, host_config = _load_config(None if config is None else json.dumps(config))
        if self.kvttl_config.tenant_field is not None:
            raise BadArgumentError("kvttl config: tenant_field is for vLLM; on SGLang a gateway sets the tenant in "
                                   "the request's extra_key (or cache_salt), which already scopes program ids")
        # Queue keys compare each rank's own entry stamps; "arrival - jump" against another request's
        # stamp could order differently on two ranks, and the ranks must schedule alike.
        self._ordinal_arrivals = self.tp_world_size > 1 or self.pp_size > 1
        if self._ordinal_arrivals:
            logger.info("kvttl: queue jumps are not bounded under tensor/pipeline parallelism (rank clocks): "
                        "program FCFS")
        self._clock = clock or time.time
        allocator = self.token_to_kv_pool_allocator
        self._page = max(1, int(self.page_size))
        num_pages = int(allocator.size) // self._page + 2  # slot 0 is SGLang's padding
        self.host: _HostTier | None = None
        if host_tier_slots(host_config, 1, source=CONFIG_ENV):
            if self.pp_size > 1:  # SGLang's all-reduce agrees within stage 0 only: a later stage's failed copy
                raise BadArgumentError(  # would go unseen, and its tree would hold KV it never got
                    "kvttl's SGLang host tier does not run under pipeline parallelism (pp_size > 1)")
            layers = _page_layers(allocator.get_kvcache(), self._page)
            page_bytes = sum(layer[0].numel() * layer.element_size() for layer in layers)
            self.host = _HostTier(self, host_tier_slots(host_config, page_bytes, source=CONFIG_ENV), layers)
        self.kit = EngineKit(_Hooks(self), num_blocks=num_pages, block_size=self._page, config=self.kvttl_config,
                             clock=self._now, has_host_tier=self.host is not None, chunk_tokens=_chunk_tokens(),
                             kv_bytes_per_token=self.host.copier.slot_bytes / self._page if self.host else 0.0,
                             ordinal_arrivals=self._ordinal_arrivals)
        collector = getattr(self, "metrics_collector", None)  # SGLang's own, with --enable-metrics
        self._metrics = KvttlMetrics(collector.labels) if collector is not None else None
        # request id -> request, for hinted requests not yet seen holding their lock
        self._waiting: dict[str, object] = {}
        self._idle_iterations = 0  # idle loop iterations since leases were last checked
        # set by the plugin when SGLang sleeps while idle (an iteration then
        # waits up to a second for a request): check at every idle iteration
        self._sleeps_on_idle = False
        self._last_result_at: float | None = None  # time.monotonic() of the last batch result seen
        logger.info("kvttl radix cache: policy %s, pinned-share cap %.2f, %d pages",
                    self.kvttl_config.policy, self.kvttl_config.pinned_share_cap, num_pages)

    @property
    def stats(self) -> dict:
        """Lease events (the kit's) and, with a host tier, bytes copied each way."""
        return self.kit.stats if self.host is None else {**self.kit.stats, **self.host.stats}

    def _publish(self) -> None:
        """Brings the Prometheus series up to date (nothing to do when off or unchanged)."""
        if self._metrics is not None:
            host = self.host
            self._metrics.publish(self.kit, host.stats if host is not None else _NO_BYTES,
                                  host.index.num_filled if host is not None else 0)

    def init_hicache(self, server_args, params) -> None:
        if self.host is not None:
            raise BadArgumentError("kvttl's host tier (host_tier_blocks / host_tier_gib) and SGLang's HiCache "
                                   "(--enable-hierarchical-cache) are two host tiers for the same pages: use one")
        super().init_hicache(server_args, params)

    # ---- time -----------------------------------------------------------------
    def _now(self) -> float:
        """One clock reading every rank agrees on. Called only while leases or
        hinted requests exist, so every rank calls it at the same point of
        the same call."""
        return self._agreed_max(float(self._clock()))[0]

    def _agreed_max(self, *values: float) -> list[float]:
        """Each value's maximum over the ranks, in one collective (none on one rank)."""
        if self.tp_world_size > 1 or self.pp_size > 1:
            t = torch.tensor(values, dtype=torch.float64)
            self._all_reduce(t, torch.distributed.ReduceOp.MAX)
            return t.tolist()
        return list(values)

    def _agree(self, ok: bool) -> bool:
        """True only if ``ok`` on every tensor-parallel rank (a collective; the
        host tier refuses pipeline parallelism)."""
        if self.tp_world_size > 1:
            t = torch.tensor([1 if ok else 0], dtype=torch.int32)
            self._all_reduce(t, torch.distributed.ReduceOp.MIN)
            ok = bool(t.item())
        return ok

    #: on an idle scheduler, leases are checked every this many idle loop
    #: iterations (SGLang's loop polls for requests while idle: thousands a
    #: second, or one a second with --sleep-on-idle)
    idle_tick_every = 64

    def on_idle(self) -> None:
        """SGLang's scheduler found nothing to run (plugin.py's hook on
        ``Scheduler.on_idle``): due leases expire now, not at the next request.
        The gate is an iteration count, not a clock: tensor-parallel ranks run
        the loop in lockstep, so all of them reach the agreed clock's
        collective at the same iteration."""
        if not self.kit.num_leases or self.pp_size > 1:  # pipeline stages idle apart: not in lockstep
            self._idle_iterations = 0
            return
        self._idle_iterations += 1
        if self._idle_iterations >= self.idle_tick_every or self._sleeps_on_idle:
            self._idle_iterations = 0
            self.tick()

    def tick(self) -> float | None:
        """Drop due leases and notice admissions; the agreed time, or None when
        there was nothing to do (and no clock was read)."""
        if not self.kit.num_leases and not self._waiting:
            return None
        now = self._now()
        self.kit.tick(now)
        for rid, req in list(self._waiting.items()):
            if req.lock is not None:  # admitted: it holds its own prefix; the old lease can go
                self._admitted(rid, req, now)
            elif req.finished() and not req.kv.holds_kv:  # gone before it ever ran
                del self._waiting[rid]
                self.kit.finished(rid, blocks=(), num_tokens=0, free_blocks=0, aborted=True, now=now)
        self._publish()
        return now

    def on_batch_result(self, batch) -> None:
        """SGLang processed one forward's result (the plug-in's hook after
        ``Scheduler.process_batch_result``; every rank, the same batch).

        A prefill (extend) step is timed from its launch, or from the previous
        result when that came later (with overlap scheduling the next batch
        launches before this one's result is read), to now, and goes to the
        kit's step-cost line with its new tokens: Reload(r) then follows this
        engine's prefill rate, not the configured prior. Decode steps are not
        timed: they add no prefill tokens, and each would cost a collective
        under tensor parallelism. Then the batch's returning turns report
        admission (if no other hook saw it first) and, once they have an output
        token, their first token: the policy's T runs to it.

        Under tensor parallelism the step time and the clock are agreed (one
        all-reduce), and only while the kit has turns in flight, which every
        rank knows alike; on one rank every prefill step counts. Under
        pipeline parallelism nothing is timed (a stage sees the micro-batch
        cadence, not a prefill's cost), nor on a disaggregated decode server
        (no prefill runs there): returning turns then report at admission.
        Not subtracted: a pause (``pause_generation``) between a step and its
        result, and host-tier copies made inside the step's result processing."""
        done = time.monotonic()
        last, self._last_result_at = self._last_result_at, done
        mode = batch.forward_mode
        if (mode is None or not mode.is_extend_without_speculative() or self.pp_size > 1
                or (batch.decoding_reqs is not None and batch.decoding_reqs is batch.reqs)):
            return  # not a prefill, or decode viewed as 1-token extends (DP attention), or a later stage's cadence
        kit = self.kit
        kit.times_first_tokens = True  # (not on a disaggregated decode server: it runs no prefill)
        parallel = self.tp_world_size > 1
        if parallel and not kit.num_turns_in_flight:
            return
        launched = batch.launch_ts if batch.launch_ts is not None else done
        if mode.is_split_prefill() and batch.split_prefill_start is not None:
            launched = batch.split_prefill_start[1]  # the result comes once, after the last split
        seconds = max(0.0, done - (launched if last is None else max(launched, last)))
        tokens = int(batch.extend_num_tokens or 0)
        awaiting = [r for r in batch.reqs if r.rid in self._waiting or r.rid in kit.awaiting_first_token]
        if not awaiting and not tokens:
            return
        seconds, now = self._agreed_max(seconds, float(self._clock())) if awaiting or parallel else (seconds, None)
        if tokens:
            kit.observe_step(tokens, seconds)
        for req in awaiting:
            if req.rid in self._waiting and req.lock is not None:
                self._admitted(req.rid, req, now)
            if req.rid in kit.awaiting_first_token and len(req.output_ids):
                kit.first_token(req.rid, now=now)
        if awaiting:
            self._publish()  # an admission hands the old lease over

    def _admitted(self, rid: str, req, now: float) -> None:
        del self._waiting[rid]
        # what the device kept, as vLLM reports it: tokens the host tier brought back do not count
        # (its last match before the lock: by now a chunk's checkpoint may have advanced req.prefix_len)
        matched = getattr(req, "_kvttl_device_match", None)
        matched = int(getattr(req, "prefix_len", 0) or 0) if matched is None else matched
        kept = matched - getattr(req, "_kvttl_reloaded", 0)
        self.kit.admitted(rid, device_hit_tokens=max(0, kept), now=now)

    # ---- SGLang hooks -----------------------------------------------------------
    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        if req is None or req.kv_hints is None:
            return result
        if self.host is not None and _hints_of(req) is not None and self.host.reload(req, params.key, result):
            result = super().match_prefix(params)
        if req.lock is None:  # not admitted yet: what the device holds for it, before any chunk of it
            req._kvttl_device_match = int(result.device_prefix_len)  # (a chunk's checkpoint moves prefix_len)
        if not getattr(req, "_kvttl_arrived", False):
            hints = _hints_of(req)
            if hints is not None:
                req._kvttl_arrived = True
                now = self.tick()
                # (with hicache storage or LMCache, SGLang matches a request before it stamps its queue
                # entry: the stamp it is about to take is this moment on the same clock)
                arrival = _entry_time(req) or self._queue_clock()
                self.kit.arrived(req.rid, hints, prompt_tokens=len(req.origin_input_ids), arrival=arrival,
                                 now=self._now() if now is None else now)
                self._waiting[req.rid] = req
        self._publish()
        return result

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        if req.kv_hints is None or not req.finished():  # not finished: a retraction, the turn goes on
            return
        turn = self.kit.turn(req.rid)
        if turn is None:
            errors = getattr(req, "_kvttl_hint_errors", None)
            if errors:  # its hints were unusable: the client learns why, not only the log
                _report(req, hint_report(errors))
            return
        hints = turn.hints
        now = self.tick()
        now = self._now() if now is None else now  # deadlines and policy inputs: agreed values only
        if req.rid in self._waiting:  # it ran and finished between two looks
            self._admitted(req.rid, req, now)
        node = req.last_node
        pages = []
        if checkpointed and node is not None and not self.is_root(node):
            pages = torch.unique(self.path_device_indices(node) // self._page).tolist()
        free_tokens = self.token_to_kv_pool_allocator.available_size() + self.evictable_size()
        req._kvttl_outcome = self.kit.finished(  # what became of it, for whoever reports on the request
            req.rid, blocks=pages, num_tokens=len(req.origin_input_ids) + len(req.output_ids),
            free_blocks=min(self.kit.num_blocks, free_tokens // self._page),
            pin_ref=_Context(node, req.origin_input_ids + req.output_ids, isolation_key(req)),
            aborted=isinstance(req.finished_reason, FINISH_ABORT), now=now)
        _report(req, req._kvttl_outcome.report(hints))
        self._publish()

    def evict(self, params: EvictParams) -> EvictResult:
        return self._evict_with_leases(params, lambda p: super(KvttlRadixCache, self).evict(p))

    def evict_for_alloc(self, params: EvictParams, *, allocation_reclaim_satisfied=None) -> EvictResult:
        return self._evict_with_leases(params, lambda p: super(KvttlRadixCache, self).evict_for_alloc(
            p, allocation_reclaim_satisfied=allocation_reclaim_satisfied))

    def _evict_with_leases(self, params: EvictParams, evict_unlocked) -> EvictResult:
        now = self.tick()
        allocator = self.token_to_kv_pool_allocator
        want = int(params.num_tokens or 0)
        target = allocator.available_size() + want  # SGLang's meaning: a shortfall to cover
        result = evict_unlocked(params)
        while self.kit.num_leases and want > 0 and allocator.available_size() < target:
            self.kit.revoke(num_leases=1, idle=True, now=now)  # the allocation must not fail: any lease may go
            more = super().evict(EvictParams(num_tokens=target - allocator.available_size()))
            result.num_tokens_evicted += more.num_tokens_evicted
            result.swa_num_tokens_evicted += more.swa_num_tokens_evicted
            result.mamba_num_evicted += more.mamba_num_evicted
        self._publish()
        return result

    # ---- scheduling (called by plugin.py's calc_priority hook) ------------------------
    def queue_key(self, req) -> tuple:
        """The policy's order (Continuum: program-level FCFS, pinned programs
        first); requests without a program are programs of one turn."""
        hints = _hints_of(req)
        return self.kit.queue_key(hints.key if hints is not None else None, _entry_time(req))

    def relieve_pressure(self, waiting_queue, running_batch=None) -> int:
        """Revoke leases while the head of the queue cannot fit, as the
        policy allows: under program FCFS only leases of programs that
        arrived after the head's, unless nothing runs (then any lease may go:
        pins never stop the engine); a head without a program also those it
        has waited out (``EngineKit.revoke``). Returns leases revoked."""
        if not waiting_queue or not self.kit.num_leases:
            return 0
        head = waiting_queue[0]
        need = len(head.origin_input_ids) + len(head.output_ids) - int(getattr(head, "prefix_len", 0) or 0)
        if self.token_to_kv_pool_allocator.available_size() + self.evictable_size() >= need:
            return 0  # it fits: no clock reading (a collective under TP) on this scheduling pass
        now = self.tick()  # due leases first: they may be enough
        hints = _hints_of(head)
        program = self.kit.programs.get(hints.key) if hints is not None else None
        arrival = program.first_arrival if program is not None else _entry_time(head)
        # (queue jumps, and so waiting them out, are off under TP / PP: rank clocks differ)
        waited = self._queue_clock() - arrival if program is None and arrival and not self._ordinal_arrivals else None
        idle = running_batch is None or running_batch.is_empty()
        revoked = 0
        while self.token_to_kv_pool_allocator.available_size() + self.evictable_size() < need:
            gone = self.kit.revoke(num_leases=1, requester=head.rid if hints is not None else None,
                                   arrival=arrival, waited_s=waited, idle=idle, now=now)
            if not gone:
                break
            revoked += len(gone)
        self._publish()
        return revoked

    # ---- introspection and teardown ----------------------------------------------------
    @property
    def num_leases(self) -> int:
        return self.kit.num_leases

    def leased_tokens(self) -> int:
        return sum(lease.num_tokens for lease in self.kit.leases())

    def lease_of(self, program_id, *, tenant: str = ""):
        """The lease of ``program_id`` within ``tenant`` (``isolation_key`` of its requests)."""
        return self.kit.lease_of(program_id, tenant=tenant)

    def release_all_leases(self) -> int:
        return self.kit.release_all()

    def reset(self) -> None:
        # SGLang's reset (flush_cache) rebuilds the tree: every lock is gone with it.
        kit = getattr(self, "kit", None)
        if kit is not None:
            kit.reset()
            self._waiting.clear()
        if getattr(self, "host", None) is not None:  # a flush (as after a weight update) empties it too
            self.host.reset()
        super().reset()
        if kit is not None:
            self._publish()
