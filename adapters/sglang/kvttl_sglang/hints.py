"""Building the ``kv_hints`` envelope a client sends with each turn."""

from __future__ import annotations

import uuid

HINT_ACTION_TYPE = "kvttl.turn"
HINT_ACTION_VERSION = "1"


def make_kv_hints(program_id: str | int, *, tool: str | None = None, last_turn: bool = False,
                  ttl: str | float | None = None) -> dict:
    """The ``kv_hints`` value for one turn of a program, as SGLang's
    ``/generate`` and ``Engine.generate(kv_hints=...)`` take it::

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
