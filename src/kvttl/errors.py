"""kvttl's exceptions: one root, one subclass per kind of misuse.

A capacity shortfall is never an exception (``BlockPool.allocate`` returns
``None``, ``LeaseTable.grant`` returns a refused ``GrantResult``); these are
raised for input that can never be right. A call that raises changed nothing.
"""

from __future__ import annotations

__all__ = [
    "KvttlError",
    "BadArgumentError",
    "UnknownBlockError",
    "DoubleFreeError",
    "OutOfBlocksError",
    "PolicyError",
    "InternalError",
]


class KvttlError(Exception):
    """Root of every error kvttl raises on purpose."""


class BadArgumentError(KvttlError, ValueError):
    """A malformed value: wrong type or length, NaN or negative time, a
    duplicate id in one call, a block in the wrong state for the operation."""


class UnknownBlockError(KvttlError, LookupError):
    """A block id outside ``[0, capacity)``, or a free block (one with no
    content) where content is required."""


class DoubleFreeError(KvttlError):
    """A reference was dropped that nobody holds."""


class OutOfBlocksError(KvttlError):
    """A request no state of the pool could meet (more blocks than it has)."""


class PolicyError(KvttlError):
    """A scheduling policy's own code (a TTL policy, a queue or revocation
    order) raised or returned something unusable. A live engine's kit skips
    the policy at that call and counts it (``EngineKit.policy_errors``);
    the simulator raises this as soon as it sees one, naming the policy."""


class InternalError(KvttlError):
    """An internal invariant failed: a bug in kvttl. Please report it."""
