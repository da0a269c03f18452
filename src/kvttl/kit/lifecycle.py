"""EngineKit: the one place where Continuum's behaviour meets an engine.

An engine reports five moments of a request's life; the kit does the rest
(program records, TTLs, grants, hand-over, expiry, revocation in the
policy's order, offload decisions, queue keys, counters)::

    engine                                     kit
    ------                                     ---
    a request arrives ......................... arrived(key, hints)     -> the program returns from its tool
    it gets its blocks (prefix hit known) ..... admitted(key, ...)      -> hand the old lease over
    its first output token (optional) ......... first_token(key)        -> what a lost context cost
    it finishes (or is aborted) ............... finished(key, ...)      -> TTL, grant, offload
    every step ................................ tick() / step(...)      -> expiry; give a lease back on a stall
    an allocation falls short ................. revoke(...)             -> leases go, in the policy's order
    the waiting queue is sorted ............... queue_key(...)          -> program-level FCFS

and gives the kit :class:`EngineHooks`: take or drop its own hold on a
lease's blocks, copy blocks to its host tier. Requests without a program id
never reach the kit beyond ``arrived`` returning None.

Every method takes ``now`` (seconds on the kit's clock); without it the kit
reads ``clock``. An engine whose ranks must agree on time (tensor parallel)
passes an agreed ``now``.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import time
from typing import Callable, Hashable, NamedTuple, Protocol

import attrs

import kvttl
from kvttl.errors import BadArgumentError, KvttlError
from kvttl.kit.config import KitConfig
from kvttl.kit.costs import HostCosts, StepCosts
from kvttl.kit.programs import Program, ProgramTable
from kvttl.policy import (GittinsOrder, QueueEntry, ReloadModel, SchedulingPolicy, TurnContext, TurnHints, get_policy,
                          import_policy_modules, is_tool_name, program_fcfs, program_key)

__all__ = ["EngineKit", "EngineHooks", "Turn", "FinishOutcome", "LEASE_EVENTS", "REFUSAL_REASONS", "hint_report"]

#: Lease events the kit counts (``EngineKit.stats``), with the same names in every engine's metrics.
LEASE_EVENTS = ("granted", "refused", "hit", "expired", "revoked", "released")

#: Who took a revoked lease (``EngineKit.revoked_by``): nothing ran, or the
#: engine stalled on pins (``idle``); a program's turn that did not fit
#: (``turn``); a request without a program that did not fit (``request``);
#: the engine, short of blocks with no waiting request named (``engine``:
#: vLLM asks before it preempts a running request).
REVOCATION_CAUSES = ("idle", "turn", "request", "engine")

#: Why a finished turn holds no lease (``FinishOutcome.reason``): the policy
#: chose no TTL; the pinned-share cap refused the grant; its tenant's pin
#: share (``config.tenant_pinned_share``) did; the turn left no full block;
#: the client said it was the last turn; it was aborted; the policy's
#: ``ttl()`` raised or returned no usable TTL (``EngineKit.policy_errors``);
#: or (the adapter's, ``hint_report``) its hints were unusable, so kvttl never saw it.
REFUSAL_REASONS = ("policy", "cap", "tenant_cap", "no_blocks", "last_turn", "aborted", "policy_error", "hint_invalid")

logger = logging.getLogger("kvttl.kit")

#: Kit seconds between sweeps for quiet idle programs, at most (a quarter of
#: config.forget_after_s when that is shorter).
_SWEEP_EVERY_S = 60.0


class EngineHooks(Protocol):
    """What an engine gives the kit. Each is called at one moment only.

    ``ref`` is whatever the engine passed as ``pin_ref`` to
    :meth:`EngineKit.finished` (vLLM: the request's block objects; SGLang:
    the radix-tree node the turn ended on); the kit never looks inside it.
    """

    def pin(self, ref) -> object:
        """A lease was granted on a finished turn: take the engine's own hold
        on its blocks (vLLM: one more block reference; SGLang: a tree lock),
        so they survive the request's release. Returns the handle the kit
        gives back to :meth:`unpin`. An engine whose blocks are a kvttl
        BlockPool handed to the kit holds nothing here (the lease's
        references are in that pool) and returns ``ref``."""

    def unpin(self, handle, *, reason: str, copy_out: bool) -> None:
        """A lease ended -- ``reason`` is "expired", "revoked" or "released"
        (a hand-over, a last turn, an abort, shutdown): drop the hold taken by
        :meth:`pin`. With ``copy_out`` (asked only of an engine with a host
        tier), copy the blocks to the host tier before they can be evicted."""

    def copy_out(self, ref) -> None:
        """A finished turn's blocks go to the host tier now (asked only of an
        engine with a host tier, as the turn finishes)."""


class Turn:
    """The kit's record of one request in flight, from arrival to finish."""

    __slots__ = ("program", "hints", "index", "arrived_at", "prompt_tokens", "admitted_at", "service_reported",
                 "lost_context", "prefill_tokens")

    def __init__(self, program: Program, hints: TurnHints, index: int, arrived_at: float, prompt_tokens):
        self.program = program
        self.hints = hints
        self.index = index  # 0-based turn index within the program
        self.arrived_at = arrived_at
        self.prompt_tokens = prompt_tokens
        self.admitted_at: float | None = None
        self.service_reported = False
        #: set at admission while the policy waits for this returning turn's first token
        #: (EngineKit.times_first_tokens): whether its context was lost, the tokens it prefills
        self.lost_context: bool | None = None
        self.prefill_tokens = 0

    def add_service(self, seconds: float) -> None:
        """Engine seconds this turn just received (its share of a step), for
        attained-service orders (Autellix). Engines that never call this are
        charged the turn's time from admission to finish."""
        self.program.attained_s += seconds
        self.service_reported = True


class FinishOutcome(NamedTuple):
    """What became of a finished turn."""

    #: the turn's blocks are pinned under a lease
    granted: bool
    #: why not, when not: one of REFUSAL_REASONS ("" when granted)
    reason: str = ""
    #: the TTL the policy chose (0 when it chose none)
    ttl_s: float = 0.0
    lease_id: int = 0
    num_blocks: int = 0
    #: the blocks were also copied to the host tier
    copied_out: bool = False
    #: the tool the turn called
    tool: str = ""
    #: the client's ``ttl`` hint, when it was above ``config.max_ttl_s`` and clamped to it (0: not clamped)
    ttl_clamped_from_s: float = 0.0

    def report(self, hints: TurnHints | None = None) -> dict:
        """What the engine tells the client about this turn (vLLM: the
        response's ``kv_transfer_params["kvttl"]``), the same in every engine.
        ``hints``: the turn's, whose ignored parts become ``hint_warnings``."""
        report: dict = {"lease_granted": self.granted}
        if self.granted:
            report.update(lease_id=self.lease_id, ttl_s=self.ttl_s, expires_in_s=self.ttl_s,
                          num_blocks=self.num_blocks)
        else:
            report["reason"] = self.reason
            if self.reason in ("policy", "cap", "tenant_cap", "no_blocks"):
                report["ttl_s"] = self.ttl_s  # the policy's choice: 0, or what the cap refused
        if self.reason not in ("last_turn", "aborted"):
            report["tool"] = self.tool
        if self.copied_out:
            report["copied_to_host"] = True
        warnings = list(hints.warnings) if hints is not None else []
        if self.ttl_clamped_from_s:
            report["ttl_clamped_from_s"] = self.ttl_clamped_from_s
            warnings.append(f"ttl {self.ttl_clamped_from_s:g} s clamped to the server's max_ttl_s")
        if warnings:
            report["hint_warnings"] = warnings
        return report


def hint_report(errors: list[str]) -> dict:
    """The client's report for a request whose hints were unusable (see
    ``kvttl.kit.read_hints``): it ran on the engine's normal path."""
    return {"lease_granted": False, "reason": "hint_invalid", "hint_errors": list(errors)}


_HELD = object()  # stands for a hold whose engine handle is None
_FAILED = object()  # what a policy call that raised returns (EngineKit._ask)


def _as_seconds(value) -> float | None:
    """A TTL as seconds >= 0 (inf included), or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        seconds = float(value)
    except (OverflowError, ValueError, TypeError):  # an int past any float, or a Real that will not convert
        return None
    return seconds if seconds >= 0 else None  # (NaN is not >= 0)


def _is_sort_key(key) -> bool:
    """A tuple of numbers, none NaN: what any two queue keys can be compared by."""
    if type(key) is not tuple:
        return False
    for x in key:
        if not (x.__class__ in (float, int, bool) or isinstance(x, numbers.Real)) or x != x:
            return False
    return True


def _finite(name: str, value):
    """``value`` if it is a finite number of seconds; else BadArgumentError naming ``name``."""
    if not isinstance(value, (str, bytes, bool)):
        try:
            if math.isfinite(value):
                return value
        except (TypeError, ValueError, OverflowError):
            pass
    raise BadArgumentError(f"{name} must be a finite number of seconds, got {value!r:.40}")


def _count_of(name: str, value, most: int | None = None) -> int:
    """``value`` as an int in [0, most]; else BadArgumentError naming ``name``."""
    try:
        count = operator.index(value)
    except TypeError:
        raise BadArgumentError(f"{name} must be an int, got {value!r:.40}") from None
    if count < 0 or (most is not None and count > most):
        raise BadArgumentError(f"{name} must be " + (f"between 0 and {most}" if most is not None else ">= 0")
                               + f", got {count}")
    return count


def _program_key(program, tenant: str) -> Hashable:
    """The key of ``program``: a request's TurnHints (already scoped by its
    tenant), or a client's program id within ``tenant``."""
    if isinstance(program, TurnHints):
        if tenant:
            raise BadArgumentError("pass TurnHints (scoped by their own tenant) or a program id with tenant=, not both")
        return program.key
    if isinstance(program, bool) or not isinstance(program, (str, int)):
        raise BadArgumentError(f"program_id must be a str or an int (TurnHints.program_id), or the request's "
                               f"TurnHints, got {program!r:.40}")
    return program_key(program, tenant)


def _all_then_raise(items, action) -> None:
    """``action`` on every item, even when one raises (an engine hook); then
    the first exception is raised again. The kit's own bookkeeping for each
    item is done before its hook runs, so a failing hook loses no other."""
    failure = None
    for item in items:
        try:
            action(item)
        except Exception as e:  # noqa: PERF203 -- rare, and the rest must still run
            failure = failure or e
    if failure is not None:
        raise failure


class EngineKit:
    """Programs, leases and the turn lifecycle for one engine.

    ``num_blocks`` and ``block_size`` describe the engine's KV memory. With
    ``pool`` (a kvttl ``BlockPool`` the engine allocates from) a lease holds
    real references in it; without, the kit counts pins over the engine's own
    block ids (``LeaseTable.for_engine_blocks``) and the engine holds the
    memory through :class:`EngineHooks`.

    ``policy`` overrides ``config.policy`` with a bundle already built (the
    simulator's, with its engine facts). ``has_host_tier``: the engine can
    copy blocks out and back (:meth:`EngineHooks.copy_out`).

    Reload(r), what a lost context costs, is ``reload`` when the engine knows
    it exactly (the simulator). Otherwise the kit learns it: the engine
    reports its steps (:meth:`observe_step`; ``chunk_tokens`` is the most it
    prefills in one) and host copies (:meth:`observe_host_copy`, with
    ``kv_bytes_per_token``), starting from ``config.reload_tokens_per_s``.

    ``ordinal_arrivals``: the engine's arrival stamps may be compared only
    by their order, not by the time between them -- several ranks each
    stamp with their own clock and must schedule alike (SGLang under tensor
    or pipeline parallelism). Every queue-jump bound is then off, the
    operator's and the policy's, and kvttl's aging order falls back to
    program FCFS, so that a queue key depends on the stamps' order alone.
    The built-in orders other than kvttl's already do; a policy's own order
    must too (it is kept as given).
    """

    def __init__(self, hooks: EngineHooks, *, num_blocks: int, block_size: int, config: KitConfig | None = None,
                 policy: SchedulingPolicy | None = None, pool: kvttl.BlockPool | None = None,
                 clock: Callable[[], float] = time.monotonic, has_host_tier: bool = False,
                 reload: ReloadModel | None = None, chunk_tokens: int | None = None,
                 kv_bytes_per_token: float = 0.0, ordinal_arrivals: bool = False):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise BadArgumentError(f"EngineKit: block_size must be a positive int, got {block_size!r}")
        self.config = config or KitConfig()
        self.hooks = hooks
        self.block_size = block_size
        self.clock = clock
        learn = reload is None and self.config.measure_costs
        self.step_costs = StepCosts(prior_tokens_per_s=self.config.reload_tokens_per_s,
                                    chunk_tokens=chunk_tokens) if learn else None
        self.host_costs = HostCosts(kv_bytes_per_token=kv_bytes_per_token) if learn and has_host_tier else None
        self.reload = reload or ReloadModel(b=1.0 / self.config.reload_tokens_per_s)
        self._costs_seen = 0  # observations already folded into self.reload
        if policy is None:
            import_policy_modules(self.config.policy_modules)
            policy = get_policy(self.config.policy, capacity_blocks=num_blocks, reload=self.reload)
        self.policy = policy
        if ordinal_arrivals:
            self.config = attrs.evolve(self.config, max_queue_jump_s=None, max_queue_jump_prefills=None)
            order = program_fcfs if isinstance(self.policy.queue_order, GittinsOrder) else self.policy.queue_order
            self.policy = attrs.evolve(self.policy, queue_order=order, max_queue_jump_prefills=None)
        for tool, mean_s in self.config.tool_priors_s:
            self.policy.ttl.set_prior(tool, mean_s)
        if pool is not None:
            if pool.capacity != num_blocks:
                raise BadArgumentError(f"EngineKit: the pool has {pool.capacity} blocks, num_blocks says {num_blocks}")
            self.table = kvttl.LeaseTable(pool, pinned_share_cap=self.config.pinned_share_cap, clock=clock)
        else:
            self.table = kvttl.LeaseTable.for_engine_blocks(num_blocks, pinned_share_cap=self.config.pinned_share_cap,
                                                            clock=clock)
        self.num_blocks = num_blocks
        self.has_host_tier = has_host_tier
        self.offload_mode = self._offload_mode()
        self.programs = ProgramTable(max_programs=self.config.max_programs,
                                     forget_after_s=self.config.forget_after_s)
        self._turns: dict[Hashable, Turn] = {}
        self._revocation = self.policy.revocation
        #: an order that learns program lengths (GittinsOrder) hears of each program that ends
        self._order_learns = getattr(self.policy.queue_order, "on_program_finished", None)
        self._empty_steps = 0
        self._sweep_every = min(_SWEEP_EVERY_S, self.config.forget_after_s / 4)
        self._next_sweep = -math.inf
        self.stats = dict.fromkeys(LEASE_EVENTS, 0)
        #: revoked leases by who took them (REVOCATION_CAUSES); they sum to stats["revoked"]
        self.revoked_by = dict.fromkeys(REVOCATION_CAUSES, 0)
        #: bumped by every counted event: a reporter that saw this value has nothing new
        self.changes = 0
        self._held = 0  # programs whose lease the engine holds: the table's lease count, kept in Python
        self._tenant_pinned: dict[str, int] = {}  # blocks each tenant's leases pin (entries only while > 0)
        #: the engine calls first_token() for every request it serves (see there)
        self.times_first_tokens = False
        #: keys of returning turns admitted and not yet at their first token
        self.awaiting_first_token: set[Hashable] = set()
        #: calls into the policy's own code that raised or returned something unusable. The
        #: kit skipped the policy at each (no pin; the default queue or revocation order;
        #: nothing learned) and went on: a bug in a policy never stops the engine or
        #: leaves a hold behind. The first is logged, and kept here, naming the call.
        self.policy_errors = 0
        self.first_policy_error: str | None = None

    def _policy_failed(self, call: str, problem: str) -> None:
        self.policy_errors += 1
        self.changes += 1
        if self.first_policy_error is None:
            self.first_policy_error = f"{call}: {problem}"
            logger.error("kvttl: policy %r: %s: %s. The kit skips the policy where it fails and counts each "
                         "failure in EngineKit.policy_errors; this is logged once.", self.policy.name, call, problem)

    def _ask(self, call: str, fn, *args, default=_FAILED):
        """``fn(*args)``, one of the policy's own methods; ``default`` when it raises."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- the policy's code, not the kit's
            self._policy_failed(call, f"raised {type(e).__name__}: {e}")
            return default

    def _offload_mode(self) -> str:
        if not self.has_host_tier:
            return "none"
        if self.config.offload is not None:
            return self.config.offload
        # A host tier the operator configured is meant to be used.
        return self.policy.offload if self.policy.offload != "none" else "on_unpin"

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else _finite("now", now)

    # ---- the lifecycle ---------------------------------------------------------------
    def arrived(self, key: Hashable, hints: TurnHints | None, *, prompt_tokens: int | None = None,
                arrival: float | None = None, now: float | None = None) -> Turn | None:
        """A request entered the engine. ``hints`` None (no program id): the
        normal path, nothing is recorded. ``arrival`` is the request's stamp
        on the engine's queue clock (default ``now``): a new program's first
        arrival, the program-FCFS key. ``prompt_tokens`` shorter than the
        program's last context marks a fresh context (a compaction)."""
        if hints is None:
            return None
        if not isinstance(hints, TurnHints):
            raise BadArgumentError(f"hints must be TurnHints (kvttl.kit.read_hints makes them) or None, "
                                   f"got {type(hints).__name__}")
        now = self._now(now)
        if arrival is not None:
            _finite("arrival", arrival)
        if prompt_tokens is not None:
            _count_of("prompt_tokens", prompt_tokens)
        program_id = hints.key
        program = self.programs.get(program_id)
        if program is None:
            program = self.programs.add(program_id, now if arrival is None else arrival, now)
            program.tenant = hints.quota_key
        else:
            self.programs.touch(program, now)
            if program.finished_at is not None and program.in_flight == 0:
                gap = max(0.0, now - program.finished_at)
                self._ask("on_tool_return()", self.policy.ttl.on_tool_return, program.tool, gap)
                # Queue age counts only while the program is active: a gap
                # longer than any lease the server grants is dormancy, after
                # which the program is as old as this request, so an old id
                # buys no place at the head of the queue. (Re-based on the
                # request's own stamp: ranks that stamp requests apart still
                # order them alike.)
                if gap > self.config.max_ttl_s:
                    program.first_arrival = now if arrival is None else arrival
            if program.pin is not None:
                self._count("hit")
                if self.policy.hold_while_waiting:
                    self.table.renew(program_id, math.inf, now=now)  # no expiry while its turn waits
            if prompt_tokens is not None and prompt_tokens < program.context_tokens:
                program.context_tokens = 0  # compaction: nothing of the old context is this turn's
        turn = Turn(program, hints, program.num_turns, now, prompt_tokens)
        if key in self._turns:  # the engine reused a key: the old turn is gone
            self.finished(key, blocks=(), num_tokens=0, free_blocks=self.num_blocks, aborted=True, now=now)
        program.in_flight += 1
        self._turns[key] = turn
        return turn

    def admitted(self, key: Hashable, *, device_hit_tokens: int, now: float | None = None) -> None:
        """The request got its blocks, ``device_hit_tokens`` of its prompt
        found in the engine's device cache (a host-tier reload does not
        count: the pin's job was to avoid it). The first admission of a
        returning turn tells the policy its queueing delay and whether its
        context was lost, then the program's old lease is handed over: the
        turn holds its own references now. Later admissions (after a
        preemption) change nothing."""
        turn = self._turns.get(key)
        if turn is None or turn.admitted_at is not None:
            return
        now = self._now(now)
        turn.admitted_at = now
        program = turn.program
        if turn.index > 0:
            previous = program.context_tokens - 1  # its last token has no KV yet
            if turn.prompt_tokens is not None:
                previous = min(previous, turn.prompt_tokens)
            kept = previous // self.block_size * self.block_size
            lost = device_hit_tokens < kept
            if self.times_first_tokens:
                turn.lost_context = lost
                prompt = program.context_tokens if turn.prompt_tokens is None else turn.prompt_tokens
                turn.prefill_tokens = max(0, prompt - device_hit_tokens)
                self.awaiting_first_token.add(key)
            else:
                self._ask("on_admitted()", self.policy.ttl.on_admitted, now - turn.arrived_at, lost)
        if program.pin is not None:
            self.table.release(program.program_id)
            self._lease_gone(program, "released")

    def first_token(self, key: Hashable, *, now: float | None = None) -> None:
        """The request produced its first output token: its prefill is done.

        An engine that calls this for the requests it serves (and sets
        ``times_first_tokens``) shows the policy what a lost context really
        cost: a returning turn's delay is then its time from arrival to first
        token less its own prefill at the engine's measured rate (from
        admission only, the delay misses a re-prefill slowed by other work
        sharing its steps, as chunked prefill does). Without it a returning
        turn reports its queueing delay at admission. A turn that finishes
        first reports at its finish; an aborted one reports nothing."""
        turn = self._turns.get(key)
        if turn is None or turn.lost_context is None:
            return
        self._report_first_token(key, turn, self._now(now))

    def _report_first_token(self, key: Hashable, turn: Turn, now: float) -> None:
        lost, turn.lost_context = turn.lost_context, None
        self.awaiting_first_token.discard(key)
        delay = max(0.0, now - turn.arrived_at - self.reload.prefill_s(turn.prefill_tokens))
        self._ask("on_admitted()", self.policy.ttl.on_admitted, delay, lost)

    def finished(self, key: Hashable, *, blocks, num_tokens: int, free_blocks: int, pin_ref=None,
                 tool: str | None = None, aborted: bool = False, now: float | None = None) -> FinishOutcome | None:
        """The request finished. ``blocks``: the ids of its full blocks, in
        order, that a lease would pin; ``num_tokens``: its context (prompt +
        output); ``free_blocks``: what the engine could allocate right now;
        ``pin_ref``: what :meth:`EngineHooks.pin` and ``copy_out`` get;
        ``tool``: the tool, when the engine read it from the output and the
        client did not say. None for a request the kit does not know. A bad
        argument raises before anything changed (BadArgumentError; the lease
        table's UnknownBlockError for an id outside the pool): the turn is
        still in flight, for a call with the right ones."""
        turn = self._turns.get(key)
        if turn is None:
            return None
        now = self._now(now)
        num_tokens = _count_of("num_tokens", num_tokens)
        free_blocks = _count_of("free_blocks", free_blocks, self.num_blocks)
        try:
            num_blocks = len(blocks)
        except TypeError:
            raise BadArgumentError(f"blocks must be a sequence of block ids, got {blocks!r:.40}") from None
        if num_blocks * self.block_size > num_tokens + self.block_size - 1:
            raise BadArgumentError(f"num_tokens: {num_blocks} full blocks of {self.block_size} tokens hold more "
                                   f"than the turn's {num_tokens} tokens")
        if turn.lost_context is not None:  # (once: a retry after a raise finds it reported)
            if aborted:
                turn.lost_context = None
                self.awaiting_first_token.discard(key)
            else:
                self._report_first_token(key, turn, now)
        program, hints = turn.program, turn.hints
        program_id = program.program_id
        # (an engine's tool comes from the model's output: one the lease table would refuse is no tool)
        tool = hints.tool or (tool if tool and is_tool_name(tool) else "")
        if hints.last_turn or aborted:
            self._retire(key, turn, now)
            if program.pin is not None:
                self.table.release(program_id)
                self._lease_gone(program, "released")
            if hints.last_turn and not aborted:
                self._ask("on_program_finished()", self.policy.ttl.on_program_finished, program.num_turns)
                if self._order_learns is not None:
                    self._ask("queue_order.on_program_finished()", self._order_learns, program.num_turns)
            if program.in_flight == 0:
                self.programs.remove(program_id)
            return FinishOutcome(False, "aborted" if aborted else "last_turn", tool=tool)
        bs = self.block_size
        if self.step_costs is not None:
            self._refresh_reload()
        max_ttl = self.config.max_ttl_s
        hint_ttl, clamped_from = hints.ttl_s, 0.0
        if hint_ttl is not None and hint_ttl > max_ttl:
            hint_ttl, clamped_from = max_ttl, hint_ttl
        context = TurnContext(
            program_id=program_id, tool=tool, turn_index=turn.index, num_tokens=num_tokens, num_blocks=num_blocks,
            prefill_s=self.reload.prefill_s(num_tokens),
            host_reload_s=self.reload.host_reload_s(num_tokens) if self.has_host_tier else None,
            hint_ttl_s=hint_ttl, free_fraction=free_blocks / self.num_blocks,
            used_tokens=(self.num_blocks - free_blocks) * bs)
        chosen = self._ask("ttl()", self.policy.ttl.ttl, context)
        seconds = _as_seconds(chosen)
        policy_failed = seconds is None
        if policy_failed and chosen is not _FAILED:
            self._policy_failed("ttl()", f"returned {chosen!r:.60}, not seconds >= 0")
        ttl = min(seconds or 0.0, max_ttl)
        if clamped_from and ttl != hint_ttl:
            clamped_from = 0.0  # the policy chose its own TTL: the clamp is nothing the client got
        wanted = ttl > 0 and num_blocks
        room = wanted and self._tenant_has_room(program, num_blocks)
        grant = None
        if room:
            try:  # the table checks the ids first, and changes nothing when one is wrong
                grant = self.table.grant(program_id, blocks, ttl, tool=tool, num_tokens=num_tokens,
                                         priority=program.first_arrival, now=now)
            except kvttl.KvttlError as e:
                raise type(e)(f"finished: blocks: {e}") from None  # the turn is still in flight
        self._retire(key, turn, now, tool, num_tokens)
        granted, reason, lease_id = False, "policy", 0
        if grant is not None:
            if grant.granted:
                granted, reason, lease_id = True, "", grant.lease_id
                self._pinned(program, pin_ref, num_blocks)
            else:
                reason = "cap"
            self._count("granted" if granted else "refused")
        elif wanted:
            reason = "tenant_cap"
            self._count("refused")
        elif ttl > 0:
            reason = "no_blocks"
        elif policy_failed:
            reason = "policy_error"
        if not granted and program.pin is not None:  # a newer turn supersedes the pinned one
            self.table.release(program_id)
            self._lease_gone(program, "released")
        mode = self.offload_mode
        copied = mode != "none" and (mode == "on_finish" or (mode == "on_unpin" and not granted)
                                     or self._ask("offload()", lambda: bool(self.policy.ttl.offload(context)),
                                                  default=False))
        if copied and num_blocks:
            self.hooks.copy_out(pin_ref)
        return FinishOutcome(granted, reason, float(ttl), lease_id, num_blocks if granted else 0,
                             copied and bool(num_blocks), tool, clamped_from)

    def _retire(self, key: Hashable, turn: Turn, now: float, tool: str | None = None,
                num_tokens: int = 0) -> None:
        """The turn leaves flight: its program's counts, and (``tool`` given:
        a turn after which the program goes on) what the next turn returns to."""
        del self._turns[key]
        program = turn.program
        program.in_flight -= 1
        program.num_turns += 1
        self.programs.touch(program, now)
        if turn.admitted_at is not None and not turn.service_reported:
            program.attained_s += now - turn.admitted_at
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            self.programs.forget_idle(now, keep=program.program_id)  # it may be granted a lease next
        if tool is not None:
            program.finished_at, program.tool, program.context_tokens = now, tool, num_tokens

    def _tenant_has_room(self, program: Program, num_blocks: int) -> bool:
        """Whether a lease of ``num_blocks`` for ``program`` keeps its tenant
        within ``config.tenant_pinned_share`` (net of the lease it replaces)."""
        share = self.config.tenant_pinned_share
        if share is None:
            return True
        held = self._tenant_pinned.get(program.tenant, 0) - (program.pinned_blocks if program.pin is not None else 0)
        return held + num_blocks <= int(share * self.num_blocks)

    def _tenant_count(self, program: Program, delta: int) -> None:
        count = self._tenant_pinned.get(program.tenant, 0) + delta
        if count:
            self._tenant_pinned[program.tenant] = count
        else:
            self._tenant_pinned.pop(program.tenant, None)

    def _pinned(self, program: Program, pin_ref, num_blocks: int) -> None:
        """The table granted (and replaced any older lease of the program):
        the engine's new hold first, then the old one goes."""
        try:
            handle = self.hooks.pin(pin_ref)
        except BaseException:
            self.table.release(program.program_id)  # the grant must not outlive a failed hold
            if program.pin is not None:
                self._lease_gone(program, "released")
            raise
        old, program.pin = program.pin, _HELD if handle is None else handle
        self._tenant_count(program, num_blocks - (program.pinned_blocks if old is not None else 0))
        program.pinned_blocks = num_blocks
        if old is not None:
            self._count("released")
            self.hooks.unpin(None if old is _HELD else old, reason="released", copy_out=False)
        else:
            self._held += 1

    def _lease_gone(self, program: Program, reason: str) -> None:
        """The table's lease of the program ended: drop the engine's hold."""
        handle, program.pin = program.pin, None
        self._tenant_count(program, -program.pinned_blocks)
        program.pinned_blocks = 0
        self._held -= 1
        self._count(reason)
        self._ask("on_lease_ended()", self.policy.ttl.on_lease_ended, reason)
        # last: when the engine's hook raises, the kit's books are already right
        copy_out = reason != "released" and self.offload_mode == "on_unpin"
        self.hooks.unpin(None if handle is _HELD else handle, reason=reason, copy_out=copy_out)

    def _count(self, event: str) -> None:
        self.stats[event] += 1
        self.changes += 1

    def _ended(self, leases, reason: str) -> None:
        def gone(lease):
            program = self.programs.get(lease.owner)
            if program is not None and program.pin is not None:
                self._lease_gone(program, reason)

        _all_then_raise(leases, gone)

    # ---- what the engine's work costs -------------------------------------------------
    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One engine step scheduled ``num_tokens`` (prefill and decode) and
        ran for ``seconds``: the prefill rate behind Reload(r) follows."""
        if self.step_costs is not None:
            self.step_costs.observe(num_tokens, seconds)

    def observe_host_copy(self, num_bytes: int, seconds: float) -> None:
        """The host tier copied ``num_bytes`` (either way) in ``seconds``."""
        if self.host_costs is not None:
            self.host_costs.observe(num_bytes, seconds)

    def _refresh_reload(self) -> None:
        seen = self.step_costs.num_steps + (self.host_costs.num_copies if self.host_costs is not None else 0)
        if seen == self._costs_seen:
            return
        self._costs_seen = seen
        host = self.host_costs
        base = ReloadModel(kv_bytes_per_token=host.kv_bytes_per_token, host_bytes_per_s=host.bytes_per_s) \
            if host is not None and host.kv_bytes_per_token > 0 else None
        self.reload = self.step_costs.prefill_model(base)

    @property
    def prefill_tokens_per_s(self) -> float:
        """The prefill rate Reload(r) uses now (measured, or the prior)."""
        if self.step_costs is not None:
            self._refresh_reload()
        return math.inf if self.reload.b == 0 else 1.0 / self.reload.b

    # ---- every step --------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list:
        """Drops every lease whose deadline has passed (reads no clock when
        there is none). Returns the expired leases."""
        if not self._held:
            return []
        expired = self.table.expire(self._now(now))
        self._ended(expired, "expired")
        return expired

    def next_deadline(self) -> float | None:
        """When the earliest lease expires, on the kit's clock; None without
        a lease that ever expires (leases held while their program waits run
        to infinity). O(leases): for an engine about to go idle (to know when
        to wake up, see ``kvttl.kit.DeadlineWaker``), not for every step."""
        if not self._held:
            return None
        return min((lease.deadline for lease in self.table.leases() if math.isfinite(lease.deadline)), default=None)

    def step(self, *, scheduled: bool) -> int:
        """One engine step ended; ``scheduled``: it ran any work. Pins never
        stall the engine: after ``config.stall_steps`` empty steps in a row
        while leases hold memory, one lease is given back. Returns how many
        leases went."""
        if scheduled or not self._held:
            self._empty_steps = 0
            return 0
        self._empty_steps += 1
        if self._empty_steps < self.config.stall_steps:
            return 0
        self._empty_steps = 0
        return len(self.revoke(num_leases=1, idle=True))

    def revoke(self, *, num_leases: int | None = None, num_blocks: int | None = None,
               requester: Hashable | None = None, arrival: float | None = None, waited_s: float | None = None,
               idle: bool = False, now: float | None = None) -> list:
        """Memory pressure: revokes leases in the policy's revocation order
        until ``num_blocks`` blocks were freed or ``num_leases`` leases went.

        ``requester`` is the key of the turn that is short, or None (unknown,
        or a request without a program, then stamped ``arrival`` on the queue
        clock, having waited ``waited_s`` seconds so far). A turn never loses
        its own program's lease. Under a "later-programs" policy the
        requester may take only the leases of programs that arrived after its
        own (after ``arrival``) -- unless ``idle`` (nothing runs), when any
        lease may go: pins never stop the engine. A request without a program
        may also take a lease once it has waited longer than that program's
        aging bound (:meth:`max_queue_jump`): memory is aged as the queue is.
        Why: among programs, memory follows program order, so the contexts
        of older programs stay while program FCFS finishes them (letting any
        waiting turn take them cut kvttl from 1.69x to 1.12x the best peer
        on 70B SWE-bench in the simulator, benchmarks/README.md); but a
        one-turn request is in no program's order, and a pin holds memory
        for a turn that has not even arrived. That turn would queue at most
        the bound ahead of the request; the pin makes the request wait no
        longer than that for memory either (unbounded aging, Continuum's
        order, keeps every earlier program's pin). Programs' first turns
        stay in program order: aging them too took a quarter to a third of
        the pins' gain on the live benches (benchmarks/README.md, 2026-12-06).
        Returns the revoked leases."""
        if not self._held:
            return []
        turn = self._turns.get(requester) if requester is not None else None
        own, mine = (turn.program.program_id, turn.program.first_arrival) if turn is not None else (None, arrival)
        where = None
        if self.policy.revokes == "later-programs" and not idle and mine is not None:
            if turn is None and waited_s is not None:
                where = lambda lease: lease.priority > mine or self._waited_past_bound(lease, waited_s)  # noqa: E731
            else:
                where = lambda lease: lease.priority > mine  # noqa: E731  (its own program: equal, excluded)
        elif turn is not None:
            where = lambda lease: lease.owner != own  # noqa: E731
        order = self._revocation
        if order is None:
            result = self.table.revoke(num_blocks, "latest_granted", num_leases=num_leases, where=where)
        else:
            at = self._now(now)
            try:
                result = self.table.revoke(num_blocks, lambda lease: order(lease, at), num_leases=num_leases,
                                           where=where)
            except KvttlError:
                raise
            except Exception as e:  # noqa: BLE001 -- the order raised, or its keys do not sort: nothing changed
                self._policy_failed("revocation order", f"{type(e).__name__}: {e}")
                result = self.table.revoke(num_blocks, "latest_granted", num_leases=num_leases, where=where)
        if result.revoked:
            cause = ("idle" if idle else "turn" if turn is not None
                     else "request" if requester is not None or arrival is not None else "engine")
            self.revoked_by[cause] += len(result.revoked)
        self._ended(result.revoked, "revoked")
        return result.revoked

    def _waited_past_bound(self, lease, waited_s: float) -> bool:
        program = self.programs.get(lease.owner)
        bound = self.max_queue_jump(program) if program is not None else None
        return bound is not None and waited_s > bound

    # ---- the waiting queue ---------------------------------------------------------------
    def queue_key(self, program_id: Hashable | None, request_arrival: float) -> tuple:
        """The policy's sort key for a waiting request (smallest first).
        ``program_id`` is the program's key (``TurnHints.key``: its id within
        its tenant), None for a request without one. Requests without a
        program are programs of one turn; a program's arrival counts as at
        most :meth:`max_queue_jump` before the request's own."""
        program = self.programs.get(program_id) if program_id is not None else None
        if program is None:
            entry = QueueEntry(request_arrival, request_arrival, False, 0.0)
        else:
            jump = self.max_queue_jump(program)
            arrival = program.first_arrival if jump is None else max(program.first_arrival, request_arrival - jump)
            entry = QueueEntry(request_arrival, arrival, program.pin is not None, program.attained_s,
                               program.num_turns)
        try:
            key = self.policy.queue_order(entry)
        except Exception as e:  # noqa: BLE001 -- the policy's code
            problem = f"raised {type(e).__name__}: {e}"
        else:
            if _is_sort_key(key):
                return key
            problem = f"returned {key!r:.60}, not a tuple of numbers"
        self._policy_failed("queue_order", problem)
        return (request_arrival,)  # request FCFS: it sorts beside any tuple of numbers

    def max_queue_jump(self, program: Program) -> float | None:
        """Seconds before its own arrival that a turn of ``program`` may
        queue as if it had arrived (None: back to the program's first
        arrival): the tighter of the operator's bound (``config.max_queue_jump_s``,
        or else ``config.max_queue_jump_prefills`` re-prefills of its context)
        and the policy's aging (``policy.max_queue_jump_prefills``)."""
        config = self.config
        in_seconds = config.max_queue_jump_s
        in_prefills = [n for n in (config.max_queue_jump_prefills if in_seconds is None else None,
                                   self.policy.max_queue_jump_prefills) if n is not None]
        bounds = [] if in_seconds is None else [in_seconds]
        if in_prefills:
            prefill_s = self.reload.prefill_s(max(program.context_tokens, self.block_size))
            bounds += [n * prefill_s for n in in_prefills]
        return min(bounds, default=None)

    @property
    def orders_queue(self) -> bool:
        """Whether the engine should sort its queue with queue_key."""
        return self.config.program_fcfs

    # ---- introspection and teardown ---------------------------------------------------------
    def turn(self, key: Hashable) -> Turn | None:
        return self._turns.get(key)

    def has_lease(self, program_id: Hashable | TurnHints, *, tenant: str = "") -> bool:
        """Whether the program ``program_id`` of ``tenant`` (or of these
        TurnHints) holds a lease."""
        program = self.programs.get(_program_key(program_id, tenant))
        return program is not None and program.pin is not None

    def lease_of(self, program_id: Hashable | TurnHints, *, tenant: str = ""):
        return self.table.get(_program_key(program_id, tenant))

    def tenant_pinned_blocks(self, tenant: str = "") -> int:
        """Blocks the leases of ``tenant``'s programs pin (counted per lease)."""
        return self._tenant_pinned.get(tenant, 0)

    def leases(self) -> list:
        return self.table.leases()

    @property
    def num_leases(self) -> int:
        return self._held

    @property
    def num_pinned(self) -> int:
        """Blocks at least one lease pins."""
        return self.table.num_pinned

    @property
    def num_turns_in_flight(self) -> int:
        return len(self._turns)

    def release(self, program_id: Hashable | TurnHints, *, tenant: str = "") -> bool:
        """The program's lease goes now, without a copy out (a router sent its
        next turn to another replica). Whether it held one."""
        program = self.programs.get(_program_key(program_id, tenant))
        if program is None or program.pin is None:
            return False
        self.table.release(program.program_id)
        self._lease_gone(program, "released")
        return True

    def release_all(self) -> int:
        """Every lease goes (engine shutdown); returns how many."""
        held = [p for p in self.programs if p.pin is not None]

        def release(program):
            self.table.release(program.program_id)
            self._lease_gone(program, "released")

        _all_then_raise(held, release)
        return len(held)

    def reset(self) -> None:
        """The engine dropped its whole cache (and every hold with it): forget
        every lease, turn and program without unpinning anything."""
        self.table.release_all()
        self._held = 0
        self._tenant_pinned.clear()
        self._turns.clear()
        self.awaiting_first_token.clear()
        self.programs = ProgramTable(max_programs=self.config.max_programs,
                                     forget_after_s=self.config.forget_after_s)
        self.changes += 1  # the gauges (live leases, pinned blocks) changed: reporters must look

    def check_invariants(self) -> None:
        """Raises AssertionError if the kit and its lease table disagree."""
        self.table.check_invariants()
        leased = {lease.owner for lease in self.table.leases()}
        held = {p.program_id for p in self.programs if p.pin is not None}
        assert leased == held, f"leases {sorted(map(str, leased))} but holds {sorted(map(str, held))}"
        assert self._held == len(held) == self.table.num_leases
        tenants: dict[str, int] = {}
        for p in self.programs:
            if p.pin is not None:
                tenants[p.tenant] = tenants.get(p.tenant, 0) + p.pinned_blocks
        assert tenants == self._tenant_pinned, f"tenant pins {tenants}, counted {self._tenant_pinned}"
        in_flight = sum(p.in_flight for p in self.programs)
        assert in_flight == len(self._turns), f"{in_flight} turns counted in flight, {len(self._turns)} known"
        awaiting = {key for key, turn in self._turns.items() if turn.lost_context is not None}
        assert awaiting == self.awaiting_first_token, "turns awaiting their first token disagree"
        assert sum(self.revoked_by.values()) == self.stats["revoked"], "revocations by cause do not add up"
