"""vLLM KV connector: Continuum-style TTL leases in a stock vLLM (v1 engine, 0.32).

Turn it on with vLLM's documented connector seam, no fork and no patching::

    vllm serve MODEL --enable-prefix-caching --kv-transfer-config \\
      '{"kv_connector": "KvttlConnector", "kv_connector_module_path": "kvttl_vllm.connector",
        "kv_role": "kv_both", "kv_connector_extra_config": {"policy": "continuum"}}'

(The same dict goes to ``LLM(kv_transfer_config=KVTransferConfig(...))`` offline.)
Where a request names its program: ``kvttl_vllm.hints``.

This module only translates: the lifecycle (programs, TTLs, grants,
hand-over, expiry, revocation, offload decisions, counters) is the engine
kit's (``kvttl.kit.EngineKit``). What vLLM calls, and what it becomes:

- ``bind_gpu_block_pool``      once: vLLM's BlockPool; the kit is made over its block ids
- ``on_new_request``           ``kit.arrived``: the program is back from its tool
- ``update_state_after_alloc`` ``kit.admitted``: the turn holds its prefix, the lease is handed over
- ``request_finished[_all_groups]``  ``kit.finished``: TTL, grant, offload
- ``build_connector_meta``     every step: ``kit.tick`` (expiry) and ``kit.step`` (stalls)
- ``has_pending_block_frees``  an allocation failed: ``kit.revoke`` one lease *before* vLLM preempts
- ``has_pending_push_work``    the engine has no requests: step once more if a lease is due (or a
                               host copy unfinished); else a ``kit.DeadlineWaker`` posts a wake-up
                               to the engine core's input queue at the next deadline
- ``get_kv_connector_stats``   every step: counters and gauges, when they changed

A lease is one extra vLLM reference (``BlockPool.touch``) on each full block
of the finished request, so the blocks stay in vLLM's prefix cache;
dropping it is ``BlockPool.free_blocks``. With a host tier
(``host_tier_gib`` / ``host_tier_blocks``) the blocks of an unpinned lease
are copied to host memory first, and a returning turn whose prefix the
device lost reloads it (``kvttl_vllm.host``):

- ``get_num_new_matched_tokens``  the turn's prefix beyond vLLM's own hit that the host holds
- ``update_state_after_alloc``   where those blocks go on the device
- ``build_connector_meta``       the step's copies, to the workers
- ``start_load_kv``              (worker) runs them: offloads, then reloads, before the forward
- ``update_connector_output``    the workers copied a batch out: its device blocks may go
"""

from __future__ import annotations

import logging
import queue
import sys
import time
import weakref

from kvttl.kit import DeadlineWaker, EngineKit, hint_report, load_config
from kvttl.kit.metrics import BYTE_COUNTERS, StatsReporter
from kvttl.policy import tool_from_output
from kvttl_vllm.hints import request_hints
from kvttl_vllm.host import (
    HOST_TIER_KEYS,
    HostCopier,
    HostIndex,
    KvttlConnectorMetadata,
    KvttlWorkerMeta,
    block_bytes,
    host_slots_from_config,
)
from kvttl_vllm.metrics import KvttlConnectorStats, KvttlPromMetrics
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.core.kv_cache_utils import get_block_hash
from vllm.v1.engine import EngineCoreRequestType
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

logger = logging.getLogger("kvttl.vllm")

__all__ = ["KvttlConnector"]

#: Output tokens read back for the tool name when a turn does not name its tool.
TOOL_PARSE_TOKENS = 1024

#: Every step's metadata without a host tier: nothing to copy (workers only read it).
_NO_COPIES = KvttlConnectorMetadata()


class _Hooks:
    """kvttl.kit.EngineHooks over vLLM's block pool: a lease's hold is one
    more reference on each of the turn's block objects."""

    def __init__(self, connector: "KvttlConnector"):
        self.connector = connector

    def pin(self, blocks: list) -> list:
        self.connector._pool.touch(blocks)
        return blocks

    def unpin(self, blocks: list, *, reason: str, copy_out: bool) -> None:
        if copy_out:
            self.connector._offload(blocks)  # the reference goes once the copy is done
        else:
            self.connector._pool.free_blocks(blocks[::-1])
        logger.debug("kvttl: a lease of %d blocks %s", len(blocks), reason)

    def copy_out(self, blocks: list) -> None:
        self.connector._pool.touch(blocks)  # vLLM frees its own references now; this one after the copy
        self.connector._offload(blocks)


class KvttlConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.HOST  # the only external hits are host-tier reloads

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        # Every bad value fails here, at engine start, naming its key.
        self.config, host_config = load_config(extra, source="kvttl (kv_connector_extra_config)",
                                               extra_keys=HOST_TIER_KEYS)
        self._engine_id = str(self._kv_transfer_config.engine_id or "")
        self._block_size = vllm_config.cache_config.block_size
        self._init_host_tier(host_config, role, kv_cache_config)
        self._tokenizer = None  # loaded on first use, False when there is none
        self._pool = None  # vLLM's BlockPool (scheduler role only)
        self.kit: EngineKit | None = None  # scheduler role, from bind_gpu_block_pool on
        self._local_hit: dict[str, int] = {}  # request id -> vLLM's own prefix hit, until admitted
        self._host_slots_of: dict[str, list[int]] = {}  # request id -> host slots matched, until allocated
        self.byte_stats = dict.fromkeys(BYTE_COUNTERS, 0)
        self._reporter = StatsReporter()
        core = _engine_core() if role == KVConnectorRole.SCHEDULER else None
        # The engine that built this connector (weakly: it owns us), to see whether it is paused.
        self._engine = weakref.ref(core) if core is not None else None
        queue_ = getattr(core, "input_queue", None)  # EngineCoreProc's; an in-process engine has none
        self._engine_queue = queue_ if isinstance(queue_, queue.Queue) else None
        self._waker: DeadlineWaker | None = None  # from bind_gpu_block_pool, where there is an engine queue
        self._idle_wake = False  # the next step is one has_pending_push_work asked for
        logger.info("kvttl connector (%s): policy %s, pinned-share cap %.2f, host tier %d blocks",
                    role.name, self.config.policy, self.config.pinned_share_cap, self._host_slots)

    def _init_host_tier(self, host_config: dict, role: KVConnectorRole, kv_cache_config) -> None:
        self._host_slots = host_slots_from_config(host_config, kv_cache_config)
        if self._host_slots and kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            logger.warning("kvttl: the host tier supports models with one KV cache group; this one has %d: "
                           "leases drop instead of offloading", len(kv_cache_config.kv_cache_groups))
            self._host_slots = 0
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

    @property
    def stats(self) -> dict:
        """The kit's lease counters and this connector's host-tier bytes."""
        return {**(self.kit.stats if self.kit is not None else {}), **self.byte_stats}

    # ---- scheduler side -----------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        self._pool = gpu_block_pool
        # vLLM's prefix-cache reset (reset_prefix_cache, a pause or sleep that
        # clears caches) refuses while any block is referenced, and a lease is
        # a reference: it would fail for as long as any lease lives. A reset
        # drops every context anyway, so the leases go first -- when they are
        # all that stands in its way (used blocks beyond vLLM's null block
        # all leased); otherwise the reset fails as it would, leases kept.
        reset = gpu_block_pool.reset_prefix_cache

        def reset_prefix_cache(*args, **kwargs):
            kit = self.kit
            if kit is not None and kit.num_leases and not (self._hold or self._in_flight):
                used = gpu_block_pool.num_gpu_blocks - gpu_block_pool.get_num_free_blocks() - 1
                if used <= kit.num_pinned:
                    kit.release_all()
            return reset(*args, **kwargs)

        gpu_block_pool.reset_prefix_cache = reset_prefix_cache
        sched = self._vllm_config.scheduler_config
        self.kit = EngineKit(_Hooks(self), num_blocks=gpu_block_pool.num_gpu_blocks, block_size=self._block_size,
                             config=self.config, has_host_tier=self._host is not None,
                             chunk_tokens=sched.max_num_batched_tokens if sched.enable_chunked_prefill else None,
                             kv_bytes_per_token=self._block_bytes / self._block_size)
        if self._engine_queue is not None:
            wakeup = (EngineCoreRequestType.WAKEUP, None)
            self._waker = DeadlineWaker(lambda: self._engine_queue.put_nowait(wakeup), clock=self.kit.clock)
        else:
            logger.info("kvttl: in-process engine: an idle engine expires its leases at its next step")

    def on_new_request(self, request) -> None:
        if self.kit is not None:
            hints = request_hints(request, self.config.tenant_field)
            self.kit.arrived(request.request_id, hints, prompt_tokens=request.num_prompt_tokens,
                             arrival=request.arrival_time)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """vLLM is about to allocate for a waiting request: leases it may
        take go first when the pool is short (:meth:`_make_room`). Then notes
        vLLM's own hit (``num_computed_tokens``, block-aligned) for the kit,
        and returns the blocks of the prompt past it that the host tier
        holds, loaded synchronously in the turn's first step. Never the block
        holding the last prompt token."""
        rid = request.request_id
        if self.kit is not None and self.kit.num_leases:
            self._make_room(request, num_computed_tokens)
        if self.kit is None or self.kit.turn(rid) is None:
            return 0, False
        self._local_hit[rid] = num_computed_tokens
        if self._host is None:
            return 0, False
        self._host.release(self._host_slots_of.pop(rid, None))  # an earlier try that did not fit
        start, stop = num_computed_tokens // self._block_size, (request.num_tokens - 1) // self._block_size
        slots = self._host.match(request.block_hashes[start:stop]) if stop > start else []
        if not slots:
            return 0, False
        self._host_slots_of[rid] = slots
        return len(slots) * self._block_size, False

    def _make_room(self, request, num_computed_tokens: int) -> None:
        """Pins are soft for waiting requests too: vLLM asks a connector to
        free blocks only when a *running* request is short
        (``has_pending_block_frees``), and a waiting one that does not fit
        just waits, so without this it waited until the leases expired or the
        engine ran dry. Here, before vLLM allocates, the blocks it will ask
        for (the whole prompt under ``scheduler_reserve_full_isl``, vLLM's
        default; else this step's chunk) beyond what the pool can give (free
        and evictable blocks, blocks already on their way back from host
        copies, vLLM's watermark) are asked of the kit, which revokes what
        the policy lets this request take (``EngineKit.revoke``)."""
        pool, bs = self._pool, self._block_size
        sched = self._vllm_config.scheduler_config
        config = self._kv_cache_config
        groups = list(range(len(config.kv_cache_groups))) if config is not None else [0]
        end = request.num_tokens
        if sched.enable_chunked_prefill and not getattr(sched, "scheduler_reserve_full_isl", False):
            end = min(end, num_computed_tokens + sched.max_num_batched_tokens)  # (else the whole prompt must fit)
        hit_blocks = num_computed_tokens // bs
        # (a hybrid model's groups each allocate; counting every group in full asks too much, never too little)
        need = (-(-end // bs) - hit_blocks) * len(groups) + int(sched.watermark * pool.num_gpu_blocks)
        available = pool.get_num_free_blocks() + len(self._hold) + sum(len(h) for h, _ in self._in_flight.values())
        if need + hit_blocks * len(groups) <= available:
            return  # it fits even if every hit block is evictable (and so taken from the free count)
        for block_hash in request.block_hashes[:hit_blocks]:  # hits nobody references count as free now
            cached = pool.get_cached_block(block_hash, groups)
            if cached:
                need += sum(b.ref_cnt == 0 for b in cached)
        if need <= available:
            return
        turn = self.kit.turn(request.request_id)
        waited = max(0.0, time.time() - request.arrival_time)  # (vLLM stamps arrival_time with time.time())
        self.kit.revoke(num_blocks=need - available, requester=request.request_id if turn is not None else None,
                        arrival=request.arrival_time, waited_s=waited)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        rid = request.request_id
        if self.kit is None or self.kit.turn(rid) is None:
            return
        slots = self._host_slots_of.pop(rid, None)
        local_hit = self._local_hit.pop(rid, request.num_computed_tokens)
        if slots:
            n = num_external_tokens // self._block_size
            start = local_hit // self._block_size
            self._host.reload(slots[:n], blocks.get_block_ids()[0][start:start + n])
            self._host.release(slots[n:])
            self.byte_stats["reloaded_bytes"] += n * self._block_bytes
        # (vLLM sets request.num_computed_tokens only after this call.)
        self.kit.admitted(rid, device_hit_tokens=local_hit)

    def reset_cache(self) -> bool | None:
        """vLLM's ``reset_prefix_cache(reset_connector=True)``: the host tier
        forgets every copy (leases are device blocks: the prefix-cache reset
        itself drops them). None without a host tier: nothing to reset."""
        if self._host is None:
            return None
        reset = self._host.reset()
        if not reset:
            logger.warning("kvttl: host tier reset refused: copies of this step still hold slots")
        return reset

    def request_finished(self, request, block_ids):
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request, block_ids):
        rid = request.request_id
        turn = self.kit.turn(rid) if self.kit is not None else None
        if turn is None:
            errors = getattr(request, "_kvttl_hint_errors", None)
            return False, None if errors is None else {"kvttl": {**hint_report(errors), "engine_id": self._engine_id}}
        self._local_hit.pop(rid, None)
        if self._host is not None:
            self._host.release(self._host_slots_of.pop(rid, None))  # aborted before its blocks came
        aborted = request.status == RequestStatus.FINISHED_ABORTED
        pool = self._pool
        blocks = [pool.blocks[i] for group in block_ids for i in group
                  if pool.blocks[i].block_hash is not None and not pool.blocks[i].is_null]
        read_tool = not (turn.hints.tool or turn.hints.last_turn or aborted)
        outcome = self.kit.finished(
            rid, blocks=[b.block_id for b in blocks], num_tokens=request.num_computed_tokens,
            free_blocks=pool.get_num_free_blocks(), pin_ref=blocks, aborted=aborted,
            tool=self._tool_in_output(request) if read_tool else None)
        return False, {"kvttl": {**outcome.report(turn.hints), "engine_id": self._engine_id}}

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
        if self.kit is not None:
            self.kit.tick()
            # One empty step alone is no stall: with async scheduling it
            # happens while outputs are in flight; nor is a step whose copies
            # are still running.
            # Nor is an idle engine's step at a deadline.
            scheduled = (getattr(scheduler_output, "total_num_scheduled_tokens", 1) != 0 or bool(self._in_flight)
                         or self._idle_wake)
            self._idle_wake = False
            self.kit.step(scheduled=scheduled)
        if self._host is None:
            return _NO_COPIES
        meta = KvttlConnectorMetadata()
        meta.offloads, meta.reloads = self._host.take()
        if self._hold:
            self._batch += 1
            meta.batch = self._batch
            self._in_flight[self._batch] = (self._hold, [slot for _, slot in meta.offloads])
            self._hold = []
        return meta

    def update_connector_output(self, connector_output) -> None:
        """The workers finished copying batches out: their device blocks may go."""
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KvttlWorkerMeta):
            return
        if meta.copied_bytes and self.kit is not None:
            self.kit.observe_host_copy(meta.copied_bytes, meta.copy_s)
        for batch in meta.done | meta.failed:
            blocks, slots = self._in_flight.pop(batch, ([], []))
            if blocks:
                self._pool.free_blocks(blocks)
            if batch in meta.failed:
                self._host.forget(slots)
            else:
                self.byte_stats["offloaded_bytes"] += len(slots) * self._block_bytes

    def has_pending_block_frees(self) -> bool:
        """vLLM asks this when an allocation failed, before preempting: revoke
        a lease (the policy's victim) and let the scheduler retry next step
        instead. Blocks being copied to the host are pending frees already:
        no further revocation."""
        if self._hold or self._in_flight:
            return True
        return self.kit is not None and bool(self.kit.revoke(num_leases=1))

    def has_pending_push_work(self) -> bool:
        """vLLM asks this only when it has no requests, before it waits for
        one. True (step once more, empty) while host copies are unfinished or
        a lease is due: that step expires it and copies it out. Otherwise the
        waker is set to the next deadline, so an idle server expires its
        leases on time, and ``vllm:kvttl_leases`` stays true."""
        if self._hold or self._in_flight:
            return True  # copies finish even while a pause completes: its cache reset needs the blocks
        if self.kit is None:
            return False
        if self._engine_paused():
            return False  # paused or asleep: due leases wait for the first step after it resumes
        deadline = self.kit.next_deadline()
        if deadline is not None and deadline <= self.kit.clock():
            self._idle_wake = True
            return True
        if self._waker is not None:
            self._waker.wake_at(deadline)
        return False

    def _engine_paused(self) -> bool:
        """The engine is paused (``pause_generation``) or asleep (sleep mode):
        it must not be stepped for kvttl's sake, and its KV may be gone."""
        core = self._engine() if self._engine is not None else None
        try:
            return core is not None and bool(core.is_sleeping())
        except Exception:  # an engine half torn down: treat it as paused
            return True

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

    def holds_lease(self, program_id, *, tenant: str = "") -> bool:
        """Whether the program's last turn is pinned right now."""
        return self.kit is not None and self.kit.has_lease(program_id, tenant=tenant)

    # ---- metrics: vLLM logs these and exports them to Prometheus ----------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Called every step on both sides; only the scheduler side has leases.
        Reports only what changed, so a quiet engine sends nothing."""
        if self.kit is None:
            return None
        data = self._reporter.report(self.kit, self.byte_stats,
                                     self._host.num_filled if self._host is not None else 0)
        return None if data is None else KvttlConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None) -> KVConnectorStats | None:
        return KvttlConnectorStats(data=dict(data)) if data is not None else KvttlConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KvttlPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        if self.kit is not None:
            self.kit.release_all()
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
        copied, seconds = self._copier.take_timing() if self._copier is not None else (0, 0.0)
        if not (self._done or self._failed or copied):
            return None
        meta = KvttlWorkerMeta(done=self._done, failed=self._failed, copied_bytes=copied, copy_s=seconds)
        self._done, self._failed = set(), set()
        return meta

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self):
        pass


def _engine_core():
    """The vLLM engine core building this connector (``EngineCoreProc`` in a
    server, ``EngineCore`` in process), or None. vLLM gives a connector no
    handle on its engine, but builds the scheduler, and the scheduler builds
    this connector, inside ``EngineCore.__init__`` (after a process's input
    queue exists): it is found once, on the stack."""
    from vllm.v1.engine.core import EngineCore  # loaded by now wherever there is one

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, EngineCore):
            return owner
        frame = frame.f_back
    return None
