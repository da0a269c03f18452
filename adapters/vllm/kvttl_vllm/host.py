"""The vLLM connector's host tier: where an unpinned context goes instead of
being lost, and where a returning turn reloads it from.

Two halves, one per connector role, that share nothing but the slot ids
carried in the connector metadata:

- ``HostIndex`` (scheduler; the kit's, keyed by vLLM's block hashes)
  decides which device block goes to which host slot and which slot comes
  back into which block, and remembers which content each slot holds.
- ``HostCopier`` (worker; the swap layer's, over vLLM's per-layer KV
  tensors) owns the host memory and runs the copies.

Every copy runs in the worker step whose metadata carries it, and a worker
runs its steps in order, so a slot written in step N is readable from step
N+1 on. Device blocks being copied out stay referenced until the worker
reports the copy done (``KvttlWorkerMeta``): vLLM may run the KV transfer of
a step after its forward pass, and a block freed earlier could be handed to
a new request and overwritten by that forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kvttl.swap.copier
from kvttl.errors import BadArgumentError
from kvttl.kit.host import HOST_TIER_KEYS, HostIndex, host_tier_slots
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

__all__ = ["HostIndex", "HostCopier", "KvttlConnectorMetadata", "KvttlWorkerMeta", "host_slots_from_config",
           "HOST_TIER_KEYS"]


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
    return host_tier_slots(extra, None if kv_cache_config is None else block_bytes(kv_cache_config), source="kvttl")


class HostCopier(kvttl.swap.copier.HostCopier):
    """The worker's host memory and copies (``kvttl.swap.HostCopier``) over
    vLLM's KV tensors: one tensor per attention layer, block first on the CPU
    backend (``[num_blocks, heads, block, 2*head]``) or K and V stacked in
    front on CUDA (``[2, num_blocks, ...]``); each becomes one or two
    block-first layers. Copies follow the compute stream (block zeroing)."""

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
        super().__init__(layers, num_slots, after=_compute_stream if layers[0].is_cuda else None)


def _compute_stream():
    import torch

    return torch.cuda.current_stream()
