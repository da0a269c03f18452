"""TTL policies: how long to pin a finished turn's KV blocks.

The engine kit (``kvttl.kit``, which every integration drives) calls a
policy at these points, and only these; every argument is a plain number or
string:

- ``ttl(turn)``                 a non-final turn finished; return seconds to pin (0: don't)
- ``offload(turn)``             the same turn: copy it to the host tier now? (default: no)
- ``set_prior(tool, mean_s)``   once, at start: the operator's expectation of a tool
- ``on_tool_return(tool, s)``   the program's next turn arrived ``s`` seconds after the finish
- ``on_admitted(delay_s, evicted)``  a returning turn waited ``delay_s`` beyond its own
                                prefill (to admission; to its first token where the engine
                                reports first tokens); ``evicted``: its previous context was
                                (partly) gone
- ``on_program_finished(n)``    a program ended after ``n`` turns
- ``on_lease_ended(reason)``    a lease it granted was released, expired or revoked
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import attrs
import numpy as np

from kvttl.errors import BadArgumentError
from kvttl.policy.estimator import DurationCDF, SlidingMean, ToolDurationEstimator, TurnCorrelation

__all__ = [
    "TurnContext",
    "TTLPolicy",
    "NeverPin",
    "FixedTTL",
    "ContinuumPreviewTTL",
    "ContinuumTTL",
    "InferCeptTTL",
    "KvttlTTL",
    "OracleTTL",
    "continuum_tau",
]


@attrs.frozen(kw_only=True)
class TurnContext:
    """What a TTL policy may know about a turn that just finished."""

    program_id: str | int
    #: the tool the program is about to call ("" if unknown)
    tool: str = ""
    #: 0-based index of the turn within its program
    turn_index: int = 0
    #: tokens of context the lease would keep (prompt + output)
    num_tokens: int = 0
    #: blocks the lease would pin
    num_blocks: int = 0
    #: seconds to prefill this context again if it is evicted
    prefill_s: float = 0.0
    #: seconds to reload it from the host tier, None when there is no host copy to count on
    host_reload_s: float | None = None
    #: explicit client hint in seconds, already parsed (see kvttl.policy.parse_ttl)
    hint_ttl_s: float | None = None
    #: free + cached share of the pool, in [0, 1]: 1 is an idle engine
    free_fraction: float = 1.0
    #: tokens of KV the engine holds for running requests and pins
    used_tokens: int = 0

    @property
    def reload_s(self) -> float:
        """Reload(r): the cheaper way back if the context is evicted."""
        return self.prefill_s if self.host_reload_s is None else min(self.prefill_s, self.host_reload_s)


@runtime_checkable
class TTLPolicy(Protocol):
    """How long to pin a finished turn, and what to learn from the engine.

    Subclass it to get the defaults: ``offload`` says no, and the ``on_*``
    hooks learn nothing. Only ``ttl`` (and ``name``) must be written. The
    engine calls these on its scheduling path: a method that raises is
    skipped there (the kit logs the first failure and counts each in
    ``EngineKit.policy_errors``), and ``kvttl simulate`` stops with a
    ``PolicyError`` naming the policy."""

    name: str

    def ttl(self, turn: TurnContext) -> float:
        """Seconds to pin a finished, non-final turn: 0 (don't pin) or more;
        inf pins until released or revoked, within the kit's
        ``config.max_ttl_s`` (600 s unless the operator sets it; the
        simulator sets none). Anything else -- NaN, a negative number, None,
        a bool, or raising -- is a policy error: the kit pins nothing and
        counts it (``EngineKit.policy_errors``)."""
        ...

    def offload(self, turn: TurnContext) -> bool:
        """Whether to copy this turn's blocks to the host tier as it finishes,
        whatever the pin decision (InferCept's swap). Asked only when the
        engine has a host tier."""
        return False

    def set_prior(self, tool: str, mean_s: float) -> None:
        """An operator expects ``tool`` ("*": any tool) to take about ``mean_s``
        seconds (config ``tool_priors_s``); a policy that learns nothing ignores it."""

    def on_tool_return(self, tool: str, duration_s: float) -> None:
        """The program's next turn arrived ``duration_s`` after this one finished."""

    def on_admitted(self, queue_delay_s: float, evicted: bool) -> None:
        """A returning turn waited ``queue_delay_s`` beyond its own prefill: to
        its admission, or to its first token less its prefill where the engine
        reports first tokens (``EngineKit.first_token``); ``evicted``: the
        device had lost part of its previous context."""

    def on_program_finished(self, num_turns: int) -> None:
        """A program sent its last turn, its ``num_turns``-th."""

    def on_lease_ended(self, reason: str) -> None:
        """A lease this policy granted ended: ``released`` (its turn came
        back, or its program ended), ``expired`` or ``revoked``."""


class NeverPin(TTLPolicy):
    """Stock engines: free a finished request's blocks at once."""

    name = "never"

    def ttl(self, turn: TurnContext) -> float:
        return 0.0


class FixedTTL(TTLPolicy):
    """Pin every non-final turn for the same time."""

    def __init__(self, ttl_s: float):
        if not (isinstance(ttl_s, (int, float)) and ttl_s >= 0 and not math.isnan(ttl_s)):
            raise BadArgumentError(f"fixed ttl must be >= 0 seconds, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self.name = f"fixed:{ttl_s:g}s"

    def ttl(self, turn: TurnContext) -> float:
        return self.ttl_s


class ContinuumPreviewTTL(TTLPolicy):
    """The rule of the Continuum authors' released code (a vLLM 0.10.2 fork):
    pin for ``pin_s`` (2 s) when the tool's running mean duration is at most
    ``pin_s``; tools never seen before are pinned too."""

    name = "continuum-preview"

    def __init__(self, pin_s: float = 2.0):
        self.pin_s = pin_s
        self.estimator = ToolDurationEstimator()

    def ttl(self, turn: TurnContext) -> float:
        mean = self.estimator.tool_mean(turn.tool)
        return self.pin_s if mean is None or mean <= self.pin_s else 0.0

    def on_tool_return(self, tool: str, duration_s: float) -> None:
        self.estimator.observe(tool, duration_s)


def continuum_tau(cdf: DurationCDF, value_s: float) -> float:
    """The Continuum rule (paper, Eq. 2)::

        tau* = argmax over tau in {0} U S_f of  F_f(tau) * value - tau

    where value = T * eta + Reload(r) is what a hit saves. Candidates are the
    observed durations; tau = 0 scores 0, so a pin must pay for itself.
    Ties go to the shorter pin."""
    if not value_s > 0:
        return 0.0
    support = cdf.support
    if len(support) == 0:
        return 0.0
    gain = cdf.at_support() * value_s - support
    best = int(np.argmax(gain))  # first maximum: the shortest among equals
    return float(support[best]) if gain[best] > 0 else 0.0


class ContinuumTTL(TTLPolicy):
    """tau* from the paper, with every term learned online.

    - F_f: ``ToolDurationEstimator`` (prior -> global -> per-tool CDF).
    - T: sliding mean of the delay of returning turns that found their
      context evicted, beyond their own prefill (``on_admitted``).
    - eta: ``TurnCorrelation`` over finished programs.
    - Reload: given per turn by the engine (``TurnContext.reload_s``).
    Explicit hints (``hint_ttl_s``) win when ``honor_hints`` is set.
    """

    name = "continuum"

    #: the tool-duration estimate's prior, worth this many returns (None: the paper's staged switch)
    prior_weight: float | None = None

    def __init__(self, *, honor_hints: bool = True, min_samples: int = 100, window: int = 1024):
        self.estimator = ToolDurationEstimator(min_samples=min_samples, window=window, prior_weight=self.prior_weight)
        self.evicted_delay = SlidingMean(256)
        self.correlation = TurnCorrelation()
        self.honor_hints = honor_hints

    def value_s(self, turn: TurnContext) -> float:
        """What a hit saves: T * eta + Reload."""
        return self.evicted_delay.mean() * self.correlation.eta + turn.reload_s

    def ttl(self, turn: TurnContext) -> float:
        if self.honor_hints and turn.hint_ttl_s is not None:
            return turn.hint_ttl_s
        return continuum_tau(self.estimator.cdf(turn.tool), self.value_s(turn))

    def set_prior(self, tool: str, mean_s: float) -> None:
        self.estimator.set_prior(tool, mean_s)

    def on_tool_return(self, tool: str, duration_s: float) -> None:
        self.estimator.observe(tool, duration_s)

    def on_admitted(self, queue_delay_s: float, evicted: bool) -> None:
        if evicted:
            self.evicted_delay.add(queue_delay_s)

    def on_program_finished(self, num_turns: int) -> None:
        self.correlation.add_program(num_turns)


class KvttlTTL(ContinuumTTL):
    """Continuum's tau*, with three corrections from what the server sees.

    - A client's hint is believed only as far as the evidence allows: once a
      tool's durations are known (100 returns in all, or the tool's own), a
      hint is cut to the 99th percentile of the tool's estimated durations.
      A hint of an hour for a tool that has never taken ten seconds pins
      for ten seconds, not an hour; a shorter hint is kept (the client may
      know its program ends early).
    - Pins are soft: a lease revoked before its turn returns saves nothing,
      so a hit is worth ``1 - p`` of Eq. 2's value, p the share of the last
      256 ended leases that were revoked (0 until 32 have ended). Where
      memory is contended, that pins less; where pins survive, nothing
      changes. In the simulator it narrowed kvttl's worst loss to a peer on
      every seed measured, at the price of some of 70B SWE-bench's lead on
      one (benchmarks/README.md, 2026-12-06).
    - The tool durations count from the first return: the prior weighs as
      ``prior_weight`` returns against those seen (``ToolDurationEstimator``),
      where Continuum ignores the returns until there are 100. A server
      with a few agents then pins for what their tools take, not for what
      a 1 s prior guesses. In the simulator it brought 70B SWE-bench
      nearer the oracle (1.072 -> 1.051 of its JCT, geometric mean over ten
      seeds) and moved the rest by their seed-to-seed noise
      (benchmarks/README.md, 2026-12-06, sixth session).
    """

    name = "kvttl"
    prior_weight = 10.0

    #: a hint is cut to this quantile of the tool's estimated durations
    hint_quantile = 0.99
    #: leases whose ends make the revocation share, and how many must have ended first
    revocation_window = 256
    revocation_min_samples = 32

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.revoked = SlidingMean(self.revocation_window)

    def revoked_share(self) -> float:
        """Share of recently ended leases that were revoked (0 before enough ended)."""
        return self.revoked.mean() if len(self.revoked) >= self.revocation_min_samples else 0.0

    def value_s(self, turn: TurnContext) -> float:
        """What a pin is expected to save: Eq. 2's value times the chance it survives."""
        return super().value_s(turn) * (1.0 - self.revoked_share())

    def on_lease_ended(self, reason: str) -> None:
        self.revoked.add(1.0 if reason == "revoked" else 0.0)

    def ttl(self, turn: TurnContext) -> float:
        hint = turn.hint_ttl_s
        if not self.honor_hints or hint is None:
            return super().ttl(turn)
        if self.estimator.stage(turn.tool) == "prior":
            return hint
        # past the prior stage the estimate is made of samples: never empty
        return min(hint, self.estimator.cdf(turn.tool).quantile(self.hint_quantile))


class InferCeptTTL(ContinuumTTL):
    """InferCept-style choice per interception: preserve, discard or swap,
    whichever wastes the least memory x time.

    - preserve: the context's tokens stay resident for the expected call time;
    - discard:  recomputing it later stalls everything resident for the prefill time;
    - swap:     moving it out and back stalls everything resident for the transfer time.

    Preserve is a lease with no deadline (revocable under pressure); swap
    copies the blocks to the host tier; discard frees them.
    """

    name = "infercept"

    def _choice(self, turn: TurnContext) -> str:
        expected = self.estimator.mean(turn.tool)
        resident = max(turn.used_tokens, turn.num_tokens)
        waste = {"preserve": expected * turn.num_tokens, "discard": turn.prefill_s * resident}
        if turn.host_reload_s is not None:
            waste["swap"] = 2 * turn.host_reload_s * resident
        return min(waste, key=waste.get)

    def ttl(self, turn: TurnContext) -> float:
        return math.inf if self._choice(turn) == "preserve" else 0.0

    def offload(self, turn: TurnContext) -> bool:
        return self._choice(turn) == "swap"


#: (program_id, turn_index) -> seconds until the program's next turn arrives,
#: or None when the turn is its last: what only a replay knows.
Future = Callable[[object, int], "float | None"]


class OracleTTL(ContinuumTTL):
    """The clairvoyant TTL: Continuum's rule (Eq. 2) with the future known.

    It knows each tool call's true duration d and whether another turn
    follows (eta = 1 or 0), so the argmax of ``F(tau) * value - tau`` is
    tau = d when d < value and 0 otherwise: it pins exactly the turns whose
    pin pays, for exactly as long as their tool takes -- no pin waits for a
    turn that never comes, none expires a moment before its turn. ``value``
    is what a hit saves, T + Reload(r), with T learned as Continuum learns it.
    It bounds any TTL rule of that cost model on the same engine, queue order
    and host tier; client hints are ignored (it knows better).

    ``future`` is given by a replay (the simulator); no live engine has one."""

    name = "oracle"

    def __init__(self, future: Future):
        if not callable(future):
            raise BadArgumentError("the oracle policy is clairvoyant: it needs the replay's future "
                                   "(only `kvttl simulate` has one; a live engine cannot run it)")
        super().__init__(honor_hints=False)
        self.future = future

    def ttl(self, turn: TurnContext) -> float:
        duration = self.future(turn.program_id, turn.turn_index)
        if duration is None or duration >= self.evicted_delay.mean() + turn.reload_s:
            return 0.0
        return duration + _ORACLE_SLACK_S


#: An oracle's pin outlives its tool by this much, so a turn arriving at
#: the deadline's instant still finds it.
_ORACLE_SLACK_S = 1e-6
