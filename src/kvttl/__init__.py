"""kvttl: KV-cache leases with time-to-live for multi-turn LLM agents.

Layers, bottom up (none imports a layer above it):

- ``kvttl.core``   BlockPool and LeaseTable (native, C++)
- ``kvttl.policy`` TTL policies, duration estimation, queue and revocation orders
- ``kvttl.kit``    the engine kit: one turn lifecycle that every integration drives
- ``kvttl.swap``   pinned host tier and block transfers
- ``kvttl.sim``    the embedded engine simulator (``kvttl simulate``)
- adapters for vLLM and SGLang, imported only by those engines

``import kvttl`` needs neither torch nor a GPU nor an engine.
"""

from __future__ import annotations

from kvttl import errors
from kvttl._core import build_info as _native_build_info, cuda_probe
from kvttl.core import REVOKE_ORDERS, BlockPool, GrantResult, LeaseInfo, LeaseTable, RevokeResult
from kvttl.errors import (
    BadArgumentError,
    DoubleFreeError,
    InternalError,
    KvttlError,
    OutOfBlocksError,
    PolicyError,
    UnknownBlockError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockPool",
    "LeaseTable",
    "LeaseInfo",
    "GrantResult",
    "RevokeResult",
    "REVOKE_ORDERS",
    "KvttlError",
    "BadArgumentError",
    "UnknownBlockError",
    "DoubleFreeError",
    "OutOfBlocksError",
    "PolicyError",
    "InternalError",
    "build_info",
    "cuda_probe",
    "errors",
    "__version__",
]


def build_info() -> dict:
    """What this installation was built with: ``cuda`` (bool),
    ``cuda_runtime_version``, ``debug_checks``, ``sanitizers``, ``compiler``,
    and ``version``. ``cuda_probe()`` says whether a device is usable now."""
    info = dict(_native_build_info())
    info["version"] = __version__
    return info
