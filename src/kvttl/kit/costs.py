"""What a re-prefill and a host reload cost on *this* engine, learned from its own steps.

The TTL rule weighs a pin against Reload(r), the time the turn would spend
rebuilding its context. A constant rate is wrong by an order of magnitude
somewhere: a CPU prefills hundreds of tokens a second, an H100 tens of
thousands. So the engine reports each step (tokens scheduled, seconds taken)
and each host copy (bytes, seconds), and the kit's ReloadModel follows them.
The configured rate is only the prior a fresh engine starts from.
"""

from __future__ import annotations

import math

from kvttl.errors import BadArgumentError
from kvttl.policy import ReloadModel

__all__ = ["StepCosts", "HostCosts", "MIN_SLOPE_SHARE"]

#: The fitted seconds per token never falls below this share of the prior's.
MIN_SLOPE_SHARE = 0.01


def _check(name: str, value, *, integer: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    if not ok or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a finite number"
        raise BadArgumentError(f"{name} must be {kind} >= 0, got {value!r}")
    return float(value)


class StepCosts:
    """Step time as a line, ``seconds = step_s + tokens / tokens_per_s``, fitted
    to the engine's recent steps.

    Why a decayed least-squares line: ``step_s`` is what every forward pass
    pays (weights read, the decode of everything running, launch overhead) and
    the slope is a prefill token's marginal cost; both change with the load, so
    each step's weight decays by ``1 - 1/window`` and the fit follows about the
    last ``window`` steps. Five running sums make an update O(1) in time and
    memory. The prior slope enters as a ridge term worth ``prior_steps`` steps
    of ``prior_tokens`` tokens: before any prefill-sized step is seen -- or
    when the recent steps all have the same size, so that no slope can be
    told apart from the intercept -- the slope stays at the prior. Decode
    steps of long contexts can cost more than small prefills, which can tip
    the fitted slope to zero: it never goes below ``MIN_SLOPE_SHARE`` of the
    prior's, so a re-prefill never looks free.
    """

    __slots__ = ("_w", "_n", "_t", "_nn", "_nt", "_keep", "_ridge", "_prior_slope", "num_steps", "chunk_tokens")

    def __init__(self, *, prior_tokens_per_s: float, chunk_tokens: int | None = None, window: int = 1000,
                 prior_steps: float = 1.0, prior_tokens: int = 128):
        if not prior_tokens_per_s > 0:
            raise BadArgumentError(f"prior_tokens_per_s must be > 0, got {prior_tokens_per_s!r}")
        if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                         or chunk_tokens < 1):
            raise BadArgumentError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._keep = 1.0 - 1.0 / window
        self._ridge = prior_steps * float(prior_tokens) ** 2
        self._prior_slope = 1.0 / prior_tokens_per_s
        self.num_steps = 0
        #: the most tokens the engine prefills in one step (chunked prefill), None: no limit
        self.chunk_tokens = chunk_tokens

    def observe(self, num_tokens: int, seconds: float) -> None:
        """One engine step that scheduled ``num_tokens`` and took ``seconds``."""
        n = _check("num_tokens", num_tokens, integer=True)
        t = _check("seconds", seconds)
        keep = self._keep
        self._w = self._w * keep + 1.0
        self._n = self._n * keep + n
        self._t = self._t * keep + t
        self._nn = self._nn * keep + n * n
        self._nt = self._nt * keep + n * t
        self.num_steps += 1

    def line(self) -> tuple[float, float]:
        """``(step_s, seconds per token)``: the ridge-regularised fit, both >= 0."""
        w, n, t, nn, nt, ridge, prior = self._w, self._n, self._t, self._nn, self._nt, self._ridge, self._prior_slope
        if w == 0:
            return 0.0, prior
        # Normal equations of sum w (t - a - b n)^2 + ridge (b - prior)^2 in (a, b).
        det = w * (nn + ridge) - n * n
        slope = (w * (nt + ridge * prior) - n * t) / det
        floor = prior * MIN_SLOPE_SHARE
        if slope < floor:
            slope = floor
        intercept = (t - slope * n) / w
        if intercept < 0:  # a line through the origin then: the slope carries it all
            intercept = 0.0
            slope = max(floor, (nt + ridge * prior) / (nn + ridge))
        return intercept, slope

    @property
    def tokens_per_s(self) -> float:
        slope = self.line()[1]
        return math.inf if slope == 0 else 1.0 / slope

    def prefill_model(self, base: ReloadModel | None = None) -> ReloadModel:
        """Reload(r) for prefill from the fit: n tokens pay their slope, plus
        one step's fixed cost per ``chunk_tokens`` (a chunked prefill spreads
        over that many steps). Host-tier terms come from ``base``."""
        step_s, slope = self.line()
        per_token = slope + (step_s / self.chunk_tokens if self.chunk_tokens else 0.0)
        host = {} if base is None else {"kv_bytes_per_token": base.kv_bytes_per_token,
                                        "host_bytes_per_s": base.host_bytes_per_s}
        return ReloadModel(b=per_token, **host)


class HostCosts:
    """Host-tier copy bandwidth, bytes over seconds of the recent copies
    (each copy's weight decays by ``1 - 1/window``), and the bytes a token
    of KV takes."""

    __slots__ = ("_bytes", "_seconds", "_keep", "kv_bytes_per_token", "num_copies")

    def __init__(self, *, kv_bytes_per_token: float, window: int = 256):
        self.kv_bytes_per_token = _check("kv_bytes_per_token", kv_bytes_per_token)
        self._bytes = self._seconds = 0.0
        self._keep = 1.0 - 1.0 / window
        self.num_copies = 0

    def observe(self, num_bytes: int, seconds: float) -> None:
        b = _check("num_bytes", num_bytes, integer=True)
        s = _check("seconds", seconds)
        self._bytes = self._bytes * self._keep + b
        self._seconds = self._seconds * self._keep + s
        self.num_copies += 1

    @property
    def bytes_per_s(self) -> float:
        """0 until a copy was timed (no host reload estimate yet)."""
        if self._bytes == 0:
            return 0.0
        return math.inf if self._seconds == 0 else self._bytes / self._seconds
