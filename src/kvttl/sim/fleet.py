"""A fleet: N replicas of the simulated engine behind one router, on one clock.

A pin helps only if the program's next turn reaches the replica that holds
it. ``Fleet`` replays the same programs as ``Simulator`` does, but every turn
is routed when it is due, by the rule of a router users run:

- ``round-robin``   each turn to the next replica in turn (stateless load balancing);
- ``least-loaded``  to the replica with the fewest requests waiting or running;
- ``session``       a consistent hash of the program id (vllm-router's
                    ``consistent_hash`` on a session header, sgl-model-gateway's
                    ``consistent_hashing``, Dynamo's session affinity);
- ``lease-aware``   soft affinity: stay with the replica that holds the
                    program's lease -- or, with none, the one that served its
                    last turn -- unless more than ``max_queue`` requests
                    wait in that replica's queue; then the least loaded one, and
                    the old replica gives its lease up.

Each replica is a whole ``Simulator`` with its own pool, host tier, kit and
policy; the programs' state (turns done, context length) is shared, so a
program that moves finds no cache on its new replica and re-prefills.
Replicas advance in lockstep ticks of at most ``tick_s``: a turn that
becomes due inside a tick is routed at the tick's end, at most ``tick_s``
late (or one engine step, when a replica's step runs past the tick) -- what
a router that sees its replicas' state a moment late does.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable

import numpy as np

from kvttl.errors import BadArgumentError
from kvttl.policy import SchedulingPolicy
from kvttl.sim.cost import CostModel
from kvttl.sim.engine import EngineConfig, RunResult, Simulator
from kvttl.sim.workload import Program

__all__ = ["Fleet", "ROUTERS"]

ROUTERS = ("round-robin", "least-loaded", "session", "lease-aware")


def _rendezvous(program_id: int, replicas: int) -> int:
    """Highest-random-weight hashing: a program keeps its replica when others join or leave."""
    return max(range(replicas), key=lambda r: hashlib.blake2b(f"{program_id}/{r}".encode(), digest_size=8).digest())


class Fleet:
    def __init__(self, programs: list[Program], policy: Callable[[], SchedulingPolicy], cost: CostModel,
                 config: EngineConfig = EngineConfig(), *, replicas: int, router: str, jps: float = math.nan,
                 max_queue: int = 8, tick_s: float = 0.1):
        """``policy``: makes one replica's bundle (each replica learns on its own)."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise BadArgumentError(f"replicas must be a positive int, got {replicas!r}")
        if router not in ROUTERS:
            raise BadArgumentError(f"unknown router {router!r}; known: {', '.join(ROUTERS)}")
        if not (tick_s > 0 and math.isfinite(tick_s)):
            raise BadArgumentError(f"tick_s must be a positive number of seconds, got {tick_s!r}")
        self.router, self.max_queue, self.tick_s, self.jps = router, max_queue, tick_s, jps
        self.due: list = []  # (time, seq, program index, turn index): turns not yet routed
        self._seq = 0
        self.sims = [Simulator(programs, policy(), cost, config, jps=jps, dispatch=self._due) for _ in range(replicas)]
        shared = self.sims[0].progs
        for sim in self.sims[1:]:
            sim.progs = shared  # one program state: a turn may run anywhere
        self.due, self._seq = [], 0  # each replica handed over every first turn: the router places them
        for i, p in enumerate(programs):
            self._due(p.arrival_s, i, 0)
        self._last: dict[int, int] = {}  # program -> the replica that served its last turn
        self._next_rr = 0
        self.moves = 0  # turns routed away from the replica that served the program's last turn
        self.released = 0  # leases lease-aware routing gave up as their program moved

    def _due(self, t: float, program: int, turn: int) -> None:
        heapq.heappush(self.due, (t, self._seq, program, turn))
        self._seq += 1
        for sim in getattr(self, "sims", ()):  # a replica still running this tick stops there: the router acts
            sim.stop_at = min(sim.stop_at, t)

    @staticmethod
    def _load(sim: Simulator) -> int:
        return len(sim.waiting) + len(sim.running)

    def _route(self, program: int) -> int:
        n = len(self.sims)
        if self.router == "round-robin":
            r, self._next_rr = self._next_rr, (self._next_rr + 1) % n
            return r
        least = min(range(n), key=lambda r: (self._load(self.sims[r]), r))
        if self.router == "least-loaded":
            return least
        if self.router == "session":
            return _rendezvous(program, n)
        home = next((r for r, sim in enumerate(self.sims) if sim.kit.has_lease(program)), self._last.get(program))
        if home is None:
            return least
        if len(self.sims[home].waiting) <= self.max_queue or least == home:
            return home
        if self.sims[home].kit.release(program):  # it moves: the old pin only holds memory now
            self.released += 1
            self.sims[home].freed_version += 1  # its blocks may let a blocked head in
        return least

    def run(self) -> RunResult:
        now = 0.0
        for sim in self.sims:
            sim.stop_at = math.inf
        while self.due or any(sim.waiting or sim.running or sim.events for sim in self.sims):
            while self.due and self.due[0][0] <= now:
                at, _, program, turn = heapq.heappop(self.due)
                r = self._route(program)
                if program in self._last and self._last[program] != r:
                    self.moves += 1
                self._last[program] = r
                self.sims[r]._push(at, program, turn)  # due then: a replica not yet past it takes it on time
            nxt = self.due[0][0] if self.due else math.inf
            busy = any(sim.waiting or sim.running or sim.events for sim in self.sims)
            now = min(nxt, now + self.tick_s) if busy else nxt
            if not math.isfinite(now):
                break
            for sim in self.sims:
                until = min(now, self.due[0][0]) if self.due else now
                if sim.now < until:  # a replica's last step may have run past it: it waits
                    sim.run_until(until)
            # a turn that became due mid-tick stopped the replica that was running: route it at once
            now = min(now, self.due[0][0]) if self.due else now
        return self._result()

    def _result(self) -> RunResult:
        results = [sim._result() for sim in self.sims]  # each checks its own leaks
        first = results[0]
        total = {field: sum(getattr(r, field) for r in results) for field in (
            "prompt_tokens", "cached_tokens", "host_reloaded_tokens", "host_reload_wait_s", "host_lost_tokens",
            "reprefilled_tokens", "prefilled_tokens", "output_tokens", "pinned_block_s", "leases_granted",
            "leases_refused", "leases_hit", "leases_expired", "leases_revoked", "preemptions", "num_steps")}
        return RunResult(policy=first.policy, jps=self.jps, num_programs=first.num_programs, jct_s=first.jct_s,
                         turns=first.turns, makespan_s=first.makespan_s,
                         queue_delays_s=np.concatenate([r.queue_delays_s for r in results]), **total)
