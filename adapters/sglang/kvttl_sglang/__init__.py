"""kvttl for SGLang (0.5.23): TTL leases in the unified radix cache.

    KVTTL_SGLANG_CONFIG='{"policy": "continuum"}' \
      python -m sglang.launch_server --model-path MODEL --radix-cache-backend kvttl

Importing this package does not import SGLang; :mod:`kvttl_sglang.plugin`
is what SGLang loads, and :mod:`kvttl_sglang.cache` holds the cache.
"""

from kvttl_sglang.hints import make_kv_hints

__all__ = ["make_kv_hints"]
