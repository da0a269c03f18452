"""A discrete-event model of one continuous-batching engine.

It drives the *real* kvttl core (BlockPool for GPU blocks and, optionally,
one for a host tier) and, through the engine kit (``kvttl.kit``), the same
program and lease lifecycle the vLLM and SGLang adapters drive; only the GPU
is modelled (kvttl.sim.cost). The scheduler follows vLLM V1:

- every step has a token budget; running requests go first (one token per
  decode, a chunk per unfinished prefill), then waiting ones in queue order;
- a waiting request is admitted with its longest cached prefix (a prefix hit
  takes references first, then its program's lease is handed over), and the
  rest of its prompt is prefilled in chunks; admission stops at the first
  request that does not fit (head-of-line, as vLLM);
- full blocks are registered in the prefix index as soon as they are
  computed; a finished request's blocks are released tail first;
- when blocks run out, leases are revoked by policy first; then the latest
  admitted running request is preempted and later recomputed.

Why event-driven with fast-forward: stepping token by token costs one Python
iteration per decode step (10^5 - 10^6 per run). Between events -- an
arrival, a tool return, a request finishing, a lease deadline -- a
decode-only batch does not change, so k steps are taken at once, with the
step time evaluated at the span's mean context length. Steps with prefill
work are taken one at a time.
"""

from __future__ import annotations

import heapq
import logging
import math

import attrs
import numpy as np

import kvttl
from kvttl.errors import BadArgumentError, PolicyError
from kvttl.kit import EngineKit, KitConfig, payload_from_envelope, read_hints
from kvttl.policy import SchedulingPolicy, TurnHints, parse_ttl
from kvttl.sim.cost import CostModel
from kvttl.sim.workload import Program

__all__ = ["EngineConfig", "Simulator", "RunResult"]

logger = logging.getLogger("kvttl.sim")

_SHARED = 1 << 62  # hash namespace of the workload-wide shared prefix
_TRACE = 1 << 61  # hash namespace of blocks a trace names (Mooncake hash_ids)


def block_hash(program_id: int, epoch: int, index: int, shared_blocks: int) -> int:
    """Content identity of block ``index`` of a program's context: the shared
    prefix is common to all programs, the rest unique per (program, epoch)."""
    if index < shared_blocks:
        return _SHARED + index
    return ((program_id + 1) << 40) | (epoch << 32) | index


def trace_block_hash(trace_id: int, index: int) -> int:
    """Content identity of block ``index`` of a context whose tokens up to the
    end of that block a trace names by the rolling id ``trace_id`` (equal ids:
    equal tokens up to there, in any program)."""
    return _TRACE | (hash((trace_id, index)) & (_TRACE - 1))


@attrs.frozen(kw_only=True)
class EngineConfig:
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    #: GPU blocks; None: as many as the cost model's memory allows
    num_gpu_blocks: int | None = None
    #: pinned host DRAM for KV, in GB; used by policies that offload
    host_tier_gb: float = 256.0
    #: most of the GPU blocks that leases may pin: all of them, as in the
    #: paper's system; revocation under pressure does the rest
    pinned_share_cap: float = 1.0


@attrs.define
class _Req:
    prog: "_Prog"
    turn: int
    key: int  # the kit's key for this request
    program_key: object  # its program id in the kit, None for a request without one
    arrival: float
    prompt: int  # prompt tokens
    output: int  # output tokens to generate
    target: int = 0  # tokens whose KV must exist before decoding (prompt, or more after preemption)
    computed: int = 0  # tokens with KV
    generated: int = 0
    blocks: list = attrs.Factory(list)
    hashed: int = 0  # leading blocks registered in the prefix index
    first_scheduled: float | None = None
    ready_at: float = 0.0  # a host reload in flight delays the first chunk
    admitted_seq: int = 0
    kit_turn: object = None  # the kit's Turn: where this request's service is counted
    cached_tokens: int | None = None  # prompt tokens the GPU cache held at first admission
    outcome: object = None  # the kit's FinishOutcome
    done: bool = False


@attrs.define
class _Prog:
    program: Program
    epoch: int = 0
    context: int = 0  # tokens of the current context (prompt + output of the last turn)
    #: what a trace says the current context's leading tokens are (Turn.hash_ids, Turn.hash_extent_tokens)
    ids: tuple = ()
    ids_extent: int = 0
    finished_at: float | None = None
    turns_done: int = 0


class _Hooks:
    """What the simulated engine gives the kit (kvttl.kit.EngineHooks). A
    lease's references live in the simulator's own BlockPool, so pinning
    holds nothing more; the pin handle is the program and its context as
    pinned, for its host copy (in a fleet the program may have moved on)."""

    def __init__(self, sim: "Simulator"):
        self.sim = sim

    def pin(self, prog: _Prog) -> tuple:
        return prog, prog.context, (prog.epoch, prog.ids, prog.ids_extent)

    def unpin(self, pinned: tuple, *, reason: str, copy_out: bool) -> None:
        if reason != "released":
            self.sim.freed_version += 1  # an expiry or revocation may have freed blocks
        if copy_out:
            self.sim._offload(*pinned)

    def copy_out(self, prog: _Prog) -> None:
        self.sim._offload(prog)


@attrs.define
class RunResult:
    policy: str
    jps: float
    num_programs: int
    jct_s: np.ndarray
    turns: np.ndarray
    makespan_s: float
    prompt_tokens: int
    cached_tokens: int
    host_reloaded_tokens: int
    #: seconds requests waited, in all, for their host reloads (link time and
    #: queueing behind other reloads), after a preemption too: more than
    #: reloading ahead of each tool's return could ever save
    host_reload_wait_s: float
    #: tokens of returning turns' contexts that were sent to this engine's host
    #: tier and were not there when the turn came back: the tier could not keep them
    host_lost_tokens: int
    reprefilled_tokens: int
    prefilled_tokens: int
    output_tokens: int
    pinned_block_s: float
    leases_granted: int
    leases_refused: int
    leases_hit: int
    leases_expired: int
    leases_revoked: int
    preemptions: int
    queue_delays_s: np.ndarray
    num_steps: int

    def summary(self) -> dict:
        jct = self.jct_s
        return {
            "policy": self.policy, "jps": self.jps, "num_programs": self.num_programs,
            "mean_jct_s": float(jct.mean()), "p50_jct_s": float(np.percentile(jct, 50)),
            "p95_jct_s": float(np.percentile(jct, 95)),
            "throughput_jobs_per_s": self.num_programs / self.makespan_s,
            "throughput_tokens_per_s": (self.prefilled_tokens + self.output_tokens) / self.makespan_s,
            "output_tokens_per_s": self.output_tokens / self.makespan_s,
            "prefix_hit_rate": self.cached_tokens / max(1, self.prompt_tokens),
            "host_reload_rate": self.host_reloaded_tokens / max(1, self.prompt_tokens),
            "host_reload_wait_s": self.host_reload_wait_s, "host_lost_tokens": self.host_lost_tokens,
            "host_lost_rate": self.host_lost_tokens / max(1, self.prompt_tokens),
            "reprefilled_tokens": self.reprefilled_tokens,
            "pinned_block_seconds": self.pinned_block_s,
            "leases_granted": self.leases_granted, "leases_refused": self.leases_refused,
            "leases_hit": self.leases_hit, "leases_expired": self.leases_expired,
            "leases_revoked": self.leases_revoked, "preemptions": self.preemptions,
            "mean_queue_delay_s": float(self.queue_delays_s.mean()) if len(self.queue_delays_s) else 0.0,
            "makespan_s": self.makespan_s,
        }


class Simulator:
    """Replays ``programs`` under ``policy`` on the engine ``cost`` models.

    ``Simulator.interactive(...)`` makes one with no programs, driven request
    by request instead (``submit``, ``run_until``, ``abort``): the engine the
    conformance suite drives next to vLLM, SGLang and the reference engine.
    """

    def __init__(self, programs: list[Program], policy: SchedulingPolicy, cost: CostModel,
                 config: EngineConfig = EngineConfig(), *, jps: float = math.nan,
                 max_sim_s: float = 1e7, kit_config: KitConfig | None = None, dispatch=None):
        self._replay = kit_config is None
        if self._replay and not programs:
            raise BadArgumentError("nothing to simulate: no programs")
        self.cost, self.config, self.policy, self.jps = cost, config, policy, jps
        self.max_sim_s = max_sim_s
        bs = config.block_size
        self.num_blocks = config.num_gpu_blocks or cost.num_gpu_blocks(bs)
        longest = max((max(t.prompt_tokens + t.output_tokens for t in p.turns) for p in programs), default=0)
        if math.ceil(longest / bs) > self.num_blocks:
            raise BadArgumentError(
                f"a turn of {longest} tokens needs {math.ceil(longest / bs)} blocks; the engine has {self.num_blocks}")
        self.now = 0.0
        self.pool = kvttl.BlockPool(self.num_blocks)
        self.reload = cost.reload_model(config.max_num_batched_tokens)
        host_blocks = int(config.host_tier_gb * 1e9 // (cost.model.kv_bytes_per_token * bs))
        self.host = kvttl.BlockPool(host_blocks) if host_blocks > 0 and policy.offload != "none" else None
        if kit_config is None:  # replayed programs always end with a last turn: none is forgotten
            # and the policy's queue order is compared as it is (no queue-jump bound)
            kit_config = KitConfig(pinned_share_cap=config.pinned_share_cap, forget_after_s=math.inf,
                                   max_programs=max(len(programs), 1), max_queue_jump_prefills=None,
                                   max_ttl_s=math.inf)
        self.kit = EngineKit(_Hooks(self), num_blocks=self.num_blocks, block_size=bs, config=kit_config,
                             policy=policy, pool=self.pool, clock=lambda: self.now,
                             has_host_tier=self.host is not None, reload=self.reload)
        self.progs = [_Prog(program=p) for p in programs]
        self._named: dict = {}  # interactive program name -> its _Prog
        self.events: list = []  # (time, seq, program index, turn index)
        self._seq = 0
        #: where a turn goes when it is due: this engine's own queue, or a
        #: fleet's router (kvttl.sim.fleet), which pushes it to a replica
        self.dispatch = dispatch or self._push
        self.stop_at = math.inf  # where the current run_until stops
        for i, p in enumerate(programs):
            self.dispatch(p.arrival_s, i, 0)
        self.deadlines: list[float] = []  # lease deadlines, for fast-forward bounds (may be stale)
        self.waiting: list[_Req] = []
        self.waiting_dirty = False
        self.running: list[_Req] = []
        self._admit_seq = 0
        self._keys = 0
        self.freed_version = 0  # bumped whenever blocks may have become free
        self.host_link_free_at = 0.0  # when the host->GPU link finishes the reloads queued on it
        self._blocked: tuple | None = None
        self._no_admit_once = False
        # counters (lease events are the kit's)
        self.c = dict(prompt=0, cached=0, host=0, host_lost=0, reprefill=0, prefilled=0, output=0, preempt=0,
                      steps=0)
        self.pinned_block_s = 0.0
        self.host_reload_wait_s = 0.0
        #: program id -> (content, blocks): what this engine's host tier was last
        #: asked to hold of the program's context (content as _hashes takes it)
        self._host_copy: dict[int, tuple] = {}
        self.queue_delays: list[float] = []

    def _push(self, t: float, prog: int, turn: int) -> None:
        heapq.heappush(self.events, (t, self._seq, prog, turn))
        self._seq += 1

    # ---- hashing ------------------------------------------------------------------
    def _hashes(self, prog: _Prog, start: int, stop: int, content: tuple | None = None) -> list[int]:
        """Block identities ``start..stop`` of the program's context: ``content``
        (epoch, trace ids, their extent) as a lease pinned it, or the current."""
        bs = self.config.block_size
        shared = prog.program.shared_prefix_tokens // bs
        epoch, ids, extent = (prog.epoch, prog.ids, prog.ids_extent) if content is None else content
        pid, per_id = prog.program.program_id, prog.program.hash_block_tokens
        named = extent // bs if per_id else 0  # blocks whose every token the trace names
        return [trace_block_hash(ids[((i + 1) * bs - 1) // per_id], i) if i < named else
                block_hash(pid, epoch, i, shared) for i in range(start, stop)]

    # ---- host tier ------------------------------------------------------------------
    def _offload(self, prog: _Prog, context: int | None = None, content: tuple | None = None) -> None:
        """Copies the program's context blocks (now, or as a lease pinned
        them) to the host tier (asynchronous DMA: not charged to GPU steps)."""
        if self.host is None:
            return
        context = prog.context if context is None else context
        hashes = self._hashes(prog, 0, context // self.config.block_size, content)
        present = self.host.acquire_prefix(hashes)  # refresh LRU of what is already there
        missing = hashes[len(present):]
        if missing:
            ids = self.host.allocate(min(len(missing), self.host.num_evictable))
            if ids is not None and len(ids):
                self.host.register_hashes(ids, missing[: len(ids)])
                self.host.drop_ref(ids[::-1])
        self.host.drop_ref(present[::-1])
        if content is None or content[0] == prog.epoch:  # not a context the program has since left
            content = content or (prog.epoch, prog.ids, prog.ids_extent)
            self._host_copy[prog.program.program_id] = (content, len(hashes))

    def _sent_to_host(self, prog: _Prog, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` that this engine's host tier was last
        asked to hold for the program (none past a rewritten history)."""
        record = self._host_copy.get(prog.program.program_id)
        if record is None:
            return 0
        content, blocks = record
        sent = self._hashes(prog, 0, min(blocks, len(hashes)), content)
        return next((i for i, (mine, copied) in enumerate(zip(hashes, sent)) if mine != copied), len(sent))

    # ---- arrivals -------------------------------------------------------------------
    def _arrive(self, pi: int, ti: int) -> None:
        prog = self.progs[pi]
        turns = prog.program.turns
        turn = turns[ti]
        # A compaction, or a rewritten history (the trace's ids diverged): a fresh context past the blocks
        # the ids still share. (The kit, told only the prompt's length, takes a rewrite for a continuation,
        # so the policy counts its rewritten part as context lost.)
        if turn.prompt_tokens < prog.context or turn.new_context:
            prog.epoch += 1
            prog.context = 0
        prog.ids, prog.ids_extent = turn.hash_ids, turn.hash_extent_tokens
        hints = TurnHints(program_id=prog.program.program_id, tool=turn.tool or "", last_turn=ti == len(turns) - 1,
                          ttl_s=parse_ttl(turn.ttl_hint) if turn.ttl_hint else None)
        self._enqueue(prog, ti, hints, turn.prompt_tokens, turn.output_tokens, arrival=prog.program.arrival_s)

    def _enqueue(self, prog: _Prog, ti: int, hints, prompt: int, output: int, *, arrival: float) -> _Req:
        self._keys += 1
        req = _Req(prog=prog, turn=ti, key=self._keys, program_key=hints.program_id if hints else None,
                   arrival=self.now, prompt=prompt, output=output)
        req.target = req.prompt
        req.kit_turn = self.kit.arrived(req.key, hints, prompt_tokens=prompt, arrival=arrival)
        self.waiting.append(req)
        self.waiting_dirty = True
        return req

    # ---- interactive use -------------------------------------------------------------
    @classmethod
    def interactive(cls, policy: SchedulingPolicy, cost: CostModel, config: EngineConfig = EngineConfig(), *,
                    kit_config: KitConfig | None = None) -> "Simulator":
        """An engine with no programs to replay: requests come from ``submit``."""
        return cls([], policy, cost, config, kit_config=kit_config or KitConfig(
            pinned_share_cap=config.pinned_share_cap))

    def submit(self, prompt_tokens: int, output_tokens: int, *, program: str | int | None = None,
               kv_hints=None) -> _Req:
        """Interactive: a request arrives now. ``program`` names a context its
        turns share (each prompt continues the previous one; a shorter one is
        a fresh context); ``kv_hints`` is the client's envelope, read as the
        adapters read it. Returns the request: ``cached_tokens``, ``outcome``
        and ``done`` fill in as it runs."""
        if self._replay:
            raise BadArgumentError("submit needs an interactive simulator (Simulator.interactive)")
        if math.ceil((prompt_tokens + output_tokens) / self.config.block_size) > self.num_blocks:
            raise BadArgumentError(f"a turn of {prompt_tokens + output_tokens} tokens does not fit in "
                                   f"{self.num_blocks} blocks")
        prog = self._named.get(program) if program is not None else None
        if prog is None:
            prog = _Prog(program=Program(program_id=len(self.progs), arrival_s=self.now, turns=()))
            self.progs.append(prog)
            if program is not None:
                self._named[program] = prog
        if prompt_tokens < prog.context:  # compaction: a fresh context
            prog.epoch += 1
            prog.context = 0
        hints = read_hints(payload_from_envelope(kv_hints), log=logger, request=f"sim-{self._keys + 1}")
        req = self._enqueue(prog, prog.turns_done, hints, prompt_tokens, output_tokens, arrival=self.now)
        self.waiting_dirty = True
        return req

    def abort(self, req: _Req) -> None:
        """Interactive: the client went away; whatever the request holds goes."""
        if req.done:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
            self._register_full(req)
        req.outcome = self.kit.finished(req.key, blocks=(), num_tokens=0, free_blocks=self.pool.num_evictable,
                                        aborted=True)
        if req.blocks:
            self.pool.drop_ref(req.blocks[::-1])
            req.blocks = []
        req.prog.turns_done += 1
        req.done = True
        self.freed_version += 1

    # ---- admission and block allocation ------------------------------------------------
    def _allocate(self, n: int, requester: _Req):
        """n more GPU blocks for requester, revoking leases by policy if the
        pool is short (only those the policy lets this requester revoke)."""
        if n <= 0:
            return []
        ids = self.pool.allocate(n)
        if ids is None and self.kit.num_leases:
            self.kit.revoke(num_blocks=n - self.pool.num_evictable, requester=requester.key, idle=not self.running,
                            arrival=requester.arrival, waited_s=self.now - requester.arrival)
            ids = self.pool.allocate(n)
        return None if ids is None else ids.tolist()

    def _register_full(self, req: _Req) -> None:
        full = min(req.computed // self.config.block_size, len(req.blocks))
        if full > req.hashed:
            hashes = self._hashes(req.prog, req.hashed, full)
            self.pool.register_hashes(req.blocks[req.hashed:full], hashes)
            req.hashed = full

    def _try_admit(self, req: _Req, budget: int) -> int | None:
        """Admits req if its first chunk fits: returns the chunk to prefill
        now (0 while a host reload is in flight), or None if it does not fit."""
        bs = self.config.block_size
        prog = req.prog
        # Never match the block holding the last prompt token: it is recomputed
        # so the step has logits to sample from (vLLM does the same).
        hashes = self._hashes(prog, 0, (req.target - 1) // bs)
        hit = self.pool.acquire_prefix(hashes).tolist()
        host_hit = 0
        if self.host is not None and len(hit) < len(hashes):
            host_hit = len(self.host.lookup_prefix(hashes[len(hit):]))
        computed = (len(hit) + host_hit) * bs
        chunk = min(req.target - computed, budget)
        need = math.ceil((computed + chunk) / bs) - len(hit)
        new = self._allocate(need, req)
        if new is None:
            if hit:
                self.pool.drop_ref(hit[::-1])
            return None
        req.blocks = hit + new
        req.hashed = len(hit)
        req.computed = computed
        if host_hit:  # reloads share the host link: each starts when the one before it is done
            req.ready_at = max(self.now, self.host_link_free_at) + self.cost.host_reload_s(host_hit * bs)
            self.host_link_free_at = req.ready_at
            self.host_reload_wait_s += req.ready_at - self.now
            self._register_full(req)  # reloaded blocks hold their content now
            chunk = 0
        if req.first_scheduled is None:
            req.first_scheduled = self.now
            delay = self.now - req.arrival
            self.queue_delays.append(delay)
            # Blocks the previous turn could leave cached: its last token has no KV yet.
            prev_blocks = min(prog.context - 1, req.prompt) // bs
            if req.turn > 0:
                self.c["reprefill"] += max(0, prev_blocks - len(hit) - host_hit) * bs
                self.c["host_lost"] += max(0, min(self._sent_to_host(prog, hashes), prev_blocks)
                                           - len(hit) - host_hit) * bs
            # Its own references first, then the kit hands the lease over. A
            # host reload does not count as a device hit: the program lost its
            # pin's priority and queued like new work.
            self.kit.admitted(req.key, device_hit_tokens=len(hit) * bs)
            req.cached_tokens = len(hit) * bs
            self.c["prompt"] += req.prompt
            self.c["cached"] += min(req.prompt, len(hit) * bs)
            self.c["host"] += host_hit * bs
        self._admit_seq += 1
        req.admitted_seq = self._admit_seq
        return chunk

    def _sorted_waiting(self) -> None:
        if not self.waiting_dirty:
            return
        queue_key = self.kit.queue_key
        self.waiting.sort(key=lambda r: queue_key(r.program_key, r.arrival))
        self.waiting_dirty = False

    # ---- the step ---------------------------------------------------------------------
    def _preempt_one(self) -> bool:
        if not self.running:
            return False
        victim = max(self.running, key=lambda r: r.admitted_seq)
        self.running.remove(victim)
        self._register_full(victim)
        self.pool.drop_ref(victim.blocks[::-1])
        victim.blocks, victim.hashed = [], 0
        victim.target = victim.prompt + victim.generated  # recompute everything it had
        victim.computed = 0
        self.waiting.insert(0, victim)
        self.waiting_dirty = True
        self.freed_version += 1
        self.c["preempt"] += 1
        return True

    def _grow(self, req: _Req, tokens: int) -> bool:
        """Blocks for req to hold `tokens` more tokens of KV."""
        need = math.ceil((req.computed + tokens) / self.config.block_size) - len(req.blocks)
        if need <= 0:
            return True
        ids = self._allocate(need, req)
        if ids is None:
            return False
        req.blocks.extend(ids)
        return True

    def _finish(self, req: _Req) -> None:
        prog = req.prog
        if req.turn != prog.turns_done:
            raise RuntimeError(f"simulator bug: program {prog.program.program_id} finished turn {req.turn} "
                               f"after {prog.turns_done} turns")
        prog.turns_done += 1
        self.running.remove(req)
        self.freed_version += 1
        self._register_full(req)
        turns = prog.program.turns
        turn = turns[req.turn] if self._replay else None
        prog.context = req.prompt + req.output
        outcome = req.outcome = self.kit.finished(req.key, blocks=req.blocks[: req.hashed], num_tokens=prog.context,
                                                  free_blocks=self.pool.num_evictable, pin_ref=prog)
        if outcome is not None and outcome.granted and math.isfinite(outcome.ttl_s):
            heapq.heappush(self.deadlines, self.now + outcome.ttl_s)
        if not self._replay:
            pass
        elif req.turn < len(turns) - 1:
            self.dispatch(self.now + turn.tool_duration_s, prog.program.program_id, req.turn + 1)
        else:
            prog.finished_at = self.now
            self._host_copy.pop(prog.program.program_id, None)
        self.pool.drop_ref(req.blocks[::-1])
        req.blocks = []
        req.done = True

    def _step_time(self, chunks, decodes, k: int = 1) -> float:
        num_tokens = sum(c for _, c in chunks) + len(decodes)
        attn = sum(c * (r.computed + c / 2) for r, c in chunks)
        kv = sum(r.computed + c for r, c in chunks)
        ctx = sum(r.computed for r in decodes) + len(decodes) * (k - 1) / 2
        return self.cost.step_s(num_tokens, attn + ctx, kv + ctx)

    def _next_event_time(self, *, until_stop: bool = True) -> float:
        """When something next happens here; ``until_stop``: no later than
        where this run stops (a fleet's router may act then)."""
        t = self.events[0][0] if self.events else math.inf
        if until_stop:
            t = min(t, self.stop_at)
        while self.deadlines and self.deadlines[0] <= self.now:
            heapq.heappop(self.deadlines)
        if self.deadlines:
            t = min(t, self.deadlines[0])
        for r in self.running:
            if r.ready_at > self.now:
                t = min(t, r.ready_at)
        return t

    def run(self) -> RunResult:
        self.run_until(math.inf)
        return self._result()

    def run_until(self, t_end: float) -> None:
        """Runs the engine until time ``t_end``, or, with ``t_end`` infinite,
        until nothing is left to run or arrive. ``stop_at`` may be lowered
        while it runs (a fleet's router: a turn became due somewhere)."""
        cfg = self.config
        self.stop_at = t_end
        while True:
            t_end = self.stop_at
            while self.events and self.events[0][0] <= self.now:
                _, _, pi, ti = heapq.heappop(self.events)
                self._arrive(pi, ti)
            self.kit.tick()
            if self.kit.policy_errors:
                self._policy_failed()
            if not self.running and not self.waiting:
                nxt = self.events[0][0] if self.events else math.inf
                if nxt > t_end:  # idle to the end (finite only: otherwise nxt is finite); a last
                    self._advance(max(0.0, t_end - self.now))  # step may have run past it already
                    self.kit.tick()
                    return
                if not self.events:
                    return
                self._advance(nxt - self.now)
                continue
            if self.now >= t_end:
                return
            if self.now > self.max_sim_s:
                raise BadArgumentError(f"the simulation ran past {self.max_sim_s:g} simulated seconds and was "
                                       "stopped: this workload does not finish at this load (fewer programs, "
                                       "a lower load or shorter tools will)")

            # Running requests first: each decode needs room for its next token;
            # if there is none even after revoking leases, the latest admitted
            # request is preempted and nothing new is admitted this step.
            decodes = [r for r in self.running if r.computed >= r.target]
            if not all(self._grow(r, 1) for r in decodes):
                self._preempt_one()
                self._no_admit_once = True
                continue
            budget = cfg.max_num_batched_tokens - len(decodes)
            chunks = []
            for r in self.running:
                if r.computed < r.target and r.ready_at <= self.now and budget > 0:
                    c = min(r.target - r.computed, budget)
                    if self._grow(r, c):
                        chunks.append((r, c))
                        budget -= c
            # Then waiting requests, in queue order, until one does not fit. A
            # head that did not fit is retried only once blocks were freed or
            # the queue changed: a failed try touches its prefix's LRU position.
            self._sorted_waiting()
            while (self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs
                   and not self._no_admit_once):
                req = self.waiting[0]
                if self._blocked == (id(req), self.freed_version):
                    break
                c = self._try_admit(req, budget)
                if c is None:
                    self._blocked = (id(req), self.freed_version)
                    break
                self.waiting.pop(0)
                self.running.append(req)
                if c > 0:
                    chunks.append((req, c))
                    budget -= c
            admission_skipped, self._no_admit_once = self._no_admit_once, False

            if not chunks and not decodes:
                # Requests wait and nothing runs: if no reload is in flight,
                # pins are what holds the memory, and the kit's stall rule
                # (EngineKit.step, as vLLM's adapter drives it) gives leases
                # back -- under any queue order, whoever may revoke whom.
                if admission_skipped:  # a preemption just freed blocks: admit from them first
                    continue
                if self.kit.num_leases and not any(r.ready_at > self.now for r in self.running):
                    self.kit.step(scheduled=False)
                    continue
                if not math.isfinite(self._next_event_time(until_stop=False)):
                    raise RuntimeError("engine stalled: requests wait but nothing can run or arrive")
                nxt = self._next_event_time()
                self._advance(nxt - self.now)
                continue
            # A decode-only batch runs k steps at once, up to the next event or
            # finish, as far as free blocks allow (no revocation for look-ahead).
            k = 1
            if not chunks:
                k = min(r.output - r.generated for r in decodes)
                horizon = self._next_event_time() - self.now
                if math.isfinite(horizon):
                    k = max(1, min(k, math.ceil(horizon / self._step_time([], decodes))))
                k = self._fit_decode_span(decodes, k)

            self.kit.step(scheduled=True)
            dt = self._step_time(chunks, decodes, k) * k
            self._advance(dt)
            self.c["steps"] += k
            share = dt / max(1, len(chunks) + len(decodes))
            for r, c in chunks:
                r.computed += c
                if r.kit_turn is not None:
                    r.kit_turn.add_service(share)
                self.c["prefilled"] += c
                if r.computed >= r.target:
                    r.generated += 1  # the last prefill step samples a token
                    self.c["output"] += 1
                self._register_full(r)
            for r in decodes:
                r.computed += k
                r.generated += k
                if r.kit_turn is not None:
                    r.kit_turn.add_service(share)
                self.c["output"] += k
                self._register_full(r)
            for r in [r for r in self.running if r.generated >= r.output]:
                self._finish(r)

    def _fit_decode_span(self, decodes, k: int) -> int:
        """The largest k' <= k whose extra blocks the free queue can give
        without revoking; allocates them. One step is always reserved."""
        bs = self.config.block_size
        while k > 1:
            need = sum(max(0, math.ceil((r.computed + k) / bs) - len(r.blocks)) for r in decodes)
            if need <= self.pool.num_evictable:
                break
            k //= 2
        if k > 1:
            for r in decodes:
                need = math.ceil((r.computed + k) / bs) - len(r.blocks)
                if need > 0:
                    r.blocks.extend(self.pool.allocate(need).tolist())
        return k

    def _policy_failed(self) -> None:
        """A live engine's kit skips a policy that fails and goes on; a
        replay stops at once: its numbers would not be the policy's."""
        raise PolicyError(f"policy {self.policy.name!r} failed at {self.now:.1f} s of the replay at "
                          f"{self.jps:g} jobs/s: {self.kit.first_policy_error}")

    def _advance(self, dt: float) -> None:
        if not dt >= 0:
            raise RuntimeError(f"simulator bug: time would move by {dt} s")
        self.pinned_block_s += self.pool.num_pinned * dt
        self.now += dt

    def _result(self) -> RunResult:
        progs = self.progs
        lost = [p.program.program_id for p in progs if p.turns_done != len(p.program.turns)]
        if lost:
            raise RuntimeError(f"simulator bug: programs {lost[:5]} did not complete every turn")
        jct = np.array([p.finished_at - p.program.arrival_s for p in progs])
        first = min(p.program.arrival_s for p in progs)
        last = max(p.finished_at for p in progs)
        self.kit.release_all()
        if self.kit.policy_errors:
            self._policy_failed()
        if self.pool.num_referenced != 0:
            raise RuntimeError(f"simulator leaked {self.pool.num_referenced} GPU blocks")
        c, leases = self.c, self.kit.stats
        return RunResult(
            policy=self.policy.name, jps=self.jps, num_programs=len(progs), jct_s=jct,
            turns=np.array([len(p.program.turns) for p in progs]), makespan_s=max(1e-9, last - first),
            prompt_tokens=c["prompt"], cached_tokens=c["cached"], host_reloaded_tokens=c["host"],
            host_reload_wait_s=self.host_reload_wait_s, host_lost_tokens=c["host_lost"],
            reprefilled_tokens=c["reprefill"], prefilled_tokens=c["prefilled"], output_tokens=c["output"],
            pinned_block_s=self.pinned_block_s, leases_granted=leases["granted"], leases_refused=leases["refused"],
            leases_hit=leases["hit"], leases_expired=leases["expired"], leases_revoked=leases["revoked"],
            preemptions=c["preempt"], queue_delays_s=np.array(self.queue_delays), num_steps=c["steps"],
        )
