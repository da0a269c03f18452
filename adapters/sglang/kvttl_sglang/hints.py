"""The ``kv_hints`` envelope a client sends with each turn: the engine kit's
one format (``kvttl.kit.make_kv_hints``), which vLLM's adapter reads too."""

from kvttl.kit import HINT_ACTION_TYPE, HINT_ACTION_VERSION, make_kv_hints

__all__ = ["HINT_ACTION_TYPE", "HINT_ACTION_VERSION", "make_kv_hints"]
