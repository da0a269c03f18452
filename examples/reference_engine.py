"""A minimal continuous-batching engine that adopts kvttl: the glue an engine
author writes, and nothing else.

The engine is a toy -- no model runs; a "decoded" token is a hash of the
context -- but its memory is real: a kvttl ``BlockPool`` with a prefix cache
(full blocks registered under chained content hashes, reused by later
prompts), admission in queue order that stops at the first request that does
not fit, chunk-free prefill, one token per request per step, and preemption
when a running request cannot grow.

Everything about programs and leases is the engine kit's. The engine calls it
at five moments (lines marked ``# kit``) and gives it three hooks::

    arrived   -> a request entered            admitted -> it got its blocks
    finished  -> it ended (or was aborted)    tick/step -> every step
    revoke    -> an allocation fell short     queue_key -> the waiting queue's order

Run it: ``python examples/reference_engine.py``. The conformance suite
(``tests/conformance``) drives it exactly like the simulator, vLLM and SGLang.
"""

from __future__ import annotations

import logging
import time

import kvttl
from kvttl.kit import EngineKit, load_config, payload_from_envelope, read_hints

logger = logging.getLogger("kvttl.example")


class Request:
    def __init__(self, rid: str, prompt: list[int], max_tokens: int):
        self.rid, self.prompt, self.max_tokens = rid, list(prompt), max_tokens
        self.output: list[int] = []
        self.blocks: list[int] = []  # block ids holding this request's KV, in order
        self.num_hashed = 0  # leading blocks registered in the prefix cache
        self.cached_tokens = 0  # prompt tokens found in the cache at first admission
        self.arrival = 0.0
        self.done = self.aborted = False
        self.outcome = None  # kvttl's FinishOutcome

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def block_hashes(tokens: list[int], block_size: int, num_blocks: int) -> list[int]:
    """Chained content hashes of the first num_blocks full blocks (as vLLM hashes them)."""
    out, parent = [], 0
    for i in range(num_blocks):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size]))) & (2**64 - 1)
        out.append(parent)
    return out


class ReferenceEngine:
    def __init__(self, *, num_blocks: int = 64, block_size: int = 16, max_running: int = 8,
                 config: dict | None = None, clock=time.monotonic):
        self.block_size = block_size
        self.max_running = max_running
        self.clock = clock
        self.pool = kvttl.BlockPool(num_blocks)
        kit_config, _ = load_config(config, source="ReferenceEngine(config=...)")  # kit
        # The pool is kvttl's: a lease's references live in it, so the hooks hold nothing.
        self.kit = EngineKit(self, num_blocks=num_blocks, block_size=block_size, config=kit_config,  # kit
                             pool=self.pool, clock=clock)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # ---- kvttl.kit.EngineHooks ------------------------------------------------------
    def pin(self, ref):  # kit: the lease's references are in self.pool already
        return ref

    def unpin(self, handle, *, reason: str, copy_out: bool) -> None:  # kit
        logger.debug("a lease %s", reason)

    def copy_out(self, ref) -> None:  # kit: no host tier here (has_host_tier=False), never called
        raise NotImplementedError

    # ---- the engine's API -------------------------------------------------------------
    def add_request(self, rid: str, prompt: list[int], max_tokens: int, *, kv_hints=None) -> Request:
        """kv_hints: a kvttl.kit.make_kv_hints envelope, or None for a plain request."""
        request = self.requests[rid] = Request(rid, prompt, max_tokens)
        request.arrival = self.clock()
        hints = read_hints(payload_from_envelope(kv_hints), log=logger, request=rid)  # kit: never raises
        self.kit.arrived(rid, hints, prompt_tokens=len(prompt), arrival=request.arrival)  # kit
        self.waiting.append(request)
        return request

    def abort(self, rid: str) -> None:
        request = self.requests[rid]
        if request.done:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        request.aborted = True
        self._finish(request)

    def step(self) -> bool:
        """One engine step; False when nothing was left to run."""
        self.kit.tick()  # kit: expiry
        self.waiting.sort(key=lambda r: self.kit.queue_key(self._program_of(r), r.arrival))  # kit
        # Running requests grow by one token each; one that cannot is preempted.
        for request in list(self.running):
            while request in self.running and not self._grow(request, len(request.tokens) + 1):
                self._preempt(self.running[-1])
        while self.waiting and len(self.running) < self.max_running and self._admit(self.waiting[0]):
            self.running.append(self.waiting.pop(0))
        ran = bool(self.running)
        for request in list(self.running):
            request.output.append(hash(tuple(request.tokens[-4:])) % 2048)
            self._register_full(request)
            if len(request.output) >= request.max_tokens:
                self.running.remove(request)
                self._finish(request)
        self.kit.step(scheduled=ran)  # kit: pins never stall the engine
        return ran or bool(self.waiting)

    def run(self) -> None:
        while self.step():
            pass

    # ---- memory ------------------------------------------------------------------------
    def _program_of(self, request: Request):
        turn = self.kit.turn(request.rid)  # kit
        return turn.program.program_id if turn is not None else None

    def _allocate(self, request: Request, n: int):
        ids = self.pool.allocate(n)
        if ids is None and self.kit.num_leases:  # kit: leases go before anything is preempted
            self.kit.revoke(num_blocks=n - self.pool.num_evictable, requester=request.rid, idle=not self.running,
                            arrival=request.arrival, waited_s=self.clock() - request.arrival)
            ids = self.pool.allocate(n)
        return None if ids is None else ids.tolist()

    def _admit(self, request: Request) -> bool:
        tokens = request.tokens
        # Never reuse the block holding the last token: this step computes it.
        hashes = block_hashes(tokens, self.block_size, (len(tokens) - 1) // self.block_size)
        hit = self.pool.acquire_prefix(hashes).tolist()
        need = -(-(len(tokens) + 1) // self.block_size) - len(hit)
        new = self._allocate(request, need)
        if new is None:
            if hit:
                self.pool.drop_ref(hit[::-1])
            return False
        request.blocks, request.num_hashed = hit + new, len(hit)
        if not request.output:  # first admission (not after a preemption)
            request.cached_tokens = len(hit) * self.block_size
        self.kit.admitted(request.rid, device_hit_tokens=len(hit) * self.block_size)  # kit: hand-over
        return True

    def _grow(self, request: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(request.blocks)
        new = self._allocate(request, need) if need > 0 else []
        if new is None:
            return False
        request.blocks.extend(new)
        return True

    def _register_full(self, request: Request) -> None:
        full = min((len(request.tokens) - 1) // self.block_size, len(request.blocks))
        if full > request.num_hashed:
            hashes = block_hashes(request.tokens, self.block_size, full)
            self.pool.register_hashes(request.blocks[request.num_hashed:full], hashes[request.num_hashed:])
            request.num_hashed = full

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._register_full(request)
        self.pool.drop_ref(request.blocks[::-1])
        request.blocks, request.num_hashed = [], 0
        self.waiting.insert(0, request)

    def _finish(self, request: Request) -> None:
        request.done = True
        request.outcome = self.kit.finished(  # kit: TTL, grant, or release
            request.rid, blocks=request.blocks[:request.num_hashed], num_tokens=len(request.tokens),
            free_blocks=self.pool.num_evictable, aborted=request.aborted)
        if request.blocks:
            self.pool.drop_ref(request.blocks[::-1])  # the tail is evicted first
            request.blocks = []


if __name__ == "__main__":
    from kvttl.kit import make_kv_hints

    engine = ReferenceEngine(num_blocks=64, block_size=16)
    first = engine.add_request("a-1", list(range(300)), 8, kv_hints=make_kv_hints("agent-a", tool="bash", ttl="30s"))
    engine.run()
    print("turn 1:", first.outcome)
    for i in range(3):  # other traffic while agent-a's tool runs
        engine.add_request(f"bg-{i}", [5000 + 300 * i + j for j in range(300)], 8)
        engine.run()
    second = engine.add_request("a-2", first.tokens + list(range(900, 950)), 8,
                                kv_hints=make_kv_hints("agent-a", tool="bash", last_turn=True))
    engine.run()
    print(f"turn 2: {second.cached_tokens} of {len(second.prompt)} prompt tokens from the pinned context")
    print("kit:", engine.kit.stats)
