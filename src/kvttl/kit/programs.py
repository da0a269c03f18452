"""What the engine kit remembers of each program (agent session) between its turns."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterator

__all__ = ["Program", "ProgramTable"]


class Program:
    """One program's record.

    ``program_id`` is the program's key (``TurnHints.key``: the client's id
    within its tenant). ``first_arrival`` is on the engine's queue clock (what
    the engine stamps its requests with), so program-FCFS keys compare with
    request keys; after a dormant stretch (a gap longer than ``max_ttl_s``)
    it is re-based to the new request's arrival (see ``EngineKit.arrived``).
    Every duration is on the kit's clock. ``pin`` is the engine's handle for
    the program's live lease (what ``EngineHooks.pin`` returned), None without one.
    """

    __slots__ = ("program_id", "first_arrival", "num_turns", "finished_at", "tool", "context_tokens",
                 "attained_s", "pin", "in_flight", "last_seen", "tenant", "pinned_blocks")

    def __init__(self, program_id: Hashable, first_arrival: float, now: float):
        self.program_id = program_id
        self.first_arrival = first_arrival
        self.num_turns = 0  # turns finished (aborted ones included)
        self.finished_at: float | None = None  # kit clock, last finish
        self.tool = ""  # the tool the last finished turn called
        self.context_tokens = 0  # prompt + output of the last finished turn
        self.attained_s = 0.0  # engine seconds received (Autellix's attained service)
        self.pin = None
        self.in_flight = 0  # turns arrived and not yet finished
        self.last_seen = now
        self.tenant = ""  # what its tenant's pin share counts by (TurnHints.quota_key)
        self.pinned_blocks = 0  # blocks its live lease pins

    @property
    def idle(self) -> bool:
        """Holds no lease and has no turn in flight: safe to forget."""
        return self.pin is None and self.in_flight == 0

    def __repr__(self) -> str:
        return (f"Program({self.program_id!r}, turns={self.num_turns}, in_flight={self.in_flight}, "
                f"pinned={self.pin is not None})")


class ProgramTable:
    """Programs by id, least recently active first.

    Why an OrderedDict in activity order: every event on a program moves it
    to the end in O(1), so the idle programs to forget are found from the
    front -- the least recently active -- without sorting. Programs that are
    not idle (a lease, a turn in flight) are skipped; there are at most as
    many of those as the engine has leases and requests.

    One rule forgets: an idle program is forgotten once it has been quiet
    for ``forget_after_s``, or sooner, least recently active first, while
    the table holds more than ``max_programs``.
    """

    def __init__(self, *, max_programs: int, forget_after_s: float):
        self.max_programs = max_programs
        self.forget_after_s = forget_after_s
        self._programs: OrderedDict[Hashable, Program] = OrderedDict()
        self.num_forgotten = 0

    def get(self, program_id: Hashable) -> Program | None:
        return self._programs.get(program_id)

    def touch(self, program: Program, now: float) -> None:
        program.last_seen = now
        self._programs.move_to_end(program.program_id)

    def add(self, program_id: Hashable, first_arrival: float, now: float) -> Program:
        """A new program; room is made first, so the rule never forgets the
        program it is adding (idle until its turn is counted in flight)."""
        if len(self._programs) >= self.max_programs:
            self.forget_idle(now, room=1)
        program = self._programs[program_id] = Program(program_id, first_arrival, now)
        return program

    def remove(self, program_id: Hashable) -> None:
        self._programs.pop(program_id, None)

    def forget_idle(self, now: float, *, room: int = 0, keep: Hashable | None = None) -> int:
        """Applies the rule, leaving ``room`` for programs about to be added
        and never forgetting ``keep``; returns how many were forgotten."""
        quiet_before = now - self.forget_after_s
        over = len(self._programs) + room - self.max_programs
        gone = []
        for program in self._programs.values():
            if over <= 0 and program.last_seen >= quiet_before:
                break  # the rest are more recent still
            if program.idle and program.program_id != keep:
                gone.append(program.program_id)
                over -= 1
        for program_id in gone:
            del self._programs[program_id]
        self.num_forgotten += len(gone)
        return len(gone)

    def __len__(self) -> int:
        return len(self._programs)

    def __iter__(self) -> Iterator[Program]:
        return iter(self._programs.values())

    def __contains__(self, program_id: Hashable) -> bool:
        return program_id in self._programs
