"""The vLLM connector's host tier: where an unpinned context goes instead of
being lost, and where a returning turn reloads it from.

Two halves, one per connector role, that share nothing but the slot ids
carried in the connector metadata:

- ``HostIndex`` (scheduler) decides which device block goes to which host
  slot and which slot comes back into which block, and remembers which
  content each slot holds.
- ``HostCopier`` (worker) owns the host memory (a ``kvttl.swap.HostTier``)
  and runs the copies with a ``kvttl.swap.TransferEngine`` over vLLM's
  per-layer KV tensors.

Every copy runs in the worker step whose metadata carries it, and a worker
runs its steps in order, so a slot written in step N is readable from step
N+1 on. Device blocks being copied out stay referenced until the worker
reports the copy done (``KvttlWorkerMeta``): vLLM may run the KV transfer of
a step after its forward pass, and a block freed earlier could be handed to
a new request and overwritten by that forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import kvttl
from kvttl.errors import BadArgumentError
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

logger = logging.getLogger("kvttl.vllm")

__all__ = ["HostIndex", "HostCopier", "KvttlConnectorMetadata", "KvttlWorkerMeta", "host_slots_from_config",
           "HOST_TIER_KEYS"]

#: The connector's own config keys, beside the engine kit's (kvttl.kit.KitConfig).
HOST_TIER_KEYS = ("host_tier_gib", "host_tier_blocks")


@dataclass
class KvttlConnectorMetadata(KVConnectorMetadata):
    """What one step asks the workers to copy. ``batch`` names the offloads
    whose device blocks the scheduler holds until the workers report them."""

    batch: int | None = None
    offloads: list[tuple[int, int]] = field(default_factory=list)  # (device block, host slot)
    reloads: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block)


@dataclass
class KvttlWorkerMeta(KVConnectorWorkerMetadata):
    """Offload batches a worker finished, and those that failed. Every
    tensor-parallel worker runs every batch; merged, a batch that any worker
    failed counts as failed. ``copied_bytes`` in ``copy_s``: what one worker
    moved (both ways) since its last report, for the bandwidth Reload(r)
    uses; workers copy their shards in parallel, so merged, the slowest
    worker's figures count."""

    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    copied_bytes: int = 0
    copy_s: float = 0.0

    def aggregate(self, other: "KvttlWorkerMeta") -> "KvttlWorkerMeta":
        failed = self.failed | other.failed
        slow = self if self.copy_s >= other.copy_s else other
        return KvttlWorkerMeta(done=(self.done | other.done) - failed, failed=failed,
                               copied_bytes=slow.copied_bytes, copy_s=slow.copy_s)


def block_bytes(kv_cache_config) -> int:
    """Bytes of one block across every layer of one worker, from vLLM's KV cache config."""
    return sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kv_cache_config.kv_cache_groups)


def host_slots_from_config(extra: dict, kv_cache_config) -> int:
    """Host slots from ``host_tier_blocks`` or ``host_tier_gib`` (one block of
    every layer per slot, per worker); 0 when neither is set. The scheduler
    and every worker compute the same number from the same config."""
    blocks, gib = extra.get("host_tier_blocks"), extra.get("host_tier_gib")
    if blocks is not None and gib is not None:
        raise BadArgumentError("kvttl: give host_tier_blocks or host_tier_gib, not both")
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise BadArgumentError(f"kvttl: host_tier_blocks must be a non-negative int, got {blocks!r}")
        return blocks
    if gib is None:
        return 0
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0:
        raise BadArgumentError(f"kvttl: host_tier_gib must be a non-negative number, got {gib!r}")
    if kv_cache_config is None:
        raise BadArgumentError("kvttl: host_tier_gib needs vLLM's KV cache config; give host_tier_blocks instead")
    return int(gib * 2**30) // block_bytes(kv_cache_config)


def _key(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "little")


class HostIndex:
    """Which host slot holds which block content, and the copies the next step runs.

    The slots are a ``kvttl.BlockPool`` indexed by content hash: a slot with
    content and no reference is *cached*, found by prefix lookup and evicted
    least recently used first -- the same cache discipline vLLM's device pool
    has, one tier down. The pool's index keys are 64 bits of vLLM's block
    hash; ``_content`` keeps the whole hash per slot, and every lookup checks
    it, so a truncation collision costs a reload, never a wrong one.

    A slot named in this step's copies holds a reference until the step's
    metadata is built, so no other copy of the same step can evict and
    overwrite it.
    """

    def __init__(self, num_slots: int):
        self.pool = kvttl.BlockPool(num_slots)
        self._content: dict[int, bytes] = {}  # slot -> vLLM block hash of what it holds
        self._offloads: list[tuple[int, int]] = []
        self._reloads: list[tuple[int, int]] = []
        self._held: list[list[int]] = []  # slot references to drop once the metadata is built

    def _verified(self, slots, hashes) -> list[int]:
        slots = [int(s) for s in slots]
        for i, slot in enumerate(slots):
            if self._content.get(slot) != hashes[i]:
                return slots[:i]
        return slots

    def match(self, hashes: list[bytes]) -> list[int]:
        """Slots holding the longest prefix of ``hashes``, with a reference on each."""
        if not hashes:
            return []
        found = self.pool.acquire_prefix([_key(h) for h in hashes])
        slots = self._verified(found, hashes)
        for slot in [int(s) for s in found[len(slots):]][::-1]:  # one by one: a collision may repeat a slot
            self.pool.drop_ref([slot])
        return slots

    def release(self, slots: list[int]) -> None:
        """Drops references taken by ``match`` that no copy used."""
        if slots:
            self.pool.drop_ref(slots[::-1])

    def reload(self, slots: list[int], blocks: list[int]) -> None:
        """Queues ``slots[i]`` -> device ``blocks[i]``; takes over the references ``match`` took."""
        self._reloads.extend(zip(slots, blocks))
        self._held.append(slots)

    def offload(self, blocks: list[int], hashes: list[bytes]) -> int:
        """Queues device ``blocks`` (a context's full blocks, in order) to host
        slots, skipping the prefix already there; when the tier is full, the
        least recently used slots make room. Returns how many blocks are queued."""
        present = self.match(hashes)
        missing = len(hashes) - len(present)
        n = min(missing, self.pool.num_evictable)
        slots = [int(s) for s in self.pool.allocate(n)] if n else []
        if slots:
            new = hashes[len(present):len(present) + n]
            self.pool.register_hashes(slots, [_key(h) for h in new])
            self._content.update(zip(slots, new))
            self._offloads.extend(zip(blocks[len(present):len(present) + n], slots))
        self._held.append(present + slots)
        return n

    def take(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's (offloads, reloads); their slots become evictable again."""
        offloads, reloads = self._offloads, self._reloads
        self._offloads, self._reloads = [], []
        for slots in self._held:
            self.release(slots)
        self._held = []
        return offloads, reloads

    def forget(self, slots) -> None:
        """The copies into ``slots`` failed: their content must not be found."""
        for slot in slots:
            if self._content.pop(slot, None) is not None and self.pool.ref_count(slot) == 0:
                self.pool.evict([slot])

    def reset(self) -> bool:
        """Forgets every host copy (vLLM's ``reset_prefix_cache(reset_connector=True)``,
        as after a weight update). Refused -- False, nothing changed -- while
        this step's copies hold slots, as vLLM's device pool refuses while
        blocks are in use."""
        if self.pool.num_referenced:
            return False
        cached = [slot for slot in self._content if self.pool.ref_count(slot) == 0]
        if cached:
            self.pool.evict(cached)
        self._content.clear()
        return True

    @property
    def num_filled(self) -> int:
        """Slots holding content (or about to, this step)."""
        return self.pool.num_cached + self.pool.num_referenced


class HostCopier:
    """The worker's host memory and the copies between it and vLLM's KV tensors.

    vLLM hands each worker one KV tensor per attention layer, block first on
    the CPU backend (``[num_blocks, heads, block, 2*head]``) or K and V
    stacked in front on CUDA (``[2, num_blocks, ...]``); each becomes one or
    two ``(num_blocks, page)`` layers of a ``TransferEngine``. A slot holds
    one block of every layer, contiguous.

    Slots whose copy-in failed are remembered: a reload from one reports its
    blocks to vLLM as failed loads instead of loading garbage.
    """

    def __init__(self, kv_caches: dict, num_slots: int, num_blocks: int):
        layers, seen = [], set()
        for name, kv in kv_caches.items():
            if kv.data_ptr() in seen:  # layers that share one KV cache
                continue
            seen.add(kv.data_ptr())
            if kv.shape[0] == num_blocks:
                layers.append(kv)
            elif kv.dim() > 1 and kv.shape[0] == 2 and kv.shape[1] == num_blocks:
                layers.extend((kv[0], kv[1]))
            else:
                raise BadArgumentError(
                    f"kvttl host tier: layer {name!r} has KV shape {tuple(kv.shape)}; expected "
                    f"{num_blocks} blocks in dimension 0, or K and V in dimension 0 and blocks in 1")
        from kvttl.swap import HostTier, TransferEngine

        self.tier = HostTier.for_layers(layers, num_slots=num_slots)
        self.engine = TransferEngine(layers, self.tier)
        self._cuda = self.engine.backend == "cuda"
        self.bad_slots: set[int] = set()
        #: bytes copied (both ways) and the seconds the copies took, since last taken
        self.copied_bytes = 0
        self.copy_s = 0.0
        logger.info("kvttl host tier: %d slots of %d bytes (%.2f GiB, %s backend, %d layer tensors)", num_slots,
                    self.tier.slot_bytes, num_slots * self.tier.slot_bytes / 2**30, self.engine.backend, len(layers))

    def _after(self):
        """Copies start after the work queued on the engine's compute stream (block zeroing)."""
        if not self._cuda:
            return None
        import torch

        return torch.cuda.current_stream()

    def _timed(self, num_blocks: int, started: float) -> None:
        self.copied_bytes += num_blocks * self.tier.slot_bytes
        self.copy_s += time.perf_counter() - started

    def take_timing(self) -> tuple[int, float]:
        """``(bytes, seconds)`` copied since the last call."""
        timing = self.copied_bytes, self.copy_s
        self.copied_bytes, self.copy_s = 0, 0.0
        return timing

    def offload(self, pairs: list[tuple[int, int]]) -> bool:
        blocks, slots = [b for b, _ in pairs], [s for _, s in pairs]
        try:
            started = time.perf_counter()
            self.engine.offload(blocks, slots, after=self._after()).wait()
            self._timed(len(pairs), started)
        except Exception as e:  # a failed copy loses the host copy, never the request
            logger.error("kvttl host tier: offload of %d blocks failed: %s", len(pairs), e)
            self.bad_slots.update(slots)
            return False
        self.bad_slots.difference_update(slots)
        return True

    def reload(self, pairs: list[tuple[int, int]]) -> set[int]:
        """Copies the pairs back; returns the device blocks that did not load."""
        good = [(s, b) for s, b in pairs if s not in self.bad_slots]
        failed = {b for s, b in pairs if s in self.bad_slots}
        if good:
            try:
                started = time.perf_counter()
                self.engine.reload([s for s, _ in good], [b for _, b in good], after=self._after()).wait()
                self._timed(len(good), started)
            except Exception as e:
                logger.error("kvttl host tier: reload of %d blocks failed: %s", len(good), e)
                failed.update(b for _, b in good)
        return failed
