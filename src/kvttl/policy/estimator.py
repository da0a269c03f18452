"""Online statistics the TTL policies learn from: tool durations, the queueing
delay an eviction costs, and how much of it pinning can save (eta)."""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import numpy as np

from kvttl.errors import BadArgumentError

__all__ = ["ToolDurationEstimator", "SlidingMean", "TurnCorrelation", "DurationCDF", "ProgramLengths"]


class DurationCDF:
    """A discrete CDF over sorted support points: ``F(t) = #{s <= t} / n``
    for an empirical sample, or a weighted one (``cumulative``).

    ``support`` is the sorted sample itself, the candidate set S_f of the
    Continuum rule. ``cumulative[i]`` is F at ``support[i]`` counted to that
    point (ties: the last equal point holds F), 1 at the end; None means
    every point weighs the same, which keeps the plain empirical CDF free of
    any array beyond its sample. Weighted CDFs come from ``mixture``: a prior
    blended with the returns seen."""

    __slots__ = ("support", "cumulative")

    def __init__(self, sorted_samples: np.ndarray, cumulative: np.ndarray | None = None):
        self.support = sorted_samples
        self.cumulative = cumulative

    @classmethod
    def mixture(cls, parts: list[tuple[float, "DurationCDF"]]) -> "DurationCDF":
        """The CDF of drawing from each part with probability proportional
        to its weight (parts of weight 0, or without support, are left out)."""
        parts = [(w, c) for w, c in parts if w > 0 and len(c.support)]
        if not parts:
            raise BadArgumentError("a mixture needs a part with weight > 0 and support points")
        if len(parts) == 1:
            return parts[0][1]
        total = sum(w for w, _ in parts)
        points = np.concatenate([c.support for _, c in parts])
        masses = np.concatenate([c.masses() * (w / total) for w, c in parts])
        order = np.argsort(points, kind="stable")
        cumulative = np.cumsum(masses[order])
        cumulative /= cumulative[-1]
        return cls(points[order], cumulative)

    def masses(self) -> np.ndarray:
        """Probability of each support point (they sum to 1)."""
        n = len(self.support)
        if self.cumulative is None:
            return np.full(n, 1.0 / n)
        return _steps(self.cumulative, 0.0)

    def _at_index(self, index: np.ndarray | int):
        """F at the support point before ``index`` (0 before the first)."""
        n = len(self.support)
        if self.cumulative is None:
            return index / n
        return np.where(index > 0, self.cumulative[np.maximum(index, 1) - 1], 0.0)

    def __call__(self, t: float) -> float:
        if not len(self.support):
            return 0.0
        return float(self._at_index(int(np.searchsorted(self.support, t, side="right"))))

    def at_support(self) -> np.ndarray:
        """F at each support point, ties counted to the last equal sample.
        By runs of equal points, in one pass: a blended estimate holds each
        of a tool's returns twice (in its own window and in all tools'), so
        ties are the rule there, and a search per point cost more than the
        rest of the decision."""
        support, n = self.support, len(self.support)
        distinct = support[1:] != support[:-1]
        if distinct.all():  # F counted to each point
            return np.arange(1, n + 1) / n if self.cumulative is None else self.cumulative
        run_ends = np.flatnonzero(np.append(distinct, True))
        at_ends = (run_ends + 1) / n if self.cumulative is None else self.cumulative[run_ends]
        return np.repeat(at_ends, _steps(run_ends, -1))

    def survival(self, t: float) -> float:
        return 1.0 - self(t)

    def quantile(self, q: float) -> float:
        """The smallest support point with F >= q; for a plain sample,
        numpy's interpolated quantile (NaN without support)."""
        if not len(self.support):
            return math.nan
        if self.cumulative is None:
            return float(np.quantile(self.support, q))
        index = int(np.searchsorted(self.cumulative, q - 1e-12, side="left"))
        return float(self.support[min(index, len(self.support) - 1)])

    def mean(self) -> float:
        if not len(self.support):
            return math.nan
        return float(self.support.mean() if self.cumulative is None else self.masses() @ self.support)


def _steps(values: np.ndarray, before) -> np.ndarray:
    """``np.diff(values, prepend=before)``, the same numbers, without the
    concatenation that made it the costliest step of a TTL decision."""
    steps = values.copy()
    if len(steps):
        steps[0] -= before
        steps[1:] -= values[:-1]
    return steps


class _Window:
    """The last ``size`` samples, kept both in arrival order (to drop the
    oldest) and sorted (for the CDF). The sorted copy is a numpy array that
    an insert shifts in place, O(size) memmove, so the CDF that every
    return asks for again is one copy of it, not a conversion of a list of
    Python floats (which cost more than the rest of a TTL decision). Its
    capacity doubles as samples arrive, so a tool seen once holds one slot,
    not ``size``."""

    __slots__ = ("order", "_sorted", "size", "_cache")

    def __init__(self, size: int):
        self.order: deque[float] = deque()
        self._sorted = np.empty(min(size + 1, 8), dtype=np.float64)  # + 1: room to insert before dropping
        self.size = size
        self._cache: DurationCDF | None = None

    def add(self, x: float) -> None:
        n = len(self.order)
        if n == len(self._sorted):
            grown = np.empty(min(2 * n, self.size + 1), dtype=np.float64)
            grown[:n] = self._sorted
            self._sorted = grown
        held = self._sorted
        at = int(held[:n].searchsorted(x, side="right"))
        held[at + 1:n + 1] = held[at:n]
        held[at] = x
        self.order.append(x)
        if n + 1 > self.size:
            gone = int(held[:n + 1].searchsorted(self.order.popleft(), side="left"))
            held[gone:n] = held[gone + 1:n + 1]
        self._cache = None

    def __len__(self) -> int:
        return len(self.order)

    def cdf(self) -> DurationCDF:
        if self._cache is None:
            self._cache = DurationCDF(self._sorted[:len(self.order)].copy())
        return self._cache

    def mean(self) -> float:
        return sum(self.order) / len(self.order) if self.order else math.nan


#: the blended estimate cache's key for all tools together (no tool name is None)
_ALL_TOOLS = None


class ToolDurationEstimator:
    """Per-tool duration distributions, learned from (finish -> next arrival) gaps.

    Cold start, as in the Continuum paper: while fewer than ``min_samples``
    returns have been seen in total, an exponential prior with mean
    ``prior_mean_s``; then the global empirical CDF until a tool has
    ``min_samples`` returns of its own; then the tool's own CDF.

    Memory is bounded: each tool, and the global pool, keep a sliding window
    of the last ``window`` durations, so the estimate also follows drift.
    Tool names come from clients, so the per-tool windows are also bounded
    in number (``max_tools``) and in samples held in all (``max_samples``):
    past either, the least recently returned tool that has fewer than
    ``min_samples`` returns is forgotten (else the least recently returned).
    Why: a flood of made-up names, one return each, then only pushes out
    itself and names that never got going, while a tool with an estimate of
    its own keeps it (a first-come rule folded every later tool into one).
    The prior's CDF is represented by ``prior_points`` of its quantiles, so
    every stage hands the TTL rule the same kind of object.

    With ``prior_weight`` (kvttl's policy sets it; Continuum's does not) the
    stages blend instead of switching: the estimate of all tools is the prior
    worth ``prior_weight`` returns mixed with the returns seen, and a tool's
    estimate is that (or the tool's own prior) worth ``prior_weight`` returns
    mixed with the tool's own -- the posterior mean of a Dirichlet process,
    one level per stage. Why: a hard switch ignores the first 99 returns, so
    a small workload (a few programs, tens of returns) is decided by the
    prior alone however plainly its tools contradict it, and the estimate
    jumps at the 100th. Blended at kvttl's weight of 10, ten returns weigh
    as much as the prior and thirty three times as much. ``stage`` still
    reports the staged rule's stage: whether enough returns were seen to
    call a tool's durations known.
    """

    def __init__(self, *, min_samples: int = 100, window: int = 1024, prior_mean_s: float = 1.0,
                 prior_points: int = 64, max_tools: int = 4096, max_samples: int = 262144,
                 prior_weight: float | None = None):
        if min_samples < 1 or window < min_samples:
            raise BadArgumentError(f"need 1 <= min_samples <= window, got {min_samples} and {window}")
        if prior_weight is not None and not (prior_weight > 0 and math.isfinite(prior_weight)):
            raise BadArgumentError(f"prior_weight must be a positive number of returns (or None), got {prior_weight!r}")
        self.prior_weight = prior_weight
        if not (prior_mean_s > 0 and math.isfinite(prior_mean_s)):
            raise BadArgumentError(f"prior_mean_s must be a positive number, got {prior_mean_s}")
        self.min_samples = min_samples
        self.window = window
        self.max_tools = max_tools
        self._global = _Window(window)
        self.max_samples = max(max_samples, window)
        self._tools: OrderedDict[str, _Window] = OrderedDict()  # least recently returned first
        self._tool_samples = 0  # samples held in all per-tool windows
        self.num_observed = 0
        self._prior_points = prior_points
        self._prior = self._exponential(prior_mean_s)
        self._tool_priors: dict[str, DurationCDF] = {}
        # tool (None: all tools) -> (num_observed then, blended estimate)
        self._blended_cache: dict[str | None, tuple[int, DurationCDF]] = {}

    def _exponential(self, mean_s: float) -> DurationCDF:
        q = (np.arange(self._prior_points) + 0.5) / self._prior_points
        return DurationCDF(np.sort(-mean_s * np.log1p(-q)))

    def set_prior(self, tool: str, mean_s: float) -> None:
        """An operator's expectation: ``tool`` takes about ``mean_s`` seconds
        (an exponential prior of that mean), used until the tool has
        ``min_samples`` returns of its own. ``tool`` "*" replaces the prior of
        every tool without one of its own, which holds until ``min_samples``
        returns of all tools together (then their CDF is the estimate)."""
        if not (isinstance(mean_s, (int, float)) and mean_s > 0 and math.isfinite(mean_s)):
            raise BadArgumentError(f"the prior of tool {tool!r} must be a positive number of seconds, got {mean_s!r}")
        self._blended_cache.clear()
        if tool == "*":
            self._prior = self._exponential(float(mean_s))
        elif tool in self._tool_priors or len(self._tool_priors) < self.max_tools:
            self._tool_priors[tool] = self._exponential(float(mean_s))
        else:
            raise BadArgumentError(f"at most {self.max_tools} tool priors")

    def observe(self, tool: str, duration_s: float) -> None:
        """Records one return of ``tool`` after ``duration_s`` seconds."""
        if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s >= 0):
            raise BadArgumentError(f"tool duration must be a finite number >= 0, got {duration_s!r}")
        tool = tool or ""
        win = self._tools.get(tool)
        if win is None:
            win = self._tools[tool] = _Window(self.window)
        else:
            self._tools.move_to_end(tool)
        held = len(win)
        win.add(float(duration_s))
        self._tool_samples += len(win) - held
        while len(self._tools) > self.max_tools or self._tool_samples > self.max_samples:
            self._tool_samples -= len(self._tools.pop(self._victim(tool)))
        self._global.add(float(duration_s))
        self.num_observed += 1

    def _victim(self, keep: str) -> str:
        """The tool to forget: the least recently returned one still short
        of ``min_samples`` (a made-up name has one sample), else the least
        recently returned; never ``keep``, the tool just seen."""
        fallback = None
        for name, win in self._tools.items():
            if name == keep:
                continue
            if len(win) < self.min_samples:
                return name
            if fallback is None:
                fallback = name
        return fallback

    def stage(self, tool: str) -> str:
        """Which estimate ``cdf(tool)`` uses: ``prior``, ``global`` or ``tool``.
        A tool with a prior of its own keeps it until its own samples suffice."""
        win = self._tools.get(tool or "")
        if win is not None and len(win) >= self.min_samples:
            return "tool"
        if self.num_observed < self.min_samples or (tool or "") in self._tool_priors:
            return "prior"
        return "global"

    def cdf(self, tool: str) -> DurationCDF:
        if self.prior_weight is not None:
            return self._blended(tool or "")
        stage = self.stage(tool)
        if stage == "prior":
            return self._tool_priors.get(tool or "", self._prior)
        if stage == "global":
            return self._global.cdf()
        return self._tools[tool or ""].cdf()

    def _blended(self, tool: str) -> DurationCDF:
        """The prior-weighted estimate (see the class docstring), cached
        until the next return of any tool."""
        cached = self._blended_cache.get(tool)
        if cached is not None and cached[0] == self.num_observed:
            return cached[1]
        weight = self.prior_weight
        base = self._tool_priors.get(tool)
        if base is None:  # all tools' estimate: one per return, shared by every tool
            shared = self._blended_cache.get(_ALL_TOOLS)
            if shared is None or shared[0] != self.num_observed:
                shared = (self.num_observed,
                          DurationCDF.mixture([(weight, self._prior), (len(self._global), self._global.cdf())]))
                self._blended_cache[_ALL_TOOLS] = shared
            base = shared[1]
        own = self._tools.get(tool)
        estimate = DurationCDF.mixture([(weight, base), (len(own) if own is not None else 0,
                                                         own.cdf() if own is not None else base)])
        if len(self._blended_cache) >= 64:  # tool names come from clients: bounded
            self._blended_cache.clear()
        self._blended_cache[tool] = (self.num_observed, estimate)
        return estimate

    def mean(self, tool: str) -> float:
        """Mean of the estimate in use (NaN never: the prior has a mean)."""
        return self.cdf(tool).mean()

    def tool_mean(self, tool: str) -> float | None:
        """The tool's own running mean, or None if it was never seen."""
        win = self._tools.get(tool or "")
        return win.mean() if win is not None and len(win) else None


class SlidingMean:
    """Mean of the last ``size`` values (T: queueing delay of evicted returns)."""

    __slots__ = ("_values", "_sum")

    def __init__(self, size: int = 256):
        self._values: deque[float] = deque(maxlen=size)
        self._sum = 0.0

    def add(self, x: float) -> None:
        if len(self._values) == self._values.maxlen:
            self._sum -= self._values[0]
        self._values.append(x)
        self._sum += x

    def mean(self, default: float = 0.0) -> float:
        return self._sum / len(self._values) if self._values else default

    def __len__(self) -> int:
        return len(self._values)


class TurnCorrelation:
    """eta = -Corr(k, N - k) over the turns of the last ``window`` finished programs.

    A finished program of N turns contributes the pairs (k, N - k) for k = 1..N.
    If every program had the same N, N - k would fall exactly as k rises (eta = 1):
    a program's remaining turns are predictable, and all of the queueing delay an
    eviction causes is really saved by pinning. Kept as running sums of integers
    (each program's in closed form), with the window's lengths to take the
    oldest back out: O(1) per program, and a server that ran one workload for
    days learns the next one within ``window`` programs. Until ``min_programs``
    have finished, ``eta`` is ``default``.
    """

    __slots__ = ("n", "sk", "sr", "skk", "srr", "skr", "lengths", "window", "min_programs", "default")

    def __init__(self, *, min_programs: int = 10, default: float = 1.0, window: int = 1024):
        if not (isinstance(window, int) and isinstance(min_programs, int) and 1 <= min_programs <= window):
            raise BadArgumentError(f"need integers 1 <= min_programs <= window, got {min_programs!r} and {window!r}")
        self.n = self.sk = self.sr = self.skk = self.srr = self.skr = 0
        self.lengths: deque[int] = deque()
        self.window = window
        self.min_programs = min_programs
        self.default = default

    @property
    def programs(self) -> int:
        return len(self.lengths)

    def _count(self, num_turns: int, sign: int) -> None:
        big_n = num_turns
        sum_k = big_n * (big_n + 1) // 2
        sum_kk = big_n * (big_n + 1) * (2 * big_n + 1) // 6
        self.n += sign * big_n
        self.sk += sign * sum_k
        self.sr += sign * (big_n * big_n - sum_k)  # sum of N - k
        self.skk += sign * sum_kk
        self.srr += sign * (big_n * big_n * big_n - 2 * big_n * sum_k + sum_kk)  # sum of (N - k)^2
        self.skr += sign * (big_n * sum_k - sum_kk)  # sum of k (N - k)

    def add_program(self, num_turns: int) -> None:
        if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
            raise BadArgumentError(f"a finished program has an integer number of turns >= 1, got {num_turns!r}")
        self.lengths.append(num_turns)
        self._count(num_turns, 1)
        if len(self.lengths) > self.window:
            self._count(self.lengths.popleft(), -1)

    @property
    def eta(self) -> float:
        if self.programs < self.min_programs:
            return self.default
        n = self.n
        cov = self.skr / n - (self.sk / n) * (self.sr / n)
        vk = self.skk / n - (self.sk / n) ** 2
        vr = self.srr / n - (self.sr / n) ** 2
        if vk <= 0 or vr <= 0:
            return self.default
        return float(min(1.0, max(0.0, -cov / math.sqrt(vk * vr))))


class ProgramLengths:
    """The turn counts of the last ``window`` finished programs, and the
    Gittins index they give a program that has finished ``k`` turns.

    With R the turns still to come (N - k, for the finished programs with
    N > k), the index is::

        G(k) = max over d >= 1 of  P(R <= d) / E[min(R, d)]

    the best chance of finishing per turn of service spent trying. Serving
    the highest index first minimises mean completion time when sizes are
    unknown but their distribution is (Gittins; Aalto et al. 2009 for the
    M/G/1 queue). It needs no assumption about the shape: where a program
    that has run longer is nearer its end (every program about 40 turns),
    it favours old programs, as program FCFS does; where it is not (many
    short programs, a few very long ones), it favours new ones, as least
    attained service does. G is in (0, 1]: 1 when one turn is left for sure.

    Why a count per length kept beside the window: ``index`` is asked at
    every sort of the waiting queue, a program finishes far less often, so
    the counts are updated in O(1) per program and the indices are computed
    from them on demand (O(distinct lengths) each) and cached until the
    next program finishes.

    Until ``min_programs`` have finished, and for a program longer than
    every one in the window, ``index`` is None: nothing is known, and the
    caller treats it as a program that has just started (a program cannot
    buy priority by running longer than anybody has)."""

    __slots__ = ("window", "min_programs", "_order", "_counts", "_cache")

    def __init__(self, *, window: int = 1024, min_programs: int = 10):
        if not (isinstance(window, int) and isinstance(min_programs, int) and 1 <= min_programs <= window):
            raise BadArgumentError(f"need integers 1 <= min_programs <= window, got {min_programs!r} and {window!r}")
        self.window = window
        self.min_programs = min_programs
        self._order: deque[int] = deque()
        self._counts: dict[int, int] = {}
        self._cache: dict[int, float | None] = {}

    def __len__(self) -> int:
        return len(self._order)

    def add(self, num_turns: int) -> None:
        """A program finished after ``num_turns`` turns."""
        if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
            raise BadArgumentError(f"a finished program has an integer number of turns >= 1, got {num_turns!r}")
        self._order.append(num_turns)
        self._counts[num_turns] = self._counts.get(num_turns, 0) + 1
        if len(self._order) > self.window:
            old = self._order.popleft()
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]
        self._cache.clear()

    def index(self, turns_done: int) -> float | None:
        """G(turns_done), or None when it is not known (see the class)."""
        if turns_done in self._cache:
            return self._cache[turns_done]
        value = None
        if len(self._order) >= self.min_programs:
            lengths = np.array(sorted(n for n in self._counts if n > turns_done), dtype=np.float64)
            if len(lengths):
                counts = np.array([self._counts[int(n)] for n in lengths], dtype=np.float64)
                left = lengths - turns_done  # R at each length, rising
                done = np.cumsum(counts)  # programs with R <= d, times the number alive
                spent = np.cumsum(counts * left) + left * (done[-1] - done)  # E[min(R, d)], same scale
                value = float(np.max(done / spent))
        if len(self._cache) < 4096:
            self._cache[turns_done] = value
        return value
