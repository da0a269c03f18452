"""The core layer: BlockPool and LeaseTable.

Both are thin Python faces over the native objects in ``kvttl._core`` (C++,
csrc/core, headers in include/kvttl): every operation is one native call that validates all of its
input before it changes anything, so a call that raises leaves the state as
it was. Batch calls take a whole request's blocks at once -- a list, tuple or
any 1-D integer array (numpy, or anything with the buffer protocol or DLPack
on the CPU) -- so the Python cost is paid once per request, not per block.

Block ids come back as ``numpy.int32`` arrays.

This layer imports nothing above it (no policy, no engine, no torch).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence, Union

from kvttl import _core
from kvttl.errors import BadArgumentError

__all__ = [
    "BlockPool",
    "LeaseTable",
    "LeaseInfo",
    "GrantResult",
    "RevokeResult",
    "Owner",
    "REVOKE_ORDERS",
]

LeaseInfo = _core.LeaseInfo
GrantResult = _core.GrantResult
RevokeResult = _core.RevokeResult

#: A lease owner: the id of the program (agent session) whose turns share a context.
Owner = Union[str, int]
Ids = Union[Sequence[int], "numpy.ndarray"]  # noqa: F821  (any 1-D integer array)

#: Built-in revocation orders, evaluated natively. ``latest_granted``: under
#: pressure, unpin the newest lease first (Continuum unpins the latest-arriving
#: *program* first: a key function, ``kvttl.policy.latest_program_first``,
#: over leases granted ``priority=`` their program's first arrival).
REVOKE_ORDERS = ("latest_granted", "earliest_deadline", "lowest_priority", "most_blocks")


_UNBOUNDED = 2**63 - 1  # "no limit" for revoke's block and lease counts

# The native orders as key functions, for revoke(where=...): same ties (newest first).
_NATIVE_ORDER_KEYS = {
    "latest_granted": lambda l: -l.lease_id,
    "earliest_deadline": lambda l: (l.deadline, -l.lease_id),
    "lowest_priority": lambda l: (l.priority, -l.lease_id),
    "most_blocks": lambda l: (-l.num_blocks, -l.lease_id),
}


class BlockPool:
    """Fixed-size KV block ids of one memory tier.

    Each block is *free* (no content), *cached* (no references, holds content
    registered under a hash, evictable) or *referenced* (ref >= 1). Cached
    blocks are evicted in LRU order of their last release; free blocks are
    handed out before any cached block is evicted::

        head -> [free, newest first] -> [cached, least .. most recently released] <- tail

    A block released without a hash goes to the head, one with a hash to the
    tail (vLLM's order). ``drop_ref`` queues a batch's hashed blocks in the
    order given, first evicted first: pass a request's blocks in reverse to
    evict its tail before its prefix, as vLLM does. Its unhashed blocks go to
    the head one by one, so the last of them is handed out first.

    Every method is atomic (one lock per pool, shared with its LeaseTable).
    """

    __slots__ = ("_native",)

    def __init__(self, num_blocks: int) -> None:
        self._native = _core.BlockPool(num_blocks)

    def allocate(self, n: int):
        """Takes ``n`` blocks (ref 1 each), evicting cached ones once free ones
        run out. Returns their ids, or ``None`` -- changing nothing -- when
        fewer than ``n`` are free or cached. Raises OutOfBlocksError when ``n``
        exceeds the capacity (it could never succeed)."""
        return self._native.allocate(n)

    def add_ref(self, ids: Ids) -> None:
        """One more reference on each block (a prefix hit). Each must be
        cached or referenced."""
        self._native.add_ref(ids)

    def drop_ref(self, ids: Ids) -> int:
        """One engine reference fewer on each block; returns how many became
        free or cached. References held by leases cannot be dropped here
        (DoubleFreeError)."""
        return self._native.drop_ref(ids)

    def register_hashes(self, ids: Ids, hashes: Sequence[int]) -> int:
        """Registers the content hashes of full, referenced blocks so later
        prefix lookups find them. Hashes are integers in [-2**63, 2**64)
        (negative values are taken modulo 2**64). A hash another block already
        holds is skipped. Returns how many blocks were indexed."""
        return self._native.register_hashes(ids, hashes)

    def lookup_prefix(self, hashes: Sequence[int]):
        """Ids of the longest run of blocks, from the first hash on, whose
        content is cached or referenced. A hash repeated in the run ends it:
        no block comes back twice. Takes no references."""
        return self._native.lookup_prefix(hashes)

    def acquire_prefix(self, hashes: Sequence[int]):
        """``lookup_prefix`` plus ``add_ref`` on the result, atomically."""
        return self._native.acquire_prefix(hashes)

    def evict(self, ids: Ids) -> int:
        """Drops the content of cached blocks (they become free); free blocks
        are left alone, referenced ones are an error. Returns how many were
        evicted."""
        return self._native.evict(ids)

    @property
    def capacity(self) -> int:
        return self._native.capacity

    @property
    def num_free(self) -> int:
        return self._native.num_free

    @property
    def num_cached(self) -> int:
        return self._native.num_cached

    @property
    def num_referenced(self) -> int:
        return self._native.num_referenced

    @property
    def num_evictable(self) -> int:
        """Free plus cached: the most ``allocate`` can take now."""
        return self._native.num_evictable

    @property
    def num_pinned(self) -> int:
        """Blocks at least one lease holds."""
        return self._native.num_pinned

    def ref_count(self, block_id: int) -> int:
        return self._native.ref_count(block_id)

    def pin_count(self, block_id: int) -> int:
        """References on the block held by leases (part of ``ref_count``)."""
        return self._native.pin_count(block_id)

    def block_hash(self, block_id: int) -> int | None:
        return self._native.block_hash(block_id)

    def queue_order(self) -> list[int]:
        """The free queue, head (next allocated) to tail. O(capacity)."""
        return self._native.queue_order()

    def check_invariants(self) -> None:
        """Raises InternalError if any structural invariant fails. O(capacity)."""
        self._native.check_invariants()

    def __repr__(self) -> str:
        n = self._native
        return (
            f"BlockPool(capacity={n.capacity}, free={n.num_free}, cached={n.num_cached}, "
            f"referenced={n.num_referenced}, pinned={n.num_pinned})"
        )


class LeaseTable:
    """Time-limited, owner-keyed, revocable pins on block ids.

    A lease belongs to an owner (a program id), covers a set of blocks and has
    a deadline on the table's clock. An owner holds at most one lease:
    granting again replaces it, the new pins taken before the old are dropped.

    The blocks are one of two kinds:

    - ``LeaseTable(pool)``: a kvttl ``BlockPool``. A lease holds one extra
      reference on each of its blocks, so they are neither allocatable nor
      evictable.
    - ``LeaseTable.for_engine_blocks(num_blocks)``: block ids that an engine
      allocates itself (vLLM's block pool, SGLang's KV pages). The table
      counts pins per block -- for the cap, and so that ``num_blocks_freed``
      says how many blocks no lease pins any more -- and the engine keeps its
      own hold on a lease's blocks while the lease lives.

    One table per pool: a second one is refused.

    Pins are soft. Leases may pin at most ``pinned_share_cap`` of the pool (a
    grant beyond it is refused, as a normal result), and ``revoke`` drops
    leases in a chosen order when the engine needs blocks. Release and expiry
    race normally: releasing what has already gone returns ``None``.

    ``clock`` is any zero-argument callable returning seconds; it defaults to
    ``time.monotonic``. The simulator and tests pass their own; every method
    that reads the clock also takes an explicit ``now``.

    Every method is atomic with respect to the pool and the table.
    """

    # _grant/_release: the native methods, bound once (the per-lease path is
    # a few hundred nanoseconds; attribute lookups are a visible share of it).
    __slots__ = ("_native", "_pool", "_target", "_clock", "_grant", "_release")

    def __init__(
        self,
        pool: BlockPool,
        *,
        pinned_share_cap: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(pool, BlockPool):
            raise BadArgumentError(
                f"LeaseTable needs a kvttl.BlockPool, got {type(pool).__name__}; for blocks an engine "
                "allocates itself, use LeaseTable.for_engine_blocks(num_blocks)")
        self._init(pool._native, pool, pinned_share_cap, clock)

    @classmethod
    def for_engine_blocks(
        cls,
        num_blocks: int,
        *,
        pinned_share_cap: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> "LeaseTable":
        """A table over block ids ``[0, num_blocks)`` whose memory the engine
        owns: grants need no content check, and a lease's pins are counted
        here while the engine holds the blocks itself."""
        table = cls.__new__(cls)
        table._init(_core.EngineBlocks(num_blocks), None, pinned_share_cap, clock)
        return table

    def _init(self, target, pool, pinned_share_cap, clock) -> None:
        if not callable(clock):
            raise BadArgumentError(f"clock must be callable, got {type(clock).__name__}")
        self._native = _core.LeaseTable(target, pinned_share_cap)
        self._grant, self._release = self._native.grant, self._native.release
        self._target = target
        self._pool = pool
        self._clock = clock

    @property
    def pool(self) -> BlockPool | None:
        """The kvttl pool this table pins references in; None for engine blocks."""
        return self._pool

    @property
    def capacity(self) -> int:
        """Blocks the table may pin from (the pool's capacity)."""
        return self._target.capacity

    @property
    def num_pinned(self) -> int:
        """Blocks at least one lease pins."""
        return self._target.num_pinned

    def pin_count(self, block_id: int) -> int:
        """Leases that pin this block."""
        return self._target.pin_count(block_id)

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def grant(
        self,
        owner: Owner,
        blocks: Ids,
        ttl: float,
        *,
        tool: str = "",
        num_tokens: int = 0,
        priority: float = 0.0,
        now: float | None = None,
    ) -> GrantResult:
        """Pins ``blocks`` for ``owner`` until ``now + ttl`` seconds
        (``math.inf``: until released or revoked). In a BlockPool the blocks
        must be cached or referenced. Returns a GrantResult: ``granted`` False (with a
        ``reason``) when the pinned-share cap would be exceeded, in which case
        nothing changed -- an existing lease of the owner stays."""
        return self._grant(owner, blocks, self._clock() if now is None else now, ttl, tool, num_tokens, priority)

    def release(self, owner: Owner, *, lease_id: int | None = None) -> LeaseInfo | None:
        """Drops the owner's lease (only lease ``lease_id``, if given).
        Returns it, or ``None`` if there was none -- expired, revoked,
        replaced or never granted. Lease ids start at 1; ``lease_id=0`` (a
        refused grant's) matches no lease."""
        if lease_id is None:
            return self._release(owner, 0)
        if isinstance(lease_id, bool) or not isinstance(lease_id, int) or not 0 <= lease_id < 2**64:
            raise BadArgumentError(f"release: lease_id must be an int in [0, 2**64), got {lease_id!r}")
        return self._release(owner, lease_id) if lease_id else None

    def expire(self, now: float | None = None) -> list[LeaseInfo]:
        """Drops every lease whose deadline is <= now, each exactly once, in
        deadline order. O(k log n) for k expired leases."""
        return self._native.expire(self._clock() if now is None else now)

    def renew(self, owner: Owner, ttl: float, *, now: float | None = None) -> bool:
        """Sets the deadline to ``now + ttl``. False if the owner holds no lease."""
        return self._native.renew(owner, self._clock() if now is None else now, ttl)

    def extend(self, owner: Owner, seconds: float) -> bool:
        """Pushes the deadline back by ``seconds`` (>= 0)."""
        return self._native.extend(owner, seconds)

    def demote(
        self,
        owner: Owner,
        ttl: float = math.inf,
        *,
        keep_blocks: int | None = None,
        now: float | None = None,
    ) -> int | None:
        """Weakens a lease after the fact: the deadline becomes
        ``min(deadline, now + ttl)``, and with ``keep_blocks`` only the first
        ``keep_blocks`` blocks stay pinned (a newer turn superseded the tail).
        Returns how many blocks became free or cached, or ``None`` if the
        owner holds no lease."""
        if isinstance(keep_blocks, int) and not isinstance(keep_blocks, bool) and keep_blocks < 1:
            raise BadArgumentError(f"demote: keep_blocks must be >= 1 (None keeps them all), got {keep_blocks}; "
                                   "use release to drop a lease")
        return self._native.demote(
            owner, self._clock() if now is None else now, ttl, -1 if keep_blocks is None else keep_blocks
        )

    def revoke(
        self,
        num_blocks: int | None = None,
        order: str | Callable[[LeaseInfo], object] = "latest_granted",
        *,
        num_leases: int | None = None,
        where: Callable[[LeaseInfo], bool] | None = None,
    ) -> RevokeResult:
        """Revokes leases, in ``order``, until at least ``num_blocks`` blocks
        were freed through revocation, ``num_leases`` leases were revoked, or
        none is left; give either or both. "Freed" is: free or cached again in
        a BlockPool, pinned by no lease any more for engine blocks.

        ``order`` is one of REVOKE_ORDERS or a key function over LeaseInfo
        (smallest key revoked first); ``where`` limits revocation to the
        leases it accepts (e.g. only programs of lower priority than the one
        asking). Blocks still held elsewhere free nothing, so the result's
        ``num_blocks_freed`` may exceed or fall short of the need."""
        if num_blocks is None and num_leases is None:
            raise BadArgumentError("revoke: give num_blocks, num_leases or both")
        blocks = _UNBOUNDED if num_blocks is None else num_blocks
        leases = _UNBOUNDED if num_leases is None else num_leases
        if isinstance(order, str) and where is None:
            return self._native.revoke(blocks, leases, order)
        if isinstance(order, str):
            if order not in REVOKE_ORDERS:
                return self._native.revoke(blocks, leases, order)  # the native error names the known ones
            order = _NATIVE_ORDER_KEYS[order]
        if not callable(order):
            raise BadArgumentError(
                f"revoke: order must be one of {', '.join(REVOKE_ORDERS)} or a key function, "
                f"got {type(order).__name__}"
            )
        if where is not None and not callable(where):
            raise BadArgumentError(f"revoke: where must be a predicate over LeaseInfo, got {type(where).__name__}")
        live = self._native.leases()
        if where is not None:
            live = [info for info in live if where(info)]
        ranked = sorted(live, key=order)
        return self._native.revoke_in_order(blocks, leases, [info.lease_id for info in ranked])

    def release_all(self) -> int:
        """Drops every lease; returns how many."""
        return self._native.release_all()

    def get(self, owner: Owner) -> LeaseInfo | None:
        return self._native.get(owner)

    def blocks(self, owner: Owner):
        """The owner's leased block ids (empty if it holds no lease)."""
        return self._native.blocks(owner)

    def leases(self) -> list[LeaseInfo]:
        """Every live lease, oldest grant first."""
        return self._native.leases()

    def older_than(self, max_age: float, *, now: float | None = None) -> list[LeaseInfo]:
        """Leases granted more than ``max_age`` seconds ago: the leak
        detector. A lease that is renewed forever shows up here too."""
        return self._native.older_than(self._clock() if now is None else now, max_age)

    @property
    def num_leases(self) -> int:
        return self._native.num_leases

    @property
    def pinned_share_cap(self) -> float:
        return self._native.pinned_share_cap

    @property
    def max_pinned_blocks(self) -> int:
        """``floor(pinned_share_cap * capacity)``."""
        return self._native.max_pinned_blocks

    def check_invariants(self) -> None:
        """Raises InternalError if the table and the pool disagree."""
        self._native.check_invariants()

    def __len__(self) -> int:
        return self._native.num_leases

    def __contains__(self, owner: Owner) -> bool:
        return self._native.get(owner) is not None

    def __iter__(self) -> Iterator[LeaseInfo]:
        return iter(self._native.leases())

    def __repr__(self) -> str:
        return (
            f"LeaseTable(leases={self._native.num_leases}, pinned={self._target.num_pinned}, "
            f"cap={self._native.pinned_share_cap})"
        )
