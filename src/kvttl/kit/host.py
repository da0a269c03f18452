"""The host tier's index: which host slot holds which block content.

Every engine's host tier has two halves that share nothing but slot ids:
the index (here), which decides which device block goes to which slot and
which slot comes back into which block, and the copier (``kvttl.swap.copier.HostCopier``),
which owns the host memory and moves the bytes. The index is engine-neutral:
a block's content is named by a hash of its tokens and everything before
them -- vLLM's own block hashes, or :func:`page_hashes` for an engine that
has none (SGLang's radix tree).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import kvttl
from kvttl.errors import BadArgumentError

__all__ = ["HostIndex", "page_hashes", "host_tier_slots", "HOST_TIER_KEYS"]

#: The config keys that size a host tier (one slot = one block of every layer).
HOST_TIER_KEYS = ("host_tier_gib", "host_tier_blocks")


def host_tier_slots(extra: dict, block_bytes: int | None, *, source: str = "kvttl") -> int:
    """Host slots from ``host_tier_blocks`` or ``host_tier_gib`` in ``extra``;
    0 when neither is set. ``block_bytes``: one block of every layer of one
    worker (None when the engine cannot say yet: then only a block count
    works). Bad values raise, naming the key."""
    blocks, gib = extra.get("host_tier_blocks"), extra.get("host_tier_gib")
    if blocks is not None and gib is not None:
        raise BadArgumentError(f"{source}: give host_tier_blocks or host_tier_gib, not both")
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise BadArgumentError(f"{source}: host_tier_blocks must be a non-negative int, got {blocks!r}")
        return blocks
    if gib is None:
        return 0
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not (0 <= gib < math.inf):
        raise BadArgumentError(f"{source}: host_tier_gib must be a non-negative number, got {gib!r}")
    if not block_bytes:
        raise BadArgumentError(f"{source}: host_tier_gib needs the engine's block size in bytes; "
                               "give host_tier_blocks instead")
    return int(gib * 2**30) // block_bytes


def page_hashes(tokens: Sequence[int], page_size: int, salt: str = "") -> list[bytes]:
    """One 16-byte hash per full page of ``tokens``, each over the page's
    tokens and the hash before it (and ``salt``: the tenant, so two tenants'
    equal prompts never share a host copy) -- a prefix's hashes are the
    same whatever follows it, as vLLM's block hashes are."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise BadArgumentError(f"page_hashes: page_size must be a positive int, got {page_size!r}")
    parent = hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    out = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[start:start + page_size]))
        parent = h.digest()
        out.append(parent)
    return out


def _key(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "little")


class HostIndex:
    """Which host slot holds which block content, and the copies to run next.

    The slots are a ``kvttl.BlockPool`` indexed by content hash: a slot with
    content and no reference is *cached*, found by prefix lookup and evicted
    least recently used first -- the same cache discipline an engine's device
    pool has, one tier down -- so the tier loses a context's tail before its
    prefix, and what it holds of a context is always a prefix of it. The
    pool's index keys are 64 bits of each hash; ``_content`` keeps the whole
    hash per slot and every lookup checks it, so a truncation collision
    costs a reload, never a wrong one.

    A slot named in the queued copies holds a reference until :meth:`take`,
    so no other copy queued with it can evict and overwrite it.
    """

    def __init__(self, num_slots: int):
        self.pool = kvttl.BlockPool(num_slots)
        self._content: dict[int, bytes] = {}  # slot -> hash of what it holds
        self._offloads: list[tuple[int, int]] = []
        self._reloads: list[tuple[int, int]] = []
        self._held: list[list[int]] = []  # slot references to drop at take()
        self._forgotten: set[int] = set()  # failed slots to evict once their last reference goes

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
            for slot in self._forgotten.intersection(slots):
                if self.pool.ref_count(slot) == 0:
                    self.pool.evict([slot])
                    self._forgotten.discard(slot)

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
        """The queued (offloads, reloads); their slots become evictable again."""
        offloads, reloads = self._offloads, self._reloads
        self._offloads, self._reloads = [], []
        for slots in self._held:
            self.release(slots)
        self._held = []
        return offloads, reloads

    def forget(self, slots) -> None:
        """The copies into or out of ``slots`` failed: their content must not
        be found, and the slots are free again once no one holds them."""
        for slot in slots:
            if self._content.pop(slot, None) is None:
                continue
            if self.pool.ref_count(slot) == 0:
                self.pool.evict([slot])
            else:
                self._forgotten.add(slot)

    def reset(self) -> bool:
        """Forgets every host copy (as after a weight update). Refused --
        False, nothing changed -- while queued copies hold slots, as an
        engine's device pool refuses while blocks are in use."""
        if self.pool.num_referenced:
            return False
        cached = [slot for slot in self._content if self.pool.ref_count(slot) == 0]
        if cached:
            self.pool.evict(cached)
        self._content.clear()
        return True

    @property
    def num_filled(self) -> int:
        """Slots holding content (or about to, once the queued copies run)."""
        return self.pool.num_cached + self.pool.num_referenced
