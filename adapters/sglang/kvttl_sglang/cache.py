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
- ``relieve_pressure`` (from the scheduling hook, see ``plugin.py``) the head
                     of the waiting queue does not fit: leases are revoked as
                     the policy allows (later programs only, unless nothing
                     runs); a pass where the head fits reads no clock

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
from kvttl.kit import EngineKit, KitConfig, hint_report, payload_from_envelope, read_hints
from kvttl.kit import load_config as load_kit_config
from kvttl.policy import TurnHints
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

logger = logging.getLogger("kvttl.sglang")

__all__ = ["KvttlRadixCache", "turn_hints", "load_config", "CONFIG_ENV"]

#: Where the server's kvttl settings come from: a JSON object.
CONFIG_ENV = "KVTTL_SGLANG_CONFIG"


def load_config(text: str | None = None) -> KitConfig:
    """The adapter's settings from ``$KVTTL_SGLANG_CONFIG`` (or ``text``), a
    JSON object of ``kvttl.kit.KitConfig`` keys. Unknown keys and bad values
    fail here, at server start, naming the key."""
    text = os.environ.get(CONFIG_ENV, "") if text is None else text
    given = {}
    if text.strip():
        try:
            given = json.loads(text)
        except ValueError as e:
            raise BadArgumentError(f"{CONFIG_ENV} is not JSON: {e}") from None
    return load_kit_config(given, source=CONFIG_ENV)[0]


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


def _entry_time(req) -> float:
    """When the request entered SGLang's waiting queue. Each rank stamps it with
    its own clock, but in the same arrival order, so comparisons between these
    stamps come out the same on every rank."""
    return getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0) or 0.0


class _Hooks:
    """kvttl.kit.EngineHooks over SGLang's radix tree: a lease's hold is a
    tree lock on the node the turn's insert ended on."""

    def __init__(self, cache: "KvttlRadixCache"):
        self.cache = cache

    def pin(self, node):
        return self.cache.lock(node)

    def unpin(self, lock, *, reason: str, copy_out: bool) -> None:
        self.cache.unlock(lock)

    def copy_out(self, node) -> None:  # no host tier here: the kit never asks
        raise NotImplementedError("kvttl's SGLang backend has no host tier")


class KvttlRadixCache(UnifiedRadixCache):
    """UnifiedRadixCache whose finished turns may keep their KV under a TTL lease.

    The kit's block ids are KV pages (``index // page_size``), so the
    pinned-share cap counts distinct pinned pages when programs share a
    prefix, while SGLang's tree lock does the actual pinning.
    """

    def __init__(self, params, *, config: dict | None = None, clock: Callable[[], float] | None = None):
        super().__init__(params)
        self.kvttl_config = load_config(None if config is None else json.dumps(config))
        if self.kvttl_config.tenant_field is not None:
            raise BadArgumentError("kvttl config: tenant_field is for vLLM; on SGLang a gateway sets the tenant in "
                                   "the request's extra_key (or cache_salt), which already scopes program ids")
        if self.tp_world_size > 1 or self.pp_size > 1:
            # Queue keys compare each rank's own entry stamps; "arrival - jump" against another request's
            # stamp could order differently on two ranks, and the ranks must schedule alike.
            logger.info("kvttl: queue jumps are not bounded under tensor/pipeline parallelism (rank clocks)")
            self.kvttl_config = attrs.evolve(self.kvttl_config, max_queue_jump_s=None, max_queue_jump_prefills=None)
        self._clock = clock or time.time
        allocator = self.token_to_kv_pool_allocator
        self._page = max(1, int(self.page_size))
        num_pages = int(allocator.size) // self._page + 2  # slot 0 is SGLang's padding
        self.kit = EngineKit(_Hooks(self), num_blocks=num_pages, block_size=self._page, config=self.kvttl_config,
                             clock=self._now)
        # request id -> request, for hinted requests not yet seen holding their lock
        self._waiting: dict[str, object] = {}
        self._idle_iterations = 0  # idle loop iterations since leases were last checked
        # set by the plugin when SGLang sleeps while idle (an iteration then
        # waits up to a second for a request): check at every idle iteration
        self._sleeps_on_idle = False
        logger.info("kvttl radix cache: policy %s, pinned-share cap %.2f, %d pages",
                    self.kvttl_config.policy, self.kvttl_config.pinned_share_cap, num_pages)

    @property
    def stats(self) -> dict:
        return self.kit.stats

    # ---- time -----------------------------------------------------------------
    def _now(self) -> float:
        """One clock reading every rank agrees on. Called only while leases or
        hinted requests exist, so every rank calls it at the same point of
        the same call."""
        now = float(self._clock())
        if self.tp_world_size > 1 or self.pp_size > 1:
            t = torch.tensor([now], dtype=torch.float64)
            self._all_reduce(t, torch.distributed.ReduceOp.MAX)
            now = float(t.item())
        return now

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
        return now

    def _admitted(self, rid: str, req, now: float) -> None:
        del self._waiting[rid]
        self.kit.admitted(rid, device_hit_tokens=int(getattr(req, "prefix_len", 0) or 0), now=now)

    # ---- SGLang hooks -----------------------------------------------------------
    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        if req is not None and req.kv_hints is not None and not getattr(req, "_kvttl_arrived", False):
            hints = _hints_of(req)
            if hints is not None:
                req._kvttl_arrived = True
                now = self.tick()
                self.kit.arrived(req.rid, hints, prompt_tokens=len(req.origin_input_ids), arrival=_entry_time(req),
                                 now=self._now() if now is None else now)
                self._waiting[req.rid] = req
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
            free_blocks=min(self.kit.num_blocks, free_tokens // self._page), pin_ref=node,
            aborted=isinstance(req.finished_reason, FINISH_ABORT), now=now)
        _report(req, req._kvttl_outcome.report(hints))

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
        pins never stop the engine). Returns leases revoked."""
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
        idle = running_batch is None or running_batch.is_empty()
        revoked = 0
        while self.token_to_kv_pool_allocator.available_size() + self.evictable_size() < need:
            gone = self.kit.revoke(num_leases=1, requester=head.rid if hints is not None else None,
                                   arrival=arrival, idle=idle, now=now)
            if not gone:
                break
            revoked += len(gone)
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
        super().reset()
