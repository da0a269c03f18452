"""Where a vLLM request carries its kvttl hints, and reading them once.

A request names its program in any of these (the first found wins):

1. vLLM's own ``kv_hints`` envelope (``LLMEngine.add_request(..., kv_hints=...)``
   or ``AsyncLLM.generate(..., kv_hints=...)``; ``LLM.generate`` has none in 0.32;
   ``vllm.v1.kv_hints.KvHintsEnvelope``): an action of type ``kvttl.turn``,
   the format SGLang takes too (``kvttl.kit.make_kv_hints`` builds it);
2. ``kv_transfer_params["kvttl"]`` (the OpenAI request field, or
   ``SamplingParams(extra_args={"kv_transfer_params": ...})``);
3. ``extra_args["kvttl"]``, or flat ``kvttl_program_id`` / ``kvttl_tool`` /
   ``kvttl_last_turn`` / ``kvttl_ttl`` keys (``vllm_xargs``).

A request's vLLM ``session_id`` is its program id when the hints name none.
Requests with no program id take vLLM's normal path.

Program ids are scoped by the request's cache-isolation key (``cache_salt``
and LoRA adapter, what vLLM's prefix cache keys blocks by): requests with
another salt cannot see, release or replace the program's lease.
"""

from __future__ import annotations

import logging

from kvttl.kit import payload_from_envelope, read_hints
from kvttl.policy import TurnHints

logger = logging.getLogger("kvttl.vllm")

__all__ = ["request_hints", "parse_hints", "isolation_key"]

_UNPARSED = object()


def request_hints(request, tenant_field: str | None = None) -> TurnHints | None:
    """parse_hints for a vLLM Request, once: the result rides on the request,
    so the scheduler's queue and the connector share one parse (and one warning).
    ``tenant_field``: the config's (an ``extra_args`` key a gateway sets)."""
    hints = getattr(request, "_kvttl_hints", _UNPARSED)
    if hints is _UNPARSED:
        params = request.sampling_params
        errors: list[str] = []
        hints = request._kvttl_hints = parse_hints(
            request.kv_transfer_params, params.extra_args if params is not None else None,
            session_id=getattr(request, "session_id", None), kv_hints=getattr(request, "kv_hints", None),
            request_id=request.request_id, errors=errors, tenant=isolation_key(request, tenant_field),
            quota=gateway_tenant(request, tenant_field))
        if errors:  # for the response (kvttl.kit.hint_report)
            request._kvttl_hint_errors = errors
    return hints


def isolation_key(request, tenant_field: str | None = None) -> str:
    """The request's tenant: its ``cache_salt`` and LoRA adapter name, the
    keys vLLM's prefix cache isolates blocks by ("" with neither), and the
    value of ``extra_args[tenant_field]`` when the server names such a field."""
    salt = getattr(request, "cache_salt", None) or ""
    lora = getattr(request, "lora_request", None)
    lora_name = getattr(lora, "lora_name", None) or "" if lora is not None else ""
    tenant = f"{salt}\0lora:{lora_name}" if lora_name else salt
    vouched = gateway_tenant(request, tenant_field)
    return f"{tenant}\0{vouched}" if vouched else tenant


def gateway_tenant(request, tenant_field: str | None) -> str:
    """``extra_args[tenant_field]`` as a string, or "" (no field named, or none sent):
    what a per-tenant pin share counts by, since the client may pick its cache_salt."""
    if not tenant_field:
        return ""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    value = extra.get(tenant_field) if isinstance(extra, dict) else None
    return "" if value is None else f"{tenant_field}:{value}"


def _payload(kv_transfer_params, extra_args, kv_hints):
    payload = payload_from_envelope(kv_hints)
    if payload is not None:
        return payload
    if isinstance(kv_transfer_params, dict) and kv_transfer_params.get("kvttl") is not None:
        return kv_transfer_params["kvttl"]
    extra = extra_args if isinstance(extra_args, dict) else {}
    if isinstance(extra.get("kvttl"), dict):
        return extra["kvttl"]
    flat = {k[len("kvttl_"):]: v for k, v in extra.items() if isinstance(k, str) and k.startswith("kvttl_")}
    return flat or None


def parse_hints(kv_transfer_params, extra_args, *, session_id=None, kv_hints=None,
                request_id: str = "?", errors: list | None = None, tenant: str = "",
                quota: str = "") -> TurnHints | None:
    """The kvttl hints of a request, or None when it has no program id. Never
    raises: bad hints are dropped with a warning (and appended to ``errors``),
    the request goes on."""
    if not (kv_hints or kv_transfer_params or extra_args or session_id):
        return None  # the normal path: nothing to read
    payload = _payload(kv_transfer_params, extra_args, kv_hints)
    if session_id and (payload is None or (isinstance(payload, dict) and payload.get("program_id") is None)):
        payload = {**(payload if isinstance(payload, dict) else {}), "program_id": session_id}
    return read_hints(payload, log=logger, request=request_id, errors=errors, tenant=tenant, quota=quota)
