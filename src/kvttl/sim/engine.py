"""A discrete-event model of one continuous-batching engine.

It drives the *real* kvttl core (BlockPool for GPU blocks and, optionally,
one for a host tier; LeaseTable for pins) and the real policies; only the
GPU is modelled (kvttl.sim.cost). The scheduler follows vLLM V1:

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
import math
from typing import Callable

import attrs
import numpy as np

import kvttl
from kvttl.errors import BadArgumentError
from kvttl.policy import QueueEntry, SchedulingPolicy, TurnContext, parse_ttl
from kvttl.sim.cost import CostModel
from kvttl.sim.workload import Program

__all__ = ["EngineConfig", "Simulator", "RunResult"]

_SHARED = 1 << 62  # hash namespace of the workload-wide shared prefix


def block_hash(program_id: int, epoch: int, index: int, shared_blocks: int) -> int:
    """Content identity of block ``index`` of a program's context: the shared
    prefix is common to all programs, the rest unique per (program, epoch)."""
    if index < shared_blocks:
        return _SHARED + index
    return ((program_id + 1) << 40) | (epoch << 32) | index


@attrs.frozen(kw_only=True)
class EngineConfig:
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    #: GPU blocks; None: as many as the cost model's memory allows
    num_gpu_blocks: int | None = None
    #: pinned host DRAM for KV, in GB; used by policies that offload
    host_tier_gb: float = 256.0


@attrs.define
class _Req:
    prog: "_Prog"
    turn: int
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


@attrs.define
class _Prog:
    program: Program
    epoch: int = 0
    context: int = 0  # tokens of the current context (prompt + output of the last turn)
    finish_prev: float = 0.0
    attained_s: float = 0.0
    finished_at: float | None = None
    turns_done: int = 0


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
            "reprefilled_tokens": self.reprefilled_tokens,
            "pinned_block_seconds": self.pinned_block_s,
            "leases_granted": self.leases_granted, "leases_refused": self.leases_refused,
            "leases_hit": self.leases_hit, "leases_expired": self.leases_expired,
            "leases_revoked": self.leases_revoked, "preemptions": self.preemptions,
            "mean_queue_delay_s": float(self.queue_delays_s.mean()) if len(self.queue_delays_s) else 0.0,
            "makespan_s": self.makespan_s,
        }


class Simulator:
    """Replays ``programs`` under ``policy`` on the engine ``cost`` models."""

    def __init__(self, programs: list[Program], policy: SchedulingPolicy, cost: CostModel,
                 config: EngineConfig = EngineConfig(), *, jps: float = math.nan,
                 max_sim_s: float = 1e7):
        if not programs:
            raise BadArgumentError("nothing to simulate: no programs")
        self.cost, self.config, self.policy, self.jps = cost, config, policy, jps
        self.max_sim_s = max_sim_s
        bs = config.block_size
        self.num_blocks = config.num_gpu_blocks or cost.num_gpu_blocks(bs)
        longest = max(max(t.prompt_tokens + t.output_tokens for t in p.turns) for p in programs)
        if math.ceil(longest / bs) > self.num_blocks:
            raise BadArgumentError(
                f"a turn of {longest} tokens needs {math.ceil(longest / bs)} blocks; the engine has {self.num_blocks}")
        self.now = 0.0
        self.pool = kvttl.BlockPool(self.num_blocks)
        self.table = kvttl.LeaseTable(self.pool, pinned_share_cap=policy.pinned_share_cap, clock=lambda: self.now)
        self.reload = cost.reload_model(config.max_num_batched_tokens)
        host_blocks = int(config.host_tier_gb * 1e9 // (cost.model.kv_bytes_per_token * bs))
        self.host = kvttl.BlockPool(host_blocks) if host_blocks > 0 and self._uses_host() else None
        self.progs = [_Prog(program=p) for p in programs]
        self.events: list = []  # (time, seq, program index, turn index)
        self._seq = 0
        for i, p in enumerate(programs):
            self._push(p.arrival_s, i, 0)
        self.deadlines: list[float] = []  # lease deadlines, for fast-forward bounds (may be stale)
        self.waiting: list[_Req] = []
        self.waiting_dirty = False
        self.running: list[_Req] = []
        self._admit_seq = 0
        self.freed_version = 0  # bumped whenever blocks may have become free
        self._blocked: tuple | None = None
        self._no_admit_once = False
        self.revocation_key = self._revocation_key()
        # counters
        self.c = dict(prompt=0, cached=0, host=0, reprefill=0, prefilled=0, output=0, granted=0, refused=0,
                      hit=0, expired=0, revoked=0, preempt=0, steps=0)
        self.pinned_block_s = 0.0
        self.queue_delays: list[float] = []

    def _uses_host(self) -> bool:
        return self.policy.offload != "none" or hasattr(self.policy.ttl, "offload")

    def _revocation_key(self) -> Callable | str:
        order = self.policy.revocation
        if order is None:
            return "latest_granted"
        return lambda lease: order(lease, self.now)

    def _push(self, t: float, prog: int, turn: int) -> None:
        heapq.heappush(self.events, (t, self._seq, prog, turn))
        self._seq += 1

    # ---- hashing ------------------------------------------------------------------
    def _hashes(self, prog: _Prog, start: int, stop: int) -> list[int]:
        shared = prog.program.shared_prefix_tokens // self.config.block_size
        pid, epoch = prog.program.program_id, prog.epoch
        return [block_hash(pid, epoch, i, shared) for i in range(start, stop)]

    # ---- host tier ------------------------------------------------------------------
    def _offload(self, prog: _Prog) -> None:
        """Copies the program's context blocks to the host tier (asynchronous
        DMA: not charged to GPU steps)."""
        if self.host is None:
            return
        hashes = self._hashes(prog, 0, prog.context // self.config.block_size)
        present = self.host.acquire_prefix(hashes)  # refresh LRU of what is already there
        missing = hashes[len(present):]
        if missing:
            ids = self.host.allocate(min(len(missing), self.host.num_evictable))
            if ids is not None and len(ids):
                self.host.register_hashes(ids, missing[: len(ids)])
                self.host.drop_ref(ids[::-1])
        self.host.drop_ref(present[::-1])

    # ---- arrivals -------------------------------------------------------------------
    def _arrive(self, pi: int, ti: int) -> None:
        prog = self.progs[pi]
        turn = prog.program.turns[ti]
        if turn.prompt_tokens < prog.context:  # compaction: a fresh context
            prog.epoch += 1
            prog.context = 0
        req = _Req(prog=prog, turn=ti, arrival=self.now, prompt=turn.prompt_tokens, output=turn.output_tokens)
        req.target = req.prompt
        if ti > 0:
            prev = prog.program.turns[ti - 1]
            self.policy.ttl.on_tool_return(prev.tool or "", self.now - prog.finish_prev)
            if self.table.get(pi) is not None:
                self.c["hit"] += 1
                if self.policy.hold_while_waiting:
                    self.table.renew(pi, math.inf)  # never expires while its turn waits
        self.waiting.append(req)
        self.waiting_dirty = True

    # ---- admission and block allocation ------------------------------------------------
    def _allocate(self, n: int, requester: _Req):
        """n more GPU blocks for requester, revoking leases by policy if the
        pool is short (only those the policy lets this requester revoke)."""
        if n <= 0:
            return []
        ids = self.pool.allocate(n)
        if ids is None and self.table.num_leases:
            where = None
            if self.running and self.policy.revokes == "later-programs":
                mine = requester.prog.program.arrival_s
                where = lambda lease: lease.priority > mine  # noqa: E731
            result = self.table.revoke(n - self.pool.num_evictable, order=self.revocation_key, where=where)
            for lease in result.revoked:
                self._unpinned(lease, "revoked")
            ids = self.pool.allocate(n)
        return None if ids is None else ids.tolist()

    def _unpinned(self, lease, why: str) -> None:
        self.c[why] += 1
        self.freed_version += 1
        if self.policy.offload == "on_unpin":
            self._offload(self.progs[lease.owner])

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
        self.table.release(prog.program.program_id)  # hand-over: own references first, then the lease
        req.blocks = hit + new
        req.hashed = len(hit)
        req.computed = computed
        if host_hit:
            req.ready_at = self.now + self.cost.host_reload_s(host_hit * bs)
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
                # Evicted from the GPU, even if the host tier has a copy: the
                # program lost its pin's priority and queued like new work.
                self.policy.ttl.on_admitted(delay, evicted=len(hit) < prev_blocks)
            self.c["prompt"] += req.prompt
            self.c["cached"] += min(req.prompt, len(hit) * bs)
            self.c["host"] += host_hit * bs
        self._admit_seq += 1
        req.admitted_seq = self._admit_seq
        return chunk

    def _sorted_waiting(self) -> None:
        if not self.waiting_dirty:
            return
        order = self.policy.queue_order
        table = self.table

        def key(r: _Req):
            return order(QueueEntry(r.arrival, r.prog.program.arrival_s,
                                    r.turn > 0 and table.get(r.prog.program.program_id) is not None,
                                    r.prog.attained_s))

        self.waiting.sort(key=key)
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
        turn = turns[req.turn]
        prog.context = req.prompt + req.output
        prog.finish_prev = self.now
        pid = prog.program.program_id
        last = req.turn == len(turns) - 1
        if not last:
            bs = self.config.block_size
            ctx = TurnContext(
                program_id=pid, tool=turn.tool or "", turn_index=req.turn, num_tokens=prog.context,
                num_blocks=req.hashed, prefill_s=self.reload.prefill_s(prog.context),
                host_reload_s=self.cost.host_reload_s(prog.context) if self.host is not None else None,
                hint_ttl_s=parse_ttl(turn.ttl_hint) if turn.ttl_hint else None,
                free_fraction=self.pool.num_evictable / self.num_blocks,
                used_tokens=(self.num_blocks - self.pool.num_evictable) * bs,
            )
            ttl = self.policy.ttl.ttl(ctx)
            granted = False
            if ttl > 0 and req.hashed > 0:
                grant = self.table.grant(pid, req.blocks[: req.hashed], ttl, tool=turn.tool or "",
                                         num_tokens=prog.context, priority=prog.program.arrival_s)
                granted = grant.granted
                if grant.granted:
                    self.c["granted"] += 1
                    if not math.isinf(grant.deadline):
                        heapq.heappush(self.deadlines, grant.deadline)
                else:
                    self.c["refused"] += 1
            offload = getattr(self.policy.ttl, "offload", None)
            # "on_unpin": a turn that is not pinned is unpinned at once.
            if (self.policy.offload == "on_finish" or (self.policy.offload == "on_unpin" and not granted)
                    or (offload is not None and offload(ctx))):
                self._offload(prog)
            self._push(self.now + turn.tool_duration_s, pid, req.turn + 1)
        else:
            prog.finished_at = self.now
            self.policy.ttl.on_program_finished(len(turns))
        self.pool.drop_ref(req.blocks[::-1])
        req.blocks = []

    def _step_time(self, chunks, decodes, k: int = 1) -> float:
        num_tokens = sum(c for _, c in chunks) + len(decodes)
        attn = sum(c * (r.computed + c / 2) for r, c in chunks)
        kv = sum(r.computed + c for r, c in chunks)
        ctx = sum(r.computed for r in decodes) + len(decodes) * (k - 1) / 2
        return self.cost.step_s(num_tokens, attn + ctx, kv + ctx)

    def _next_event_time(self) -> float:
        t = self.events[0][0] if self.events else math.inf
        while self.deadlines and self.deadlines[0] <= self.now:
            heapq.heappop(self.deadlines)
        if self.deadlines:
            t = min(t, self.deadlines[0])
        for r in self.running:
            if r.ready_at > self.now:
                t = min(t, r.ready_at)
        return t

    def run(self) -> RunResult:
        cfg = self.config
        while True:
            while self.events and self.events[0][0] <= self.now:
                _, _, pi, ti = heapq.heappop(self.events)
                self._arrive(pi, ti)
            for lease in self.table.expire():
                self._unpinned(lease, "expired")
            if not self.running and not self.waiting:
                if not self.events:
                    break
                self._advance(self.events[0][0] - self.now)
                continue
            if self.now > self.max_sim_s:
                raise RuntimeError(f"simulation ran past {self.max_sim_s} s: the engine is not making progress")

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
            self._no_admit_once = False

            if not chunks and not decodes:
                nxt = self._next_event_time()
                if not math.isfinite(nxt):
                    raise RuntimeError("engine stalled: requests wait but nothing can run or arrive")
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

            dt = self._step_time(chunks, decodes, k) * k
            self._advance(dt)
            self.c["steps"] += k
            share = dt / max(1, len(chunks) + len(decodes))
            for r, c in chunks:
                r.computed += c
                r.prog.attained_s += share
                self.c["prefilled"] += c
                if r.computed >= r.target:
                    r.generated += 1  # the last prefill step samples a token
                    self.c["output"] += 1
                self._register_full(r)
            for r in decodes:
                r.computed += k
                r.generated += k
                r.prog.attained_s += share
                self.c["output"] += k
                self._register_full(r)
            for r in [r for r in self.running if r.generated >= r.output]:
                self._finish(r)
        return self._result()

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
        self.table.release_all()
        if self.pool.num_referenced != 0:
            raise RuntimeError(f"simulator leaked {self.pool.num_referenced} GPU blocks")
        c = self.c
        return RunResult(
            policy=self.policy.name, jps=self.jps, num_programs=len(progs), jct_s=jct,
            turns=np.array([len(p.program.turns) for p in progs]), makespan_s=max(1e-9, last - first),
            prompt_tokens=c["prompt"], cached_tokens=c["cached"], host_reloaded_tokens=c["host"],
            reprefilled_tokens=c["reprefill"], prefilled_tokens=c["prefilled"], output_tokens=c["output"],
            pinned_block_s=self.pinned_block_s, leases_granted=c["granted"], leases_refused=c["refused"],
            leases_hit=c["hit"], leases_expired=c["expired"], leases_revoked=c["revoked"],
            preemptions=c["preempt"], queue_delays_s=np.array(self.queue_delays), num_steps=c["steps"],
        )
