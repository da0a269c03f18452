"""Turn hints as clients send them, read the same way for every engine.

One client format works on every engine: a ``kv_hints`` envelope (SGLang's
``kv_hints``, vLLM 0.32's ``KvHintsEnvelope``) holding one action of type
``kvttl.turn`` whose payload is ``{"program_id", "tool", "last_turn", "ttl"}``.
Engines may carry the same payload elsewhere too (vLLM's
``kv_transfer_params``); the adapter finds it, this module reads it.

Nothing a client sends can raise from here: a bad hint is a warning and the
request takes the engine's normal path.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping

from kvttl.policy import TurnHints, parse_turn_hints

__all__ = ["HINT_ACTION_TYPE", "HINT_ACTION_VERSION", "HINT_WARNINGS", "WarningBudget", "make_kv_hints",
           "payload_from_envelope", "read_hints"]

HINT_ACTION_TYPE = "kvttl.turn"
HINT_ACTION_VERSION = "1"


def make_kv_hints(program_id: str | int, *, tool: str | None = None, last_turn: bool = False,
                  ttl: str | float | None = None) -> dict:
    """The ``kv_hints`` envelope for one turn of a program, as a plain dict
    (SGLang's ``/generate`` field and ``Engine.generate(kv_hints=...)``;
    vLLM's ``LLMEngine.add_request`` and ``AsyncLLM.generate(..., kv_hints=...)``)::

        engine.generate(prompt, sampling_params, kv_hints=make_kv_hints("agent-7", tool="bash"))
    """
    payload: dict = {"program_id": program_id, "last_turn": bool(last_turn)}
    if tool is not None:
        payload["tool"] = tool
    if ttl is not None:
        payload["ttl"] = ttl
    return {"protocol_version": "1", "message_id": uuid.uuid4().hex,
            "actions": [{"action_id": "kvttl", "action_type": HINT_ACTION_TYPE,
                         "action_version": HINT_ACTION_VERSION, "payload": payload}]}


def _field(obj, name):
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def payload_from_envelope(envelope):
    """The payload of the first ``kvttl.turn`` action of a kv_hints envelope
    (an engine's envelope object or a plain dict), or None. Whatever the
    client put there comes back as it is: ``read_hints`` judges it."""
    if envelope is None:
        return None
    actions = _field(envelope, "actions")
    if not isinstance(actions, (list, tuple)):
        return None
    for action in actions:
        if _field(action, "action_type") == HINT_ACTION_TYPE:
            return _field(action, "payload")  # read_hints says what is wrong with a bad one
    return None


class WarningBudget:
    """At most ``burst`` warnings per ``per_s`` seconds on one logger; the
    rest are counted and reported in one line when the window turns over.
    Why: every bad hint is a warning, and a client that sends garbage on
    every request must not flood the server's log."""

    def __init__(self, burst: int = 10, per_s: float = 60.0, clock=time.monotonic):
        self.burst, self.per_s, self.clock = burst, per_s, clock
        self._lock = threading.Lock()
        self._windows: dict[str, list] = {}  # logger name -> [window start, warnings in it, suppressed]

    def reset(self) -> None:
        """Forget every window (tests that count warnings start here)."""
        with self._lock:
            self._windows.clear()

    def warn(self, log: logging.Logger, message: str, *args) -> None:
        now = self.clock()
        with self._lock:
            window = self._windows.setdefault(log.name, [now, 0, 0])
            suppressed = 0
            if now - window[0] >= self.per_s:
                suppressed, window[:] = window[2], [now, 0, 0]
            window[1] += 1
            allowed = window[1] <= self.burst
            if not allowed:
                window[2] += 1
        if suppressed:
            log.warning("kvttl: %d more hint warnings were suppressed in the last %g s", suppressed, self.per_s)
        if allowed:
            log.warning(message, *args)


#: The budget read_hints warns through.
HINT_WARNINGS = WarningBudget()


def read_hints(payload, *, log: logging.Logger, request: object = "?",
               errors: list | None = None, tenant: str = "", quota: str = "") -> TurnHints | None:
    """TurnHints from a payload, or None (no program id, or unusable hints).
    Never raises: every problem is one warning on ``log`` naming the request
    (rate-limited: ``HINT_WARNINGS``, 10 a minute, then a count).
    Why unusable hints were dropped is also appended to ``errors``, for the
    engine to tell the client in its response (``hint_invalid``); hints that
    were only partly ignored carry that in ``TurnHints.warnings``.
    ``tenant``: the request's cache-isolation key, which scopes its program
    id (``kvttl.policy.program_key``); the engine's, never the client's hints'.
    ``quota``: the part of it a gateway vouches for (``TurnHints.quota``)."""
    try:
        hints = parse_turn_hints(payload, tenant=tenant, quota=quota)
    except Exception as e:  # client input: whatever it is, the request goes on without kvttl
        HINT_WARNINGS.warn(log, "kvttl: ignoring the hints of request %s: %s", request, e)
        if errors is not None:
            errors.append(str(e))
        return None
    if hints is not None:
        for problem in hints.warnings:
            HINT_WARNINGS.warn(log, "kvttl: request %s: %s", request, problem)
    return hints
