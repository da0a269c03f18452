"""KvttlRadixCache: Continuum-style TTL leases inside SGLang's unified radix tree.

A lease is one SGLang tree lock (``UnifiedRadixCache.lock``) on the node a
finished turn's insert ended on, so the whole path from the root stays out of
eviction. kvttl's LeaseTable keeps the deadlines, owners and the pinned-share
cap over a mirror pool with one entry per KV page; SGLang keeps the memory.

The hooks, all on the scheduler thread, all called identically on every
tensor-parallel rank (SGLang's own contract for its cache):

- ``match_prefix``   a hinted turn is matched for the first time: its program
                     has returned; the old lease holds (without a deadline)
                     until the new turn holds its own lock
- ``on_release``     a turn ended: release on the last turn or an abort, else
                     ask the TTL policy and lock ``req.last_node``
- ``evict`` / ``evict_for_alloc``
                     drop due leases, let SGLang evict what is unlocked, and
                     only when that falls short revoke leases (latest program
                     first) and evict again: a pin never makes SGLang retract
                     a running request
- ``relieve_pressure`` (from the scheduling hook, see ``plugin.py``) the head
                     of the waiting queue does not fit: drop due leases, then
                     revoke leases of later programs, or any lease when nothing
                     runs; a pass where the head fits reads no clock

Time: every decision reads one clock value per call, agreed across ranks
(``all_reduce(MAX)`` of each rank's clock; only in calls about hinted requests
or while leases exist), so deadlines, policy inputs and expiry are the same on
every rank and each rank expires the same leases at the same call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import kvttl
from kvttl.errors import BadArgumentError
from kvttl.policy import TurnContext, TurnHints, get_policy, parse_turn_hints
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvttl_sglang.hints import HINT_ACTION_TYPE

logger = logging.getLogger("kvttl.sglang")

__all__ = ["KvttlRadixCache", "HINT_ACTION_TYPE", "turn_hints", "load_config", "CONFIG_ENV"]

#: Where the server's kvttl settings come from: a JSON object.
CONFIG_ENV = "KVTTL_SGLANG_CONFIG"

#: A program not heard of for this long (and holding nothing) is forgotten;
#: checked every FORGET_EVERY finished turns.
FORGET_AFTER_S = 3600.0
FORGET_EVERY = 1024

_DEFAULTS = {"ttl_policy": "continuum", "pinned_share_cap": 0.8, "reload_tokens_per_s": 10_000.0,
             "program_fcfs": True}


def load_config(text: str | None = None) -> dict:
    """The adapter's settings: defaults, overridden by ``$KVTTL_SGLANG_CONFIG``
    (or ``text``). Unknown keys and bad values fail here, at server start."""
    text = os.environ.get(CONFIG_ENV, "") if text is None else text
    config = dict(_DEFAULTS)
    if text.strip():
        try:
            given = json.loads(text)
        except ValueError as e:
            raise BadArgumentError(f"{CONFIG_ENV} is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise BadArgumentError(f"{CONFIG_ENV} must be a JSON object, got {type(given).__name__}")
        unknown = sorted(set(given) - set(_DEFAULTS))
        if unknown:
            raise BadArgumentError(f"{CONFIG_ENV}: unknown key(s) {unknown}; known: {sorted(_DEFAULTS)}")
        config.update(given)
    cap = config["pinned_share_cap"]
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= cap <= 1.0:
        raise BadArgumentError(f"pinned_share_cap must be a number in [0, 1], got {cap!r}")
    rate = config["reload_tokens_per_s"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise BadArgumentError(f"reload_tokens_per_s must be a positive number, got {rate!r}")
    get_policy(str(config["ttl_policy"]))  # an unknown policy fails at start, naming the known ones
    return config


def turn_hints(req) -> TurnHints | None:
    """The kvttl hints a request carries in ``kv_hints`` (action type
    ``kvttl.turn``), or None. Bad hints are dropped with a warning."""
    envelope = getattr(req, "kv_hints", None)
    if envelope is None:
        return None
    for action in getattr(envelope, "actions", ()) or ():
        if getattr(action, "action_type", None) != HINT_ACTION_TYPE:
            continue
        try:
            hints = parse_turn_hints(action.payload)
        except BadArgumentError as e:
            logger.warning("kvttl: ignoring the hints of request %s: %s", getattr(req, "rid", "?"), e)
            return None
        for problem in hints.warnings if hints is not None else ():
            logger.warning("kvttl: request %s: %s", getattr(req, "rid", "?"), problem)
        return hints
    return None


_UNPARSED = object()


def _hints_of(req) -> TurnHints | None:
    """turn_hints, parsed once per request (a bad hint warns once, not on every
    scheduling pass): the result rides on the request, so it goes with it."""
    if req.kv_hints is None:
        return None
    hints = getattr(req, "_kvttl_hints", _UNPARSED)
    if hints is _UNPARSED:
        hints = req._kvttl_hints = turn_hints(req)
    return hints


def _entry_time(req) -> float:
    """When the request entered SGLang's waiting queue. Each rank stamps it with
    its own clock, but in the same arrival order, so comparisons between these
    stamps come out the same on every rank."""
    return getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0) or 0.0


class _Program:
    """What kvttl remembers of one program between its turns. ``first_arrival``
    is the queue-entry stamp of its first turn: the program-FCFS key."""

    __slots__ = ("first_arrival", "finished_at", "tool", "context", "turns")

    def __init__(self, first_arrival: float):
        self.first_arrival = first_arrival
        self.finished_at: float | None = None
        self.tool = ""
        self.context = 0
        self.turns = 0


class KvttlRadixCache(UnifiedRadixCache):
    """UnifiedRadixCache whose finished turns may keep their KV under a TTL lease.

    Why a mirror pool: the LeaseTable already implements deadlines, replace-on-
    grant, owners and the pinned-share cap over block ids; giving it one id per
    KV page (``index // page_size``) lets it count distinct pinned pages when
    programs share a prefix, while SGLang's tree lock does the actual pinning.
    """

    def __init__(self, params, *, config: dict | None = None, clock: Callable[[], float] | None = None):
        super().__init__(params)
        self.kvttl_config = load_config(None if config is None else json.dumps(config))
        self._policy = get_policy(str(self.kvttl_config["ttl_policy"]))
        self._rate = float(self.kvttl_config["reload_tokens_per_s"])
        self._clock = clock or time.time
        allocator = self.token_to_kv_pool_allocator
        self._page = max(1, int(self.page_size))
        num_pages = int(allocator.size) // self._page + 2  # slot 0 is SGLang's padding
        self._mirror = kvttl.BlockPool(num_pages)
        self._mirror.allocate(num_pages)
        self._table = kvttl.LeaseTable(self._mirror, pinned_share_cap=float(self.kvttl_config["pinned_share_cap"]))
        self._locks: dict[Any, Any] = {}  # owner -> SGLang TreeLock held for its lease
        self._programs: dict[Any, _Program] = {}
        # owner -> (req, arrival, matched tokens) of a turn that came back, until it holds its lock
        self._returning: dict[Any, tuple] = {}
        self._releases = 0
        self.stats = {"granted": 0, "refused": 0, "hit": 0, "expired": 0, "revoked": 0, "released": 0}
        logger.info("kvttl radix cache: ttl policy %s, pinned-share cap %.2f, %d pages",
                    self.kvttl_config["ttl_policy"], self._table.pinned_share_cap, num_pages)

    # ---- time -----------------------------------------------------------------
    def _now(self) -> float:
        """One clock reading every rank agrees on. Called only while leases
        exist, so every rank calls it at the same point of the same call."""
        now = float(self._clock())
        if self.tp_world_size > 1 or self.pp_size > 1:
            t = torch.tensor([now], dtype=torch.float64)
            self._all_reduce(t, torch.distributed.ReduceOp.MAX)
            now = float(t.item())
        return now

    def _tick(self) -> float | None:
        """Drop due leases and finish hand-overs; the agreed time, or None when
        there was nothing to do (and no clock was read)."""
        if not self._table.num_leases and not self._returning:
            return None
        now = self._now()
        for lease in self._table.expire(now) if self._table.num_leases else ():
            self._unlock_owner(lease.owner, "expired")
        for owner, returning in list(self._returning.items()):
            self._try_hand_over(owner, returning, now)
        return now

    # ---- SGLang hooks -----------------------------------------------------------
    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        if req is not None and req.kv_hints is not None and not getattr(req, "_kvttl_arrived", False):
            hints = _hints_of(req)
            if hints is not None:
                req._kvttl_arrived = True
                self._on_arrival(req, hints, result)
        return result

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        if req.kv_hints is None or not req.finished():  # not finished: a retraction, the turn goes on
            return
        hints = _hints_of(req)
        if hints is None:
            return
        owner = hints.program_id
        now = self._tick()
        now = self._now() if now is None else now  # deadlines and policy inputs: agreed values only
        program = self._programs.get(owner)
        if program is None:
            program = self._programs[owner] = _Program(_entry_time(req))
        self._returning.pop(owner, None)
        program.turns += 1
        self._releases += 1
        if self._releases % FORGET_EVERY == 0:
            self._forget_idle_programs(now)
        aborted = isinstance(req.finished_reason, FINISH_ABORT)
        if hints.last_turn or aborted:
            self._drop(owner, "released")
            del self._programs[owner]
            if hints.last_turn and not aborted:
                self._policy.ttl.on_program_finished(program.turns)
            return
        node = req.last_node
        context = len(req.origin_input_ids) + len(req.output_ids)
        program.finished_at, program.tool, program.context = now, hints.tool, context
        if not checkpointed or node is None or self.is_root(node):
            self._drop(owner, "released")
            return
        pages = torch.unique(self.path_device_indices(node) // self._page).tolist()
        free_tokens = self.token_to_kv_pool_allocator.available_size() + self.evictable_size()
        turn = TurnContext(program_id=owner, tool=hints.tool, turn_index=program.turns - 1, num_tokens=context,
                           num_blocks=len(pages), prefill_s=context / self._rate, hint_ttl_s=hints.ttl_s,
                           free_fraction=min(1.0, free_tokens / max(1, self.token_to_kv_pool_allocator.size)))
        ttl = self._policy.ttl.ttl(turn)
        if not ttl > 0 or not pages:
            self._drop(owner, "released")
            return
        grant = self._table.grant(owner, pages, ttl, tool=hints.tool, num_tokens=context, now=now)
        if not grant.granted:
            self.stats["refused"] += 1
            logger.debug("kvttl: lease for %r refused: %s", owner, grant.reason)
            self._drop(owner, "released")
            return
        # The new lock before the old unlock: the shared prefix never becomes evictable.
        old = self._locks.get(owner)
        self._locks[owner] = self.lock(node)
        if old is not None:
            self.unlock(old)
        self.stats["granted"] += 1

    def evict(self, params: EvictParams) -> EvictResult:
        return self._evict_with_leases(params, lambda p: super(KvttlRadixCache, self).evict(p))

    def evict_for_alloc(self, params: EvictParams, *, allocation_reclaim_satisfied=None) -> EvictResult:
        return self._evict_with_leases(params, lambda p: super(KvttlRadixCache, self).evict_for_alloc(
            p, allocation_reclaim_satisfied=allocation_reclaim_satisfied))

    def _evict_with_leases(self, params: EvictParams, evict_unlocked) -> EvictResult:
        self._tick()
        allocator = self.token_to_kv_pool_allocator
        want = int(params.num_tokens or 0)
        target = allocator.available_size() + want  # SGLang's meaning: a shortfall to cover
        result = evict_unlocked(params)
        while self._table.num_leases and want > 0 and allocator.available_size() < target:
            self._revoke(self._victims(limit=1))
            more = super().evict(EvictParams(num_tokens=target - allocator.available_size()))
            result.num_tokens_evicted += more.num_tokens_evicted
            result.swa_num_tokens_evicted += more.swa_num_tokens_evicted
            result.mamba_num_evicted += more.mamba_num_evicted
        return result

    # ---- scheduling (called by plugin.py's calc_priority hook) ------------------------
    def queue_key(self, req) -> tuple:
        """Program-level FCFS, pinned programs first; requests without a
        program are programs of one turn."""
        entry = _entry_time(req)
        hints = _hints_of(req)
        if hints is None:
            return (1, entry, entry)
        program = self._programs.get(hints.program_id)
        pinned = hints.program_id in self._table
        return (0 if pinned else 1, program.first_arrival if program is not None else entry, entry)

    def relieve_pressure(self, waiting_queue, running_batch=None) -> int:
        """Revoke leases while the head of the queue cannot fit: only leases
        of programs that arrived after the head's, unless nothing runs (then
        any lease may go: pins never stop the engine). Returns leases revoked."""
        if not waiting_queue or not self._table.num_leases:
            return 0
        head = waiting_queue[0]
        need = len(head.origin_input_ids) + len(head.output_ids) - int(getattr(head, "prefix_len", 0) or 0)
        if self.token_to_kv_pool_allocator.available_size() + self.evictable_size() >= need:
            return 0  # it fits: no clock reading (a collective under TP) on this scheduling pass
        self._tick()  # due leases first: they may be enough
        hints = _hints_of(head)
        program = self._programs.get(hints.program_id) if hints is not None else None
        head_arrival = program.first_arrival if program is not None else _entry_time(head)
        idle = running_batch is None or running_batch.is_empty()
        revoked = 0
        while self.token_to_kv_pool_allocator.available_size() + self.evictable_size() < need:
            victims = self._victims(limit=1, arrived_after=None if idle else head_arrival,
                                    exclude=hints.program_id if hints is not None else None)
            if not victims:
                break
            revoked += self._revoke(victims)
        return revoked

    # ---- internals ----------------------------------------------------------------
    def _on_arrival(self, req, hints: TurnHints, match) -> None:
        owner = hints.program_id
        now = self._tick()
        now = self._now() if now is None else now
        program = self._programs.get(owner)
        if program is None:
            self._programs[owner] = _Program(_entry_time(req))
            return
        if program.finished_at is not None:
            self._policy.ttl.on_tool_return(program.tool, max(0.0, now - program.finished_at))
        if owner in self._table:
            self.stats["hit"] += 1
            self._table.renew(owner, math.inf, now=now)  # never expires while its turn waits
        self._returning[owner] = (req, now, int(match.device_prefix_len))

    def _try_hand_over(self, owner, returning: tuple, now: float) -> None:
        req, arrival, matched = returning
        if req.lock is not None:  # admitted: it holds its own prefix
            context = self._programs[owner].context  # a returning program is never forgotten
            evicted = matched < (context - 1) // self._page * self._page
            self._policy.ttl.on_admitted(max(0.0, now - arrival), evicted)
        elif not (req.finished() and not req.kv.holds_kv):  # still waiting (else: gone before it ran)
            return
        del self._returning[owner]
        self._drop(owner, "released")

    def _forget_idle_programs(self, now: float) -> None:
        """Programs that never sent a last turn: forget those with no lease, no
        waiting turn and no finish for FORGET_AFTER_S (bounded memory)."""
        for owner, program in list(self._programs.items()):
            if owner not in self._table and owner not in self._returning and \
                    program.finished_at is not None and now - program.finished_at > FORGET_AFTER_S:
                del self._programs[owner]

    def _victims(self, *, limit: int, arrived_after: float | None = None, exclude=None) -> list:
        """Leases to revoke, latest program first (program-level FCFS)."""
        def arrival(lease):
            program = self._programs.get(lease.owner)
            return program.first_arrival if program is not None else math.inf

        leases = [l for l in self._table.leases() if l.owner != exclude and
                  (arrived_after is None or arrival(l) > arrived_after)]
        leases.sort(key=lambda l: (-arrival(l), -l.lease_id))
        return leases[:limit]

    def _revoke(self, victims) -> int:
        for lease in victims:
            self._table.release(lease.owner, lease_id=lease.lease_id)
            self._unlock_owner(lease.owner, "revoked")
        return len(victims)

    def _drop(self, owner, why: str) -> None:
        if self._table.release(owner) is not None:
            self._unlock_owner(owner, why)

    def _unlock_owner(self, owner, why: str) -> None:
        lock = self._locks.pop(owner, None)
        if lock is not None:
            self.unlock(lock)
        self.stats[why] += 1
        logger.debug("kvttl: lease of %r %s", owner, why)

    # ---- introspection and teardown ----------------------------------------------------
    @property
    def num_leases(self) -> int:
        return self._table.num_leases

    def leased_tokens(self) -> int:
        return sum(lease.num_tokens for lease in self._table.leases())

    def lease_of(self, program_id):
        return self._table.get(program_id)

    def release_all_leases(self) -> int:
        n = 0
        for owner in list(self._locks):
            self._drop(owner, "released")
            n += 1
        return n

    def reset(self) -> None:
        # SGLang's reset (flush_cache) rebuilds the tree: every lock is gone with it.
        table = getattr(self, "_table", None)
        if table is not None:
            table.release_all()
            self._locks.clear()
            self._programs.clear()
            self._returning.clear()
        super().reset()
