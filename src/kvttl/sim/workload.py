"""Agent workloads: programs of turns separated by tool calls.

A *program* is one agent session. Each turn sends a prompt (the previous
context plus new tokens: the tool's observation), generates an output, then
calls a tool; the next turn arrives when the tool returns. Contexts are
append-only unless a turn's prompt is shorter than the context so far (a
compaction), which starts a fresh context.

Sources: synthetic generators (``swe-bench``, ``bfcl``) whose every parameter
can be overridden from a TOML or JSON spec file, and importers for TraceLab
JSONL and Dynamo agentic-Mooncake JSONL traces.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import attrs
import numpy as np

from kvttl.errors import BadArgumentError
from kvttl.policy import is_tool_name, parse_ttl
from kvttl.policy.hints import MAX_TOOL_BYTES

__all__ = [
    "Turn", "Program", "ToolSpec", "WorkloadSpec", "WORKLOADS", "get_workload", "load_workload_spec",
    "generate", "load_trace", "poisson_arrivals", "replay_future",
]


@attrs.frozen(kw_only=True)
class Turn:
    #: full prompt length of this turn, in tokens
    prompt_tokens: int
    output_tokens: int
    #: tool called after this turn; None on the last turn
    tool: str | None = None
    #: seconds until the next turn arrives (the tool's duration)
    tool_duration_s: float = 0.0
    #: explicit client TTL hint ("30s", "5m"), if the client sends one
    ttl_hint: str | None = None
    #: from a trace: what the context's first ``hash_extent_tokens`` tokens are,
    #: as rolling block ids of ``Program.hash_block_tokens`` tokens each (Mooncake
    #: ``hash_ids``: equal ids mean equal tokens up to and including that block,
    #: in any program); () without ids, and past the extent the tokens are the
    #: program's own
    hash_ids: tuple[int, ...] = ()
    hash_extent_tokens: int = 0
    #: the prompt does not continue the previous turn's context past the ids
    #: they share (the trace's ids diverged): the rest is new
    new_context: bool = False


@attrs.frozen(kw_only=True)
class Program:
    program_id: int
    arrival_s: float
    turns: tuple[Turn, ...]
    #: leading tokens shared by every program of the workload (a system prompt)
    shared_prefix_tokens: int = 0
    #: tokens per id of the turns' ``hash_ids`` (0: the trace has none)
    hash_block_tokens: int = 0


def replay_future(programs: list[Program]):
    """The oracle's knowledge of a replay: (program id, turn index) -> seconds
    until that program's next turn, None after its last."""
    by_id = {p.program_id: p.turns for p in programs}

    def future(program_id, turn_index):
        turns = by_id.get(program_id, ())  # a request the replay did not make: nothing known
        return turns[turn_index].tool_duration_s if turn_index < len(turns) - 1 else None

    return future


@attrs.frozen(kw_only=True)
class ToolSpec:
    """A tool's duration distribution: lognormal with this median and sigma."""

    name: str
    weight: float
    median_s: float
    sigma: float


#: Bounds that keep a spec's runs finite: a day's median tool call, and
#: lognormal spreads up to e^5 (a p99 150 000x the median at sigma 5).
MAX_TOOL_MEDIAN_S = 86400.0
MAX_SIGMA = 5.0


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return value.bit_length() <= 63
    return math.isfinite(value)


def _lognormal(rng, median, sigma, size=None):
    return median * np.exp(sigma * rng.standard_normal(size))


@attrs.frozen(kw_only=True)
class WorkloadSpec:
    """A synthetic workload. Turns per program: gamma-distributed around
    ``mean_turns`` (shape ``turns_shape``), at least 1, at most ``max_turns``.
    Token counts: lognormal (median, sigma)."""

    name: str
    mean_turns: float
    max_turns: int
    turns_shape: float
    initial_tokens_median: float
    initial_tokens_sigma: float
    shared_prefix_tokens: int
    observation_tokens_median: float
    observation_tokens_sigma: float
    output_tokens_median: float
    output_tokens_sigma: float
    tools: tuple[ToolSpec, ...]
    max_context_tokens: int = 128_000
    #: share of programs whose client sends an explicit TTL hint, and the hint
    ttl_hint_share: float = 0.0
    ttl_hint: str = "5m"
    #: the built-in workload a spec file started from (its loads are swept)
    base: str = ""

    def __attrs_post_init__(self):
        where = f"workload {self.name!r}"
        for f in attrs.fields(WorkloadSpec):
            value = getattr(self, f.name)
            if f.name in ("name", "tools", "ttl_hint", "base"):
                continue
            if not _finite_number(value) or value < 0:
                raise BadArgumentError(f"{where}: {f.name} must be a finite number >= 0, got {value!r}")
        if not (self.turns_shape > 0):
            raise BadArgumentError(f"{where}: turns_shape must be > 0, got {self.turns_shape!r}")
        if not (1 <= self.mean_turns <= self.max_turns):
            raise BadArgumentError(f"{where}: need 1 <= mean_turns <= max_turns")
        if self.max_context_tokens < 1 or self.ttl_hint_share > 1:
            raise BadArgumentError(f"{where}: need max_context_tokens >= 1 and ttl_hint_share <= 1")
        if not isinstance(self.tools, tuple) or not self.tools:
            raise BadArgumentError(f"{where}: needs at least one tool")
        for tool in self.tools:
            if not tool.name or not is_tool_name(tool.name):
                raise BadArgumentError(f"{where}: a tool's name must be a non-empty string of at most "
                                       f"{MAX_TOOL_BYTES} bytes without control characters, got {tool.name!r}")
            for key, high in (("weight", math.inf), ("median_s", MAX_TOOL_MEDIAN_S), ("sigma", MAX_SIGMA)):
                value = getattr(tool, key)
                if not _finite_number(value) or not 0 <= value <= high:
                    raise BadArgumentError(f"{where}: tool {tool.name!r}: {key} must be a number in [0, {high:g}], "
                                           f"got {value!r}")
        if sum(t.weight for t in self.tools) <= 0:
            raise BadArgumentError(f"{where}: every tool has weight 0; give at least one a weight > 0")
        if self.ttl_hint_share > 0:
            parse_ttl(self.ttl_hint)


# SWE-bench with mini-swe-agent (DESIGN.md §4): 10.9 turns on average, step cap 50,
# about 70k +- 20k tokens at the end. The bash tool mix is synthetic, shaped to the
# TraceLab coding-agent statistics (tool latency p50 ~0.3 s, p90 ~14 s; most calls
# under a second, most tool time in minutes-long calls).
SWE_BENCH = WorkloadSpec(
    name="swe-bench", mean_turns=10.9, max_turns=50, turns_shape=10.0,
    initial_tokens_median=6000, initial_tokens_sigma=0.25, shared_prefix_tokens=2048,
    observation_tokens_median=3700, observation_tokens_sigma=0.9,
    output_tokens_median=250, output_tokens_sigma=0.6,
    tools=(
        ToolSpec(name="cat", weight=0.35, median_s=0.15, sigma=0.7),
        ToolSpec(name="grep", weight=0.20, median_s=0.4, sigma=1.0),
        ToolSpec(name="edit", weight=0.20, median_s=0.2, sigma=0.5),
        ToolSpec(name="python", weight=0.20, median_s=6.0, sigma=1.3),
        ToolSpec(name="pip", weight=0.05, median_s=30.0, sigma=1.0),
    ),
)

# BFCL v4 web search: 6.3 turns on average, shorter contexts, network-bound tools.
BFCL = WorkloadSpec(
    name="bfcl", mean_turns=6.3, max_turns=20, turns_shape=4.0,
    initial_tokens_median=1500, initial_tokens_sigma=0.3, shared_prefix_tokens=1024,
    observation_tokens_median=600, observation_tokens_sigma=0.6,
    output_tokens_median=80, output_tokens_sigma=0.5,
    tools=(
        ToolSpec(name="web_search", weight=0.6, median_s=1.2, sigma=0.5),
        ToolSpec(name="fetch_url", weight=0.4, median_s=0.8, sigma=0.7),
    ),
)

WORKLOADS = {"swe-bench": SWE_BENCH, "bfcl": BFCL}


def poisson_arrivals(num: int, jps: float, rng: np.random.Generator) -> np.ndarray:
    if not (jps > 0 and math.isfinite(jps)):
        raise BadArgumentError(f"jobs per second must be a positive number, got {jps!r}")
    return np.cumsum(rng.exponential(1.0 / jps, num))


def generate(spec: WorkloadSpec, num_programs: int, jps: float, seed: int = 0) -> list[Program]:
    """``num_programs`` programs arriving as a Poisson process at ``jps``.
    Deterministic for a given seed; the same seed gives the same programs at
    every load (only the arrival times scale)."""
    if num_programs < 1:
        raise BadArgumentError(f"need at least one program, got {num_programs}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, num_programs)
    arrivals = np.cumsum(gaps) / jps
    weights = np.array([t.weight for t in spec.tools], dtype=np.float64)
    weights = weights / weights.sum()
    programs = []
    for pid in range(num_programs):
        n = int(np.clip(round(rng.gamma(spec.turns_shape, spec.mean_turns / spec.turns_shape)), 1, spec.max_turns))
        hint = spec.ttl_hint if rng.random() < spec.ttl_hint_share else None
        context = max(spec.shared_prefix_tokens + 16, int(_lognormal(rng, spec.initial_tokens_median, spec.initial_tokens_sigma)))
        turns = []
        for k in range(n):
            out = max(1, int(_lognormal(rng, spec.output_tokens_median, spec.output_tokens_sigma)))
            last = k == n - 1
            tool = spec.tools[int(rng.choice(len(spec.tools), p=weights))]
            duration = float(_lognormal(rng, tool.median_s, tool.sigma))
            prompt = context
            turns.append(Turn(prompt_tokens=prompt, output_tokens=out,
                              tool=None if last else tool.name, tool_duration_s=0.0 if last else duration,
                              ttl_hint=None if last else hint))
            observation = int(_lognormal(rng, spec.observation_tokens_median, spec.observation_tokens_sigma))
            context = min(spec.max_context_tokens, prompt + out + observation)
            if context <= prompt + out:  # at the context cap the agent stops
                turns[-1] = attrs.evolve(turns[-1], tool=None, tool_duration_s=0.0, ttl_hint=None)
                break
        programs.append(Program(program_id=pid, arrival_s=float(arrivals[pid]), turns=tuple(turns),
                                shared_prefix_tokens=spec.shared_prefix_tokens))
    return programs


def _read_spec_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise BadArgumentError(f"workload spec {path}: expected a .toml or .json file")


def load_workload_spec(path: str | Path) -> WorkloadSpec:
    """A spec file: any WorkloadSpec field, over the defaults of ``base``
    (``swe-bench`` unless given). ``tools`` is a list of tables with
    ``name``, ``weight``, ``median_s`` and ``sigma``."""
    path = Path(path)
    try:
        raw = _read_spec_file(path)
    except (OSError, ValueError) as e:  # UnicodeDecodeError included
        raise BadArgumentError(f"workload spec {path}: {e}") from None
    if not isinstance(raw, dict):
        raise BadArgumentError(f"workload spec {path}: expected an object of fields, got {type(raw).__name__}")
    base_name = raw.pop("base", "swe-bench")
    base = WORKLOADS.get(base_name) if isinstance(base_name, str) else None
    if base is None:
        raise BadArgumentError(f"workload spec {path}: base must be one of {', '.join(WORKLOADS)}")
    fields = {f.name for f in attrs.fields(WorkloadSpec)}
    unknown = set(raw) - fields
    if unknown:
        raise BadArgumentError(f"workload spec {path}: unknown fields {sorted(unknown)}; known: {sorted(fields)}")
    if "tools" in raw:
        tools = raw["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadArgumentError(f"workload spec {path}: tools must be a list of tables "
                                   "with name, weight, median_s and sigma")
        try:
            raw["tools"] = tuple(ToolSpec(**t) for t in tools)
        except TypeError as e:
            raise BadArgumentError(f"workload spec {path}: tools: {e}") from None
    raw.setdefault("name", path.stem)
    raw["base"] = base_name
    try:
        return attrs.evolve(base, **raw)
    except (TypeError, ValueError) as e:
        raise BadArgumentError(f"workload spec {path}: {e}") from None


def get_workload(name_or_path: str) -> WorkloadSpec:
    if name_or_path in WORKLOADS:
        return WORKLOADS[name_or_path]
    if Path(name_or_path).suffix in (".toml", ".json"):
        return load_workload_spec(name_or_path)
    raise BadArgumentError(f"unknown workload {name_or_path!r}; known: {', '.join(WORKLOADS)} (or a .toml/.json spec)")


# ---- trace importers ------------------------------------------------------------

def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise BadArgumentError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BadArgumentError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise BadArgumentError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, row


def _count(row, key, path, lineno, default=None):
    value = row.get(key)
    if value is None:
        value = default
    if value is None:
        raise BadArgumentError(f"{path}:{lineno}: missing {key!r}")
    if not _finite_number(value) or value < 0:
        raise BadArgumentError(f"{path}:{lineno}: {key!r} must be a finite number >= 0, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tool_name(value, path, lineno) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadArgumentError(f"{path}:{lineno}: a tool name must be a string, got {_short(value)}")
    return value[:128]


def _tracelab_turn(row, path, lineno):
    """TraceLab normalized round: tokens and the tools[] the round called.
    Tool time = tool_internal_latency_ms if present, else tool_wall_latency_ms
    (TraceLab's own precedence), summed over the round's calls."""
    if "input_tokens_total" in row:
        prompt = _count(row, "input_tokens_total", path, lineno)
    else:
        prompt = _count(row, "prefix_tokens", path, lineno, 0) + _count(row, "newly_append_tokens", path, lineno)
    out = max(1, int(_count(row, "output_tokens", path, lineno)))
    tools = row.get("tools") or []
    if not isinstance(tools, list):
        raise BadArgumentError(f"{path}:{lineno}: 'tools' must be a list")
    wait_ms, name = 0.0, None
    for t in tools:
        if not isinstance(t, dict):
            raise BadArgumentError(f"{path}:{lineno}: each of 'tools' must be an object, got {_short(t)}")
        key = "tool_internal_latency_ms" if t.get("tool_internal_latency_ms") is not None else "tool_wall_latency_ms"
        wait_ms += _count(t, key, path, lineno, 0.0)
        name = name or _tool_name(t.get("tool_name"), path, lineno) or "tool"
    return max(1, int(prompt)), out, name, wait_ms / 1000.0, False


def _hash_ids(row, path, lineno) -> tuple[int, ...]:
    ids = row.get("hash_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63
                                            for i in ids):
        raise BadArgumentError(f"{path}:{lineno}: 'hash_ids' must be a list of integers in [0, 2^63), "
                               f"got {_short(ids)}")
    return tuple(ids)


def _content(turns: list[dict], block: int, aiperf: bool) -> list[tuple[tuple[int, ...], int, bool]]:
    """(ids, extent, new context) for each turn of a Mooncake session.

    A session is cut into chains of turns that each continue the one before:
    the prompt holds the previous context, and its ids agree on every full
    block of the previous prompt (rolling ids of a partial block change as it
    fills, so those cannot tell). Every turn of a chain takes the ids of the
    chain's last turn, which describe all of them: a turn's own output is
    covered only by later rows' ids, and the identity its blocks are cached
    under must be the one the next turn looks up. A turn whose ids disagree
    starts a new context after the blocks they share. Aiperf rows' ids cover
    their new tokens only, so only the first row's (the whole first prompt)
    say what is shared; the session's history follows them."""
    if aiperf:
        ids, prompt = turns[0]["ids"], turns[0]["prompt"]
        return [(ids, min(len(ids) * block, prompt), False)] * len(turns)
    chains, new = [[0]], [False] * len(turns)
    for k in range(1, len(turns)):
        prev, cur = turns[k - 1], turns[k]
        full = prev["prompt"] // block
        agree = len(cur["ids"]) >= full and cur["ids"][:full] == prev["ids"][:full]
        new[k] = bool(prev["ids"] and cur["ids"]) and not agree
        if new[k] or not prev["ids"] or not cur["ids"] or cur["prompt"] < prev["context"]:
            chains.append([k])
        else:
            chains[-1].append(k)
    out = [None] * len(turns)
    for chain in chains:
        last = turns[chain[-1]]
        for k in chain:
            out[k] = (last["ids"], min(len(last["ids"]) * block, last["prompt"]), new[k])
    return out


def _mooncake_turn(row, path, lineno):
    """A Mooncake row, in one of two session forms:

    - agentic (``tool_wait_ms``): ``input_length`` is the whole prompt, and
      the tool runs ``tool_wait_ms`` after this row, before the next one;
    - aiperf multi-turn (``delay``): ``input_length`` counts the turn's new
      tokens only (the session's history comes first), and ``delay`` is the
      wait *before* this row.

    Returns (tokens, output, tool, wait seconds, whether the row has a
    ``delay``: a session with one is aiperf's)."""
    tokens = int(_count(row, "input_length", path, lineno))
    out = max(1, int(_count(row, "output_length", path, lineno)))
    before = "tool_wait_ms" not in row and "delay" in row
    wait = _count(row, "delay" if before else "tool_wait_ms", path, lineno, 0)
    return max(1, tokens), out, _tool_name(row.get("tool"), path, lineno) or "tool", float(wait) / 1000.0, before


#: Tokens per Mooncake hash id (the FAST'25 traces' and Dynamo's default block).
MOONCAKE_HASH_BLOCK_TOKENS = 512


class PartialArrivalTimes(BadArgumentError):
    """Some sessions of a trace have arrival times and some do not: neither
    replaying its times nor ignoring them is what its author meant."""


def load_trace(path: str | Path, *, jps: float | None = None, seed: int = 0,
               max_programs: int | None = None, hash_block_tokens: int = MOONCAKE_HASH_BLOCK_TOKENS) -> list[Program]:
    """Programs from a TraceLab or Dynamo agentic-Mooncake JSONL trace (told
    apart by their fields). Sessions are grouped by ``session_id`` in file
    order. Arrivals: Poisson at ``jps`` when given; otherwise Mooncake's
    ``timestamp`` (ms) of each session's first row, and for TraceLab, which
    has none usable, an error asking for ``jps``. Mooncake ``hash_ids``
    (``hash_block_tokens`` tokens each) say which prompt blocks are the same
    in any two requests: the simulator's prefix cache reuses exactly those."""
    if isinstance(hash_block_tokens, bool) or not isinstance(hash_block_tokens, int) or hash_block_tokens < 1:
        raise BadArgumentError(f"hash_block_tokens must be a positive integer, got {hash_block_tokens!r}")
    path = Path(path)
    if not path.exists():
        raise BadArgumentError(f"trace {path} does not exist")
    if not path.is_file():
        raise BadArgumentError(f"trace {path} is a directory, not a file")
    sessions: dict[str, list] = {}
    first_ts: dict[str, float] = {}
    kind = None
    for lineno, row in _rows(path):
        this = "tracelab" if ("tools" in row or "newly_append_tokens" in row or "input_tokens_total" in row) else (
            "mooncake" if "input_length" in row else None)
        if this is None:
            raise BadArgumentError(f"{path}:{lineno}: neither a TraceLab round nor a Mooncake row "
                                   "(expected input_tokens_total/newly_append_tokens or input_length)")
        kind = kind or this
        if this != kind:
            raise BadArgumentError(f"{path}:{lineno}: mixes {this} rows into a {kind} trace")
        sid = row.get("session_id", f"row{lineno}")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise BadArgumentError(f"{path}:{lineno}: session_id must be a string or an integer, got {_short(sid)}")
        sid = str(sid)
        parse = _tracelab_turn if kind == "tracelab" else _mooncake_turn
        ids = _hash_ids(row, path, lineno) if kind == "mooncake" else ()
        sessions.setdefault(sid, []).append((*parse(row, path, lineno), ids))
        if kind == "mooncake" and sid not in first_ts and "timestamp" in row:
            first_ts[sid] = _count(row, "timestamp", path, lineno) / 1000.0
    if not sessions:
        raise BadArgumentError(f"trace {path} has no rows")
    ids = list(sessions)[:max_programs]
    if jps is not None:
        arrivals = poisson_arrivals(len(ids), jps, np.random.default_rng(seed))
    elif kind == "mooncake" and all(s in first_ts for s in ids):
        arrivals = np.array([first_ts[s] for s in ids])
        arrivals -= arrivals.min()  # epoch timestamps: the first session arrives at 0
    elif kind == "mooncake" and any(s in first_ts for s in ids):
        untimed = sum(s not in first_ts for s in ids)
        raise PartialArrivalTimes(f"trace {path}: {untimed} of {len(ids)} sessions have no timestamp on their "
                                  "first row; give every one a timestamp, or pass a load (jobs per second)")
    else:
        raise BadArgumentError(f"trace {path}: no arrival times in it; pass a load (jobs per second)")
    programs = []
    for pid, (sid, t0) in enumerate(zip(ids, arrivals)):
        rows = sessions[sid]
        turns = []
        context = 0  # prompt + output of the session's previous turn
        aiperf = any(row[4] for row in rows)  # its first row has no delay: the session's other rows say
        prompts = []
        for tokens, out, *_ in rows:
            prompts.append(context + tokens if aiperf else tokens)
            context = prompts[-1] + out
        content = _content([{"ids": row[5], "prompt": prompt, "context": prompt + row[1]}
                            for row, prompt in zip(rows, prompts)], hash_block_tokens, aiperf)
        for k, ((tokens, out, tool, wait, _, _), prompt) in enumerate(zip(rows, prompts)):
            last = k == len(rows) - 1
            after = (rows[k + 1][3] if not last else 0.0) if aiperf else wait  # the tool runs between rows
            ids, extent, new = content[k]
            turns.append(Turn(prompt_tokens=prompt, output_tokens=out, tool=None if last else (tool or "tool"),
                              tool_duration_s=0.0 if last else after, hash_ids=ids, hash_extent_tokens=extent,
                              new_context=new))
        has_ids = any(row[5] for row in rows)
        programs.append(Program(program_id=pid, arrival_s=float(t0), turns=tuple(turns),
                                hash_block_tokens=hash_block_tokens if has_ids else 0))
    order = np.argsort([p.arrival_s for p in programs], kind="stable")
    return [attrs.evolve(programs[i], program_id=n) for n, i in enumerate(order)]
