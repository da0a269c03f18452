"""HostCopier: an engine's host memory and the copies between it and the
engine's KV tensors -- the copying half of a host tier (the index half,
which slot holds what, is ``kvttl.kit.HostIndex``).

An adapter hands it the engine's KV as a list of per-layer tensors, each
block-first (``(num_blocks, ...)``); it owns a ``HostTier`` whose slot holds
one block of every layer, contiguous, and runs every copy to completion. A
failed copy is logged and reported, never raised: it costs the engine a
re-prefill, not a request. Slots whose copy-in failed are remembered, so a
reload from one reports its blocks as not loaded instead of loading garbage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from kvttl.swap import HostTier, TransferEngine

logger = logging.getLogger("kvttl.swap")

__all__ = ["HostCopier"]


class HostCopier:
    def __init__(self, layers: Sequence, num_slots: int, *, after=None):
        """``layers``: the engine's block-first KV tensors; ``after``: a
        callable returning the stream the copies must follow (the engine's
        compute stream on a GPU), or None."""
        self.tier = HostTier.for_layers(list(layers), num_slots=num_slots)
        self.engine = TransferEngine(list(layers), self.tier)
        self._after = after or (lambda: None)
        self.bad_slots: set[int] = set()
        #: bytes copied (both ways) and the seconds the copies took, since last taken
        self.copied_bytes = 0
        self.copy_s = 0.0
        logger.info("kvttl host tier: %d slots of %d bytes (%.2f GiB, %s backend, %d layer tensors)", num_slots,
                    self.tier.slot_bytes, num_slots * self.tier.slot_bytes / 2**30, self.engine.backend,
                    len(layers))

    @property
    def slot_bytes(self) -> int:
        return self.tier.slot_bytes

    def _timed(self, num_blocks: int, started: float) -> None:
        self.copied_bytes += num_blocks * self.tier.slot_bytes
        self.copy_s += time.perf_counter() - started

    def take_timing(self) -> tuple[int, float]:
        """``(bytes, seconds)`` copied since the last call."""
        timing = self.copied_bytes, self.copy_s
        self.copied_bytes, self.copy_s = 0, 0.0
        return timing

    def offload(self, pairs: list[tuple[int, int]]) -> bool:
        """Copies ``(device block, host slot)`` pairs out; False if it failed
        (the slots then hold nothing usable)."""
        blocks, slots = [b for b, _ in pairs], [s for _, s in pairs]
        try:
            started = time.perf_counter()
            self.engine.offload(blocks, slots, after=self._after()).wait()
            self._timed(len(pairs), started)
        except Exception as e:
            logger.error("kvttl host tier: offload of %d blocks failed: %s", len(pairs), e)
            self.bad_slots.update(slots)
            return False
        self.bad_slots.difference_update(slots)
        return True

    def reload(self, pairs: list[tuple[int, int]]) -> set[int]:
        """Copies ``(host slot, device block)`` pairs back; returns the device
        blocks that did not load."""
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
