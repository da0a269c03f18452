"""vLLM KV connector: Continuum-style TTL leases in a stock vLLM (v1 engine, 0.32).

Turn it on with vLLM's documented connector seam, no fork and no patching::

    vllm serve MODEL --enable-prefix-caching --kv-transfer-config \\
      '{"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector",
        "kv_role": "kv_both", "kv_connector_extra_config": {"ttl_policy": "continuum"}}'

(The same dict goes to ``LLM(kv_transfer_config=KVTransferConfig(...))`` offline.)

What a request carries, in ``kv_transfer_params`` (OpenAI: the request's
``kv_transfer_params`` field; offline: ``SamplingParams(extra_args={"kv_transfer_params": ...})``)::

    {"kvttl": {"program_id": "agent-7", "tool": "bash", "last_turn": false, "ttl": "30s"}}

or flat in ``vllm_xargs`` / ``extra_args``: ``kvttl_program_id``, ``kvttl_tool``,
``kvttl_last_turn``, ``kvttl_ttl``. A request's vLLM ``session_id`` is its
program id when the hints name none. Requests without a program id take the
normal path, which costs a few dict lookups.

What the engine calls, all on the scheduler thread (program-level FCFS for the
queue is kvttl_vllm.scheduler.KvttlScheduler, a separate flag):

- ``bind_gpu_block_pool``      once: vLLM's BlockPool; kvttl mirrors it for lease bookkeeping
- ``on_new_request``           a turn arrived: learn the tool's duration; hold its lease while it waits
- ``update_state_after_alloc`` the turn got its blocks (its prefix hit included): hand the lease over
- ``request_finished[_all_groups]``  a turn ended: ask the TTL policy; pin its full blocks
- ``build_connector_meta``     every step: expire due leases; if a step scheduled nothing, revoke
- ``has_pending_block_frees``  an allocation failed: revoke leases *before* vLLM preempts
- ``get_kv_connector_stats``   every step: lease counters and gauges, when they changed, for
                               vLLM's log line and its Prometheus registry (``build_prom_metrics``)

With a host tier (``host_tier_gib`` or ``host_tier_blocks`` in the extra
config), a lease that expires or is revoked is copied to host memory before
its blocks become evictable, and a returning turn whose prefix was evicted
from the device reloads it instead of re-prefilling (kvttl_vllm.host):

- ``get_num_new_matched_tokens``  the turn's prefix beyond vLLM's own hit that the host holds
- ``update_state_after_alloc``   where those blocks go on the device
- ``build_connector_meta``       the step's copies, to the workers
- ``start_load_kv``              (worker) runs them: offloads, then reloads, before the forward
- ``update_connector_output``    the workers copied a batch out: its device blocks may go

A lease is one extra vLLM reference (``BlockPool.touch``) on each full block
of the finished request, so the blocks stay in vLLM's prefix cache; dropping
it is ``BlockPool.free_blocks``. kvttl's LeaseTable keeps the deadlines, the
owners, the pinned-share cap and the revocation order over a mirror pool of
the same size.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import kvttl
from kvttl.errors import BadArgumentError, KvttlError
from kvttl.policy import TurnContext, get_policy, parse_turn_hints, tool_from_output
from kvttl.policy.registry import OFFLOAD_MODES
from kvttl_vllm.host import (
    HostCopier,
    HostIndex,
    KvttlConnectorMetadata,
    KvttlWorkerMeta,
    block_bytes,
    host_slots_from_config,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.core.kv_cache_utils import get_block_hash
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.metrics.utils import create_metric_per_engine
from vllm.v1.request import RequestStatus

logger = logging.getLogger("kvttl.vllm")

__all__ = ["KvttlConnector", "parse_hints", "request_hints"]


#: Consecutive steps that schedule nothing before a lease is given back.
STALL_STEPS = 4
#: Programs remembered between turns before the idle ones are forgotten.
MAX_PROGRAMS = 65536
#: Output tokens read back for the tool name when a turn does not name its tool.
TOOL_PARSE_TOKENS = 1024


#: Lease events, counted; exported as ``vllm:kvttl_leases_<event>_total``.
LEASE_EVENTS = ("granted", "refused", "hit", "expired", "revoked", "released")
#: Host-tier traffic (per worker), counted; exported as ``vllm:kvttl_<name>_total``.
BYTE_COUNTERS = ("offloaded_bytes", "reloaded_bytes")
COUNTERS = LEASE_EVENTS + BYTE_COUNTERS
#: Levels, exported as gauges: live leases, the blocks they pin, host slots in use.
LEASE_GAUGES = ("leases", "pinned_blocks", "host_blocks")


class KvttlConnectorStats(KVConnectorStats):
    """One report: lease-event increments since the previous report, and the
    latest gauge values. vLLM aggregates reports between log intervals."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in COUNTERS:
            if key in other.data:
                self.data[key] = self.data.get(key, 0) + other.data[key]
        for key in LEASE_GAUGES:
            if key in other.data:
                self.data[key] = other.data[key]
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"kvttl_{k}": v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not self.data


class KvttlPromMetrics(KVConnectorPromMetrics):
    """kvttl's counters and gauges next to vLLM's own, one child per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            event: create_metric_per_engine(self._counter_cls(
                name=f"vllm:kvttl_leases_{event}", documentation=f"kvttl leases {event}", labelnames=labelnames),
                per_engine_labelvalues)
            for event in LEASE_EVENTS}
        self.counters.update({
            name: create_metric_per_engine(self._counter_cls(
                name=f"vllm:kvttl_{name}", documentation=f"kvttl host tier: {name.replace('_', ' ')}",
                labelnames=labelnames), per_engine_labelvalues)
            for name in BYTE_COUNTERS})
        self.gauges = {
            name: create_metric_per_engine(self._gauge_cls(
                name=f"vllm:kvttl_{name}", documentation=f"kvttl: {name.replace('_', ' ')} now",
                labelnames=labelnames, multiprocess_mode="mostrecent"), per_engine_labelvalues)
            for name in LEASE_GAUGES}

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
        for event, metric in self.counters.items():
            if transfer_stats_data.get(event):
                metric[engine_idx].inc(transfer_stats_data[event])
        for name, metric in self.gauges.items():
            if name in transfer_stats_data:
                metric[engine_idx].set(transfer_stats_data[name])


_UNPARSED = object()


def request_hints(request) -> dict | None:
    """parse_hints for a vLLM Request, once: the result rides on the request,
    so the scheduler's queue and the connector share one parse (and one warning)."""
    hints = getattr(request, "_kvttl_hints", _UNPARSED)
    if hints is _UNPARSED:
        params = request.sampling_params
        hints = request._kvttl_hints = parse_hints(
            request.kv_transfer_params, params.extra_args if params is not None else None,
            session_id=getattr(request, "session_id", None))
    return hints


def parse_hints(kv_transfer_params: dict | None, extra_args: dict | None, *,
                session_id: str | None = None) -> dict | None:
    """The kvttl hints of a request, or None when it has no program id.
    vLLM's ``session_id``, when a request has one, is the program id unless
    the hints name another. Bad hints are dropped with a warning: a garbage
    hint never fails a request."""
    nested = (kv_transfer_params or {}).get("kvttl") if isinstance(kv_transfer_params, dict) else None
    extra = extra_args if isinstance(extra_args, dict) else {}
    if nested is None:
        nested = extra.get("kvttl") if isinstance(extra.get("kvttl"), dict) else None
    if nested is None:
        nested = {k[len("kvttl_"):]: v for k, v in extra.items() if k.startswith("kvttl_")}
    if session_id and isinstance(nested, dict) and nested.get("program_id") is None:
        nested = {**nested, "program_id": session_id}
    try:
        hints = parse_turn_hints(nested)
    except KvttlError as e:
        logger.warning("kvttl: ignoring request hints: %s", e)
        return None
    if hints is None:
        return None
    for problem in hints.warnings:
        logger.warning("kvttl: program %r: %s", hints.program_id, problem)
    return {"program_id": hints.program_id, "tool": hints.tool, "last_turn": hints.last_turn, "ttl_s": hints.ttl_s}


class KvttlConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.HOST  # the only external hits are host-tier reloads

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._policy_name = str(extra.get("ttl_policy", "continuum"))
        self._cap = float(extra.get("pinned_share_cap", 0.8))
        self._engine_id = str(self._kv_transfer_config.engine_id or "")
        self._policy = get_policy(self._policy_name)  # fails fast on an unknown name
        self._block_size = vllm_config.cache_config.block_size
        self._init_host_tier(extra, role, kv_cache_config)
        self._tokenizer = None  # loaded on first use, False when there is none
        self._pool = None  # vLLM's BlockPool (scheduler role only)
        self._mirror: kvttl.BlockPool | None = None
        self._table: kvttl.LeaseTable | None = None
        self._leased: dict[Any, list] = {}  # owner -> vLLM blocks holding a lease reference
        self._requests: dict[str, dict] = {}  # request id -> hints, for requests with a program id
        self._last_finish: dict[Any, tuple[float, str, int]] = {}  # owner -> (finish time, tool, context tokens)
        self._num_turns: dict[Any, int] = {}
        self._empty_steps = 0
        self.stats = dict.fromkeys(COUNTERS, 0)
        self._reported = dict.fromkeys(COUNTERS + LEASE_GAUGES, 0)
        logger.info("kvttl connector (%s): ttl policy %s, pinned-share cap %.2f, host tier %d blocks (offload %s)",
                    role.name, self._policy_name, self._cap, self._host_slots, self._offload_mode)

    def _init_host_tier(self, extra: dict, role: KVConnectorRole, kv_cache_config) -> None:
        self._host_slots = host_slots_from_config(extra, kv_cache_config)
        mode = extra.get("offload")
        if mode is None:  # the policy's, or on_unpin: a configured host tier is meant to be used
            mode = self._policy.offload if self._policy.offload != "none" else "on_unpin"
        if mode not in OFFLOAD_MODES:
            raise BadArgumentError(f"kvttl: offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        if self._host_slots and kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            logger.warning("kvttl: the host tier supports models with one KV cache group; this one has %d: "
                           "leases drop instead of offloading", len(kv_cache_config.kv_cache_groups))
            self._host_slots = 0
        self._offload_mode = mode if self._host_slots else "none"
        self._block_bytes = block_bytes(kv_cache_config) if kv_cache_config is not None else 0
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0
        # scheduler side
        self._host = HostIndex(self._host_slots) if self._host_slots and role == KVConnectorRole.SCHEDULER else None
        self._hold: list = []  # vLLM blocks this step copies out, referenced until the workers are done
        self._in_flight: dict[int, tuple[list, list[int]]] = {}  # batch -> (held blocks, host slots)
        self._batch = 0
        # worker side
        self._copier: HostCopier | None = None
        self._done: set[int] = set()
        self._failed: set[int] = set()
        self._load_errors: set[int] = set()
        if self._host and self._kv_transfer_config.kv_load_failure_policy == "fail":
            logger.info("kvttl: a failed host reload fails its request (kv_load_failure_policy=fail); "
                        "set kv_load_failure_policy=recompute to recompute it instead")

    # ---- scheduler side -----------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        self._pool = gpu_block_pool
        n = gpu_block_pool.num_gpu_blocks
        # The mirror: every block is "referenced by the engine", so the lease
        # table may pin any of them; pins are what it counts.
        self._mirror = kvttl.BlockPool(n)
        self._mirror.allocate(n)
        self._table = kvttl.LeaseTable(self._mirror, pinned_share_cap=self._cap)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """The blocks of the turn's prompt past vLLM's own hit (``num_computed_tokens``,
        block-aligned) that the host tier holds, loaded synchronously in the
        turn's first step. Never the block holding the last prompt token."""
        hints = self._requests.get(request.request_id)
        if hints is None:
            return 0, False
        hints["local_hit"] = num_computed_tokens
        if self._host is None:
            return 0, False
        self._host.release(hints.pop("host_slots", None))  # an earlier try that did not fit
        start, stop = num_computed_tokens // self._block_size, (request.num_tokens - 1) // self._block_size
        slots = self._host.match(request.block_hashes[start:stop]) if stop > start else []
        if not slots:
            return 0, False
        hints["host_slots"] = slots
        return len(slots) * self._block_size, False

    def on_new_request(self, request) -> None:
        hints = request_hints(request)
        if hints is None:
            return
        hints = dict(hints)  # the connector's per-request state from here on
        hints["arrival"] = time.monotonic()
        if len(self._last_finish) > MAX_PROGRAMS:  # programs that never sent a last turn
            self._forget_idle_programs(hints["arrival"])
        self._requests[request.request_id] = hints
        owner = hints["program_id"]
        prev = self._last_finish.get(owner)
        if prev is not None:
            finished_at, tool, _ = prev
            self._policy.ttl.on_tool_return(tool, max(0.0, hints["arrival"] - finished_at))
        if self._table is not None and owner in self._table:
            self.stats["hit"] += 1
            self._table.renew(owner, math.inf)  # never expires while its turn waits

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        hints = self._requests.get(request.request_id)
        if hints is None:
            return
        slots = hints.pop("host_slots", None)
        if slots:
            n = num_external_tokens // self._block_size
            start = hints["local_hit"] // self._block_size
            self._host.reload(slots[:n], blocks.get_block_ids()[0][start:start + n])
            self._host.release(slots[n:])
            self.stats["reloaded_bytes"] += n * self._block_bytes
        if hints.get("admitted"):
            return
        hints["admitted"] = True
        owner = hints["program_id"]
        prev = self._last_finish.get(owner)
        if prev is not None:
            context = prev[2]
            # (vLLM sets request.num_computed_tokens only after this call)
            hit = hints.get("local_hit", request.num_computed_tokens) + num_external_tokens
            evicted = hit < (context - 1) // self._block_size * self._block_size
            self._policy.ttl.on_admitted(time.monotonic() - hints["arrival"], evicted)
        # The turn holds references on its prefix now: the old lease can go.
        self._drop(owner, "released")

    def request_finished(self, request, block_ids):
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request, block_ids):
        hints = self._requests.pop(request.request_id, None)
        if hints is None or self._table is None:
            return False, None
        if self._host is not None:
            self._host.release(hints.pop("host_slots", None))  # aborted before its blocks came
        owner = hints["program_id"]
        self._num_turns[owner] = self._num_turns.get(owner, 0) + 1
        params: dict[str, Any] = {"lease_granted": False, "engine_id": self._engine_id}
        if hints["last_turn"] or request.status == RequestStatus.FINISHED_ABORTED:
            self._drop(owner, "released")
            self._last_finish.pop(owner, None)
            if hints["last_turn"]:
                self._policy.ttl.on_program_finished(self._num_turns.pop(owner))
            return False, {"kvttl": params}
        context = request.num_computed_tokens
        blocks = [self._pool.blocks[i] for group in block_ids for i in group
                  if self._pool.blocks[i].block_hash is not None and not self._pool.blocks[i].is_null]
        if not hints["tool"]:  # the client did not say: read it from the output
            hints["tool"] = self._tool_in_output(request)
        params["tool"] = hints["tool"]
        now = time.monotonic()
        self._last_finish[owner] = (now, hints["tool"], context)
        evictable = self._pool.get_num_free_blocks()
        turn = TurnContext(program_id=owner, tool=hints["tool"], num_tokens=context, num_blocks=len(blocks),
                           prefill_s=self._prefill_estimate(context), hint_ttl_s=hints["ttl_s"],
                           free_fraction=evictable / self._pool.num_gpu_blocks)
        ttl = self._policy.ttl.ttl(turn)
        granted = False
        if ttl > 0 and blocks:
            grant = self._table.grant(owner, [b.block_id for b in blocks], ttl, tool=hints["tool"],
                                      num_tokens=context, now=now)
            if grant.granted:
                # The table replaced any older lease of this owner; its vLLM
                # references go after the new ones are taken.
                replaced = self._leased.get(owner)
                self._pool.touch(blocks)
                self._leased[owner] = blocks
                if replaced:
                    self._pool.free_blocks(replaced[::-1])
                self.stats["granted"] += 1
                granted = True
                params.update(lease_granted=True, lease_id=grant.lease_id, ttl_s=ttl,
                              expires_in_s=ttl, num_blocks=len(blocks))
            else:
                self.stats["refused"] += 1
                logger.debug("kvttl: lease for %r refused: %s", owner, grant.reason)
        if blocks and self._offload_at_finish(turn, granted):
            self._pool.touch(blocks)  # vLLM frees its references now; these go once the copy is done
            self._offload(blocks)
        return False, {"kvttl": params}

    def _offload_at_finish(self, turn: TurnContext, granted: bool) -> bool:
        mode = self._offload_mode
        if mode == "none":
            return False
        per_turn = getattr(self._policy.ttl, "offload", None)  # InferCept's swap choice
        return mode == "on_finish" or (mode == "on_unpin" and not granted) or bool(per_turn and per_turn(turn))

    def _offload(self, blocks: list) -> None:
        """Queues the host copy of blocks this connector holds a reference on,
        and keeps the reference until the workers report the copy; blocks the
        host already holds (or that do not fit) are freed at once."""
        n = self._host.offload([b.block_id for b in blocks], [get_block_hash(b.block_hash) for b in blocks])
        if n:
            self._hold.extend(blocks[::-1])
        else:
            self._pool.free_blocks(blocks[::-1])

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = self._expire_and_unstall(scheduler_output)
        if self._host is not None:
            meta.offloads, meta.reloads = self._host.take()
            if self._hold:
                self._batch += 1
                meta.batch = self._batch
                self._in_flight[self._batch] = (self._hold, [slot for _, slot in meta.offloads])
                self._hold = []
        return meta

    def _expire_and_unstall(self, scheduler_output) -> KvttlConnectorMetadata:
        if self._table is not None and self._table.num_leases:
            for lease in self._table.expire():
                self._free(lease.owner, "expired")
            # Pins never stop the engine: the scheduler runs only while work is
            # pending, so steps that schedule nothing, several in a row, while
            # leases hold memory give one back (a waiting request that does not
            # fit never reaches has_pending_block_frees). One empty step alone
            # is no stall: with async scheduling it happens while outputs are
            # in flight.
            if getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0 and not self._in_flight:
                self._empty_steps += 1
                if self._empty_steps >= STALL_STEPS:
                    self._revoke(1)
                    self._empty_steps = 0
            else:
                self._empty_steps = 0
        return KvttlConnectorMetadata()

    def update_connector_output(self, connector_output) -> None:
        """The workers finished copying batches out: their device blocks may go."""
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KvttlWorkerMeta):
            return
        for batch in meta.done | meta.failed:
            blocks, slots = self._in_flight.pop(batch, ([], []))
            if blocks:
                self._pool.free_blocks(blocks)
            if batch in meta.failed:
                self._host.forget(slots)
            else:
                self.stats["offloaded_bytes"] += len(slots) * self._block_bytes

    def has_pending_block_frees(self) -> bool:
        """vLLM asks this when an allocation failed, before preempting: revoke
        a lease and let the scheduler retry next step instead. Blocks being
        copied to the host are pending frees already: no further revocation."""
        if self._hold or self._in_flight:
            return True
        return self._revoke(1) > 0

    def _revoke(self, num_leases: int) -> int:
        """Drops up to num_leases leases, latest granted first. (The mirror pool
        never sees a block freed -- vLLM owns the blocks -- so the victims are
        chosen here rather than by LeaseTable.revoke's freed-block count.)"""
        if self._table is None or not self._table.num_leases:
            return 0
        victims = sorted(self._table.leases(), key=lambda l: -l.lease_id)[:num_leases]
        for lease in victims:
            self._table.release(lease.owner, lease_id=lease.lease_id)
            self._free(lease.owner, "revoked")
        return len(victims)

    def _drop(self, owner, why: str | None) -> None:
        if self._table is not None and self._table.release(owner) is not None:
            self._free(owner, why)

    def _free(self, owner, why: str | None) -> None:
        """Drops the owner's lease references; an expired or revoked lease is
        copied to the host tier first when the policy offloads on unpin."""
        blocks = self._leased.pop(owner, None)
        if blocks:
            if why in ("expired", "revoked") and self._offload_mode != "none":
                self._offload(blocks)
            else:
                self._pool.free_blocks(blocks[::-1])
        if why:
            self.stats[why] += 1
            logger.debug("kvttl: lease of %r %s", owner, why)

    def _tool_in_output(self, request) -> str:
        """The tool the turn's output calls (kvttl.policy.tool_from_output over
        its last TOOL_PARSE_TOKENS tokens), or "" without a tokenizer."""
        if self._tokenizer is None:
            model = self._vllm_config.model_config
            self._tokenizer = False
            if not model.skip_tokenizer_init:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(
                        model.tokenizer, revision=model.tokenizer_revision, trust_remote_code=model.trust_remote_code)
                except Exception as e:  # a tokenizer kvttl cannot load costs tool names, not requests
                    logger.warning("kvttl: no tokenizer for tool names (%s); pass the tool as a hint", e)
        if not self._tokenizer:
            return ""
        ids = list(request.output_token_ids)[-TOOL_PARSE_TOKENS:]
        return tool_from_output(self._tokenizer.decode(ids, skip_special_tokens=True))

    def holds_lease(self, program_id) -> bool:
        """Whether the program's last turn is pinned right now (for the scheduler's order)."""
        return self._table is not None and program_id in self._table

    def _forget_idle_programs(self, now: float) -> None:
        """Forget the programs holding no lease, oldest finish first, down to half the bound."""
        idle = sorted((finished, owner) for owner, (finished, _, _) in self._last_finish.items()
                      if self._table is None or owner not in self._table)
        for _, owner in idle[: max(0, len(self._last_finish) - MAX_PROGRAMS // 2)]:
            del self._last_finish[owner]
            self._num_turns.pop(owner, None)

    def _prefill_estimate(self, num_tokens: int) -> float:
        """Reload(r) without a measured fit: linear at 10k tokens/s. Engines
        that know better pass ``reload_tokens_per_s`` in the extra config."""
        rate = float((self._kv_transfer_config.kv_connector_extra_config or {}).get("reload_tokens_per_s", 10_000))
        return num_tokens / rate

    # ---- metrics: vLLM logs these and exports them to Prometheus ----------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Called every step on both sides; only the scheduler side has leases.
        Reports only what changed, so a quiet engine sends nothing."""
        if self._table is None:
            return None
        now = {**self.stats, "leases": self._table.num_leases, "pinned_blocks": self._mirror.num_pinned,
               "host_blocks": self._host.num_filled if self._host is not None else 0}
        if now == self._reported:
            return None
        data = {k: now[k] - self._reported[k] for k in COUNTERS if now[k] != self._reported[k]}
        data.update({k: now[k] for k in LEASE_GAUGES})
        self._reported = now
        return KvttlConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None) -> KVConnectorStats | None:
        return KvttlConnectorStats(data=dict(data)) if data is not None else KvttlConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KvttlPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self._table is not None:
            for owner in list(self._leased):
                self._table.release(owner)
                self._free(owner, "released")
        for blocks, _ in self._in_flight.values():
            self._pool.free_blocks(blocks)
        self._in_flight.clear()
        if self._hold:
            self._pool.free_blocks(self._hold)
            self._hold = []

    # ---- worker side: host-tier copies -------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        if not self._host_slots:
            return
        try:
            self._copier = HostCopier(kv_caches, self._host_slots, self._num_blocks)
        except Exception as e:  # no host tier here: every copy reports failure, the engine runs on
            logger.error("kvttl: no host tier on this worker: %s", e)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """This step's copies: offloads (from blocks the scheduler still
        holds), then reloads (into blocks of turns scheduled this step, which
        vLLM runs before the forward pass)."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvttlConnectorMetadata):
            return
        if meta.offloads:
            ok = self._copier is not None and self._copier.offload(meta.offloads)
            if meta.batch is not None:
                (self._done if ok else self._failed).add(meta.batch)
        if meta.reloads:
            if self._copier is None:
                self._load_errors.update(b for _, b in meta.reloads)
            else:
                self._load_errors |= self._copier.reload(meta.reloads)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self):
        if not (self._done or self._failed):
            return None
        meta = KvttlWorkerMeta(done=self._done, failed=self._failed)
        self._done, self._failed = set(), set()
        return meta

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self):
        pass
