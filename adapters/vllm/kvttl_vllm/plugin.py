"""kvttl's vLLM general plugin (entry point ``vllm.general_plugins``), which
vLLM loads in each of its processes before it builds the engine.

It does one thing. vLLM warns at start-up about *every* custom scheduler
class that it may have "subclassed Scheduler instead of AsyncScheduler"
and lost async scheduling. ``KvttlScheduler`` runs vLLM's AsyncScheduler
underneath whenever async scheduling is on, so for kvttl's class -- and
only for it -- that warning is false, and this filter drops it; the
scheduler logs which base it runs instead. (With ``VLLM_PLUGINS`` set, list
``kvttl`` in it to keep this.)
"""

from __future__ import annotations

import logging

SCHEDULER_LOGGER = "vllm.config.scheduler"
_KVTTL_SCHEDULERS = "kvttl_vllm.scheduler."


class _KvttlSchedulerIsAsync(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Using custom scheduler class")
                    and record.args and _KVTTL_SCHEDULERS in str(record.args[0]))


def register() -> None:
    """Entry point (idempotent)."""
    target = logging.getLogger(SCHEDULER_LOGGER)
    if not any(isinstance(f, _KvttlSchedulerIsAsync) for f in target.filters):
        target.addFilter(_KvttlSchedulerIsAsync())
