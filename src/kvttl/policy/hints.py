"""What a request tells kvttl about its program, parsed the same way for every engine.

- TTL hints in the vocabulary users already know from Anthropic's prompt
  caching: ``cache_control: {"type": "ephemeral", "ttl": "5m"}``.
- Turn hints: ``{"program_id": ..., "tool": ..., "last_turn": ..., "ttl": ...}``,
  however the engine carries them (vLLM's ``kv_transfer_params``, SGLang's
  ``kv_hints``).
- The tool a turn is about to call, read from its output when the client did
  not say (a fenced ``bash`` block as mini-swe-agent writes, or an OpenAI
  ``tool_calls`` entry).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping

import attrs

from kvttl.errors import BadArgumentError

__all__ = ["parse_ttl", "MAX_TTL_S", "TurnHints", "parse_turn_hints", "program_key", "tool_from_output", "is_tool_name"]

#: The longest pin a hint may ask for. Longer asks are refused, not clamped:
#: a client that asks for a day has a bug worth hearing about.
MAX_TTL_S = 24 * 3600.0

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_ttl(hint: str | int | float) -> float:
    """Seconds from a TTL hint: ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, or a
    number of seconds. Raises BadArgumentError naming the bad hint."""
    if isinstance(hint, bool):
        raise BadArgumentError(f"ttl hint must be a duration like '30s', '5m', '1h', got {hint!r}")
    if isinstance(hint, (int, float)):
        try:
            seconds = float(hint)
        except OverflowError:
            raise BadArgumentError(f"ttl hint {str(hint)[:24]}... is too large; the maximum is {MAX_TTL_S:g} s") from None
    elif isinstance(hint, str):
        match = _PATTERN.match(hint)
        if not match:
            raise BadArgumentError(
                f"ttl hint {hint!r} is not a duration; use a number with a unit: '250ms', '30s', '5m', '1h'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise BadArgumentError(f"ttl hint must be a str or a number of seconds, got {type(hint).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise BadArgumentError(f"ttl hint must be a finite, non-negative duration, got {hint!r}")
    if seconds > MAX_TTL_S:
        raise BadArgumentError(f"ttl hint {hint!r} is {seconds:g} s, above the {MAX_TTL_S:g} s maximum")
    return seconds


#: Byte caps on client-chosen names: every table that holds them stays small.
MAX_PROGRAM_ID_BYTES = 256
MAX_TOOL_BYTES = 128
#: A tenant longer than this is keyed by its digest.
MAX_TENANT_BYTES = 128


def program_key(program_id: str | int, tenant: str = "") -> str | int:
    """The key a program is known by inside kvttl (its lease owner): the
    client's ``program_id`` within ``tenant``.

    Program ids are names a client picks, so two tenants may pick the same
    one; the tenant -- the engine's own cache-isolation key (vLLM's
    ``cache_salt`` and LoRA, SGLang's ``extra_key`` and ``cache_salt``) --
    keeps them apart. Without a tenant the key is the id itself. With one it
    is ``"\\0<tenant>\\0<s|i><id>"``: program ids hold no control characters,
    so no client id can spell another tenant's key, and a tenant that could
    be confused (a NUL, a leading "#", not UTF-8, over MAX_TENANT_BYTES) is
    replaced by "#" and its digest."""
    if not tenant:
        return program_id
    try:
        raw = tenant.encode("utf-8")
        plain = len(raw) <= MAX_TENANT_BYTES and "\0" not in tenant and not tenant.startswith("#")
    except UnicodeEncodeError:
        raw, plain = tenant.encode("utf-8", "surrogatepass"), False
    scope = tenant if plain else "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return f"\0{scope}\0{'i' if isinstance(program_id, int) else 's'}{program_id}"


def _check_program_id(_, __, program) -> None:
    if isinstance(program, bool) or not isinstance(program, (str, int)):
        raise BadArgumentError(f"program_id must be a non-empty str or an int, got {program!r:.40}")
    if isinstance(program, str) and not program.strip():
        raise BadArgumentError(f"program_id must be a non-empty str or an int, got "
                               f"{'a blank' if program else 'an empty'} string")
    if isinstance(program, int) and not -(2**63) <= program < 2**63:
        raise BadArgumentError(f"program_id {program!r} does not fit in 64 bits")
    if isinstance(program, str) and _utf8_len(program) > MAX_PROGRAM_ID_BYTES:
        raise BadArgumentError(f"program_id must be valid UTF-8 of at most {MAX_PROGRAM_ID_BYTES} bytes, "
                               f"got {program[:32]!r}... ({len(program)} characters)")
    if isinstance(program, str) and CONTROL_CHARACTERS.search(program):
        raise BadArgumentError(f"program_id must not hold control characters, got {program[:32]!r}")


def _check_tool(_, __, tool) -> None:
    if tool != "" and not is_tool_name(tool):
        raise BadArgumentError(f"tool must be a str of valid UTF-8 of at most {MAX_TOOL_BYTES} bytes without "
                               f"control characters, got {tool!r:.40}")


def _check_ttl(_, __, ttl) -> None:
    if ttl is None:
        return
    if isinstance(ttl, str):
        raise BadArgumentError(f"ttl_s must be seconds (a number) or None, got {ttl!r:.40}; "
                               "parse_ttl reads a client's '30s'")
    try:
        parse_ttl(ttl)
    except BadArgumentError as e:
        raise BadArgumentError(f"ttl_s: {e}") from None


def _check_flag(_, attribute, value) -> None:
    if not isinstance(value, bool):
        raise BadArgumentError(f"{attribute.name} must be a bool, got {value!r:.40}")


def _check_str(_, attribute, value) -> None:
    if not isinstance(value, str):
        raise BadArgumentError(f"{attribute.name} must be a str, got {value!r:.40}")


@attrs.frozen
class TurnHints:
    """One request's program hints, validated: constructing one with a bad
    field raises BadArgumentError naming it, whoever builds it (a client's
    hints go through ``parse_turn_hints``, where a bad TTL, tool or
    ``last_turn`` is dropped with a warning instead). ``warnings`` lists
    the hints that were dropped (a bad TTL never fails the request: it is
    ignored). ``tenant`` is the engine's cache-isolation key for the
    request, set by the adapter, never by the client's hints; ``key`` is the
    program's key inside kvttl (:func:`program_key`)."""

    program_id: str | int = attrs.field(validator=_check_program_id)
    tool: str = attrs.field(default="", validator=_check_tool)
    last_turn: bool = attrs.field(default=False, validator=_check_flag)
    ttl_s: float | None = attrs.field(default=None, validator=_check_ttl)
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    tenant: str = attrs.field(default="", validator=_check_str)
    #: the part of the tenant a gateway vouches for, which per-tenant pin
    #: shares count by ("" : the whole tenant); a client that picks its own
    #: cache_salt must not get a fresh share with each one
    quota: str = attrs.field(default="", validator=_check_str)

    @property
    def key(self) -> str | int:
        return program_key(self.program_id, self.tenant)

    @property
    def quota_key(self) -> str:
        return self.quota or self.tenant


#: what no program id or tool name may hold: they reach logs, metric labels and the estimator's keys
#: (C0 and C1 controls, DEL, and the Unicode line and paragraph separators)
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _utf8_len(text: str) -> float:
    """Bytes of ``text`` as UTF-8; infinite when it has none (a lone surrogate)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return float("inf")


def is_tool_name(name) -> bool:
    """Whether ``name`` may name a tool: a str of valid UTF-8 of at most
    MAX_TOOL_BYTES bytes without control characters (the lease table refuses
    anything else)."""
    return isinstance(name, str) and _utf8_len(name) <= MAX_TOOL_BYTES and not CONTROL_CHARACTERS.search(name)


#: what a client's turn hints may hold
_HINT_FIELDS = ("program_id", "tool", "last_turn", "ttl")

_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off", "")


def _yes_or_no(value) -> bool | None:
    """A client's flag: a bool, 0 or 1, or a yes/no word; None for anything else."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return {0: False, 1: True}.get(value)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in _YES else False if word in _NO else None
    return None


def parse_turn_hints(payload: Mapping | None, *, tenant: str = "", quota: str = "") -> TurnHints | None:
    """TurnHints from a mapping with ``program_id`` (str or 64-bit int),
    optional ``tool``, ``last_turn`` and ``ttl``. None when there is no
    program id and nothing else: the request takes the engine's normal
    path. Raises BadArgumentError naming the field when the program id
    itself is unusable, or missing beside other hints (``programId``: a
    typo the client must hear of). Other fields it does not know, and bad
    values of the optional ones, are dropped into ``warnings``.
    ``tenant``: the request's cache-isolation key (see :func:`program_key`)."""
    if payload is None:
        return None
    if not isinstance(payload, Mapping):
        raise BadArgumentError(f"kvttl hints must be a mapping, got {type(payload).__name__}")
    program = payload.get("program_id")
    unknown = sorted(repr(k)[:40] for k in payload if k not in _HINT_FIELDS)
    if program is None:
        if len(payload) > ("program_id" in payload):  # hints, but for no program: a typo, say so
            raise BadArgumentError(f"kvttl hints without a program_id are ignored; got "
                                   f"{', '.join(sorted(repr(k)[:40] for k in payload)[:8])}")
        return None
    warnings = [f"unknown hint {name} ignored; known: {', '.join(_HINT_FIELDS)}" for name in unknown[:8]]
    ttl = None
    if payload.get("ttl") is not None:
        try:
            ttl = parse_ttl(payload["ttl"])
        except BadArgumentError as e:
            warnings.append(f"ttl ignored: {e}")
    tool = payload.get("tool")
    if tool is not None and not isinstance(tool, str):
        warnings.append(f"tool ignored: must be a str, got {type(tool).__name__}")
        tool = None
    elif tool is not None and not is_tool_name(tool):
        warnings.append(f"tool ignored: must be valid UTF-8 of at most {MAX_TOOL_BYTES} bytes without control "
                        f"characters, got {tool[:32]!r}")
        tool = None
    last_turn = _yes_or_no(payload.get("last_turn", False))
    if last_turn is None:
        warnings.append(f"last_turn ignored: must be true or false, got {payload.get('last_turn')!r:.40}")
        last_turn = False
    return TurnHints(program_id=program, tool=tool or "", last_turn=last_turn,
                     ttl_s=ttl, warnings=tuple(warnings), tenant=str(tenant) if tenant else "",
                     quota=str(quota) if quota else "")


_BASH_BLOCK = re.compile(r"```(?:bash|sh|shell)[ \t]*\n(.*?)```", re.DOTALL)
_TOOL_CALL_NAME = re.compile(r'"name"\s*:\s*"([^"]{1,128})"')


def tool_from_output(text: str) -> str:
    """The tool a turn's output calls, or "" when it calls none.

    - exactly one fenced bash block (mini-swe-agent's action format):
      ``"bash:<program>"``, the first word of its first command, so that
      ``pytest`` and ``ls`` get separate duration distributions;
    - an OpenAI-style tool call (``{"name": "search", "arguments": ...}``, as
      models emit it inside ``<tool_call>`` tags or as JSON): its name.
    Two or more bash blocks are ambiguous (mini-swe-agent rejects them too): "".
    So is a name that is not a tool name (``is_tool_name``).
    """
    name = _tool_named_in(text) if isinstance(text, str) and text else ""
    return name if is_tool_name(name) else ""  # a model's output: a lone surrogate or 500 bytes must not pass


def _tool_named_in(text: str) -> str:
    blocks = _BASH_BLOCK.findall(text)
    if len(blocks) == 1:
        for line in blocks[0].splitlines():
            words = line.strip().split()
            # skip comments and "VAR=value" prefixes
            while words and "=" in words[0] and not words[0].startswith(("-", "/", ".")):
                words.pop(0)
            if words and not words[0].startswith("#"):
                return "bash:" + words[0].rsplit("/", 1)[-1][:64]
        return "bash"
    if blocks:
        return ""
    match = _TOOL_CALL_NAME.search(text)
    if match:
        return match.group(1)
    try:
        call = json.loads(text)
    except (ValueError, RecursionError):
        return ""
    if isinstance(call, Mapping) and isinstance(call.get("name"), str):
        return call["name"][:128]
    return ""
