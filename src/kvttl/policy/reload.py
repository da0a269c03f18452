"""Reload(r): what rebuilding an evicted context costs."""

from __future__ import annotations

import attrs
import numpy as np

from kvttl.errors import BadArgumentError

__all__ = ["ReloadModel"]


@attrs.frozen(kw_only=True)
class ReloadModel:
    """Prefill time as ``a + b*n + c*n**2`` seconds for n tokens (the paper's
    offline quadratic fit), and host reload as ``bytes / host bandwidth``."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    kv_bytes_per_token: float = 0.0
    host_bytes_per_s: float = 0.0

    @classmethod
    def fit(cls, num_tokens, seconds, **kwargs) -> "ReloadModel":
        """Least-squares fit of measured prefill times (at least 3 points)."""
        n = np.asarray(num_tokens, dtype=np.float64)
        t = np.asarray(seconds, dtype=np.float64)
        if n.ndim != 1 or n.shape != t.shape or len(n) < 3:
            raise BadArgumentError(f"fit needs >= 3 (tokens, seconds) pairs of equal length, got {n.shape} and {t.shape}")
        if not (np.all(np.isfinite(n)) and np.all(np.isfinite(t)) and np.all(n >= 0) and np.all(t >= 0)):
            raise BadArgumentError("fit needs finite, non-negative token counts and times")
        design = np.stack([np.ones_like(n), n, n * n], axis=1)
        (a, b, c), *_ = np.linalg.lstsq(design, t, rcond=None)
        return cls(a=float(a), b=float(b), c=float(c), **kwargs)

    def prefill_s(self, num_tokens: int) -> float:
        n = float(num_tokens)
        return max(0.0, self.a + self.b * n + self.c * n * n)

    def host_reload_s(self, num_tokens: int) -> float | None:
        if self.host_bytes_per_s <= 0:
            return None
        return num_tokens * self.kv_bytes_per_token / self.host_bytes_per_s
