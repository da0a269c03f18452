"""The plug-in seams: the entry point, the registered backend, program-level FCFS
through SGLang's hook registry on the real SchedulePolicy, and TP-rank agreement."""

from __future__ import annotations

import importlib.metadata

import pytest

from tests.adapters.sglang.harness import FakeClock, Turn, make_cache, make_kv_hints, run_turn, tokens


def test_entry_point_registers_the_backend_and_the_hook():
    from sglang.srt.mem_cache.registry import get_radix_cache_factory
    from sglang.srt.plugins.hook_registry import HookRegistry

    (ep,) = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "kvttl"]
    ep.load()()
    ep.load()()  # SGLang loads plugins in every process, sometimes twice: idempotent
    from kvttl_sglang import plugin

    assert get_radix_cache_factory("kvttl") is plugin.create_cache
    assert any(hook is plugin.after_calc_priority for _, hook, _ in HookRegistry._hooks[plugin.CALC_PRIORITY])


@pytest.mark.parametrize("jump, order", [
    ({"max_queue_jump_prefills": None}, ["A", "B", None, "C"]),  # Continuum: pinned first, then program arrival
    ({"max_queue_jump_s": 1.0}, ["A", None, "C", "B"]),  # bounded: B's turn overtakes only the last second's
])
def test_program_fcfs_through_the_real_schedule_policy(jump, order):
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    clock = FakeClock()
    cache = make_cache(tokens=256, clock=clock, config=jump)
    policy = SchedulePolicy("fcfs", cache, False, False, False)
    first_a = run_turn(cache, tokens(1, 20), 4, program_id="A", ttl="60s")  # A: oldest program, pinned
    clock.t += 1
    run_turn(cache, tokens(2, 20), 4, program_id="B", ttl="0s")  # B: second, not pinned
    clock.t += 1
    queue, names = [], {}
    for program, prompt in [(None, tokens(3, 10)), ("C", tokens(4, 10)), ("B", tokens(5, 10)),
                            ("A", first_a.context + tokens(6, 5))]:  # queue arrival order
        turn = Turn(cache, prompt, 2, hints=make_kv_hints(program) if program else None)
        turn.arrive()
        queue.append(turn.req)
        names[turn.req.rid] = program
        clock.t += 1
    policy.calc_priority(queue)  # SGLang's method, with kvttl's hook applied
    assert [names[r.rid] for r in queue] == order
    assert cache.release_all_leases() == 1 and cache.protected_size() == 0


def test_a_program_matched_before_sglang_stamps_its_entry_keeps_its_arrival():
    """With --enable-hicache-storage or LMCache, SGLang's _prefetch_kvcache
    matches a request before it stamps its wait-queue entry: kvttl read the
    unset stamp, 0.0, as the program's first arrival, and that program then
    sorted ahead of every older one for good."""
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    clock = FakeClock(500.0)
    cache = make_cache(tokens=256, clock=clock, config={"policy": "continuum", "max_queue_jump_prefills": None})
    run_turn(cache, tokens(1, 20), 4, program_id="B", ttl="0s")  # B: the older program
    clock.t = 1000.0
    Turn(cache, tokens(2, 20), 4, hints=make_kv_hints("A", ttl="0s"), entered=0.0).arrive().admit().finish()
    clock.t = 1100.0
    queue, names = [], {}
    for program, prompt in [("A", tokens(3, 10)), ("B", tokens(4, 10))]:  # A's turn comes back first
        turn = Turn(cache, prompt, 2, hints=make_kv_hints(program)).arrive()
        queue.append(turn.req)
        names[turn.req.rid] = program
    SchedulePolicy("fcfs", cache, False, False, False).calc_priority(queue)
    assert [names[r.rid] for r in queue] == ["B", "A"]  # program FCFS: B arrived at 500, A at 1000


def _tp_rank(rank, world, port, lags, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clock = FakeClock(1000.0 + lags[rank][0])  # the grant, too, is reached at different times
    cache = make_cache(tokens=128, clock=clock, tp_group=dist.group.WORLD)
    events = []
    run_turn(cache, tokens(1, 30), 4, program_id="A", ttl="10s")
    real = 1000.0
    for i, dt in enumerate((4.0, 4.0, 1.8, 0.5, 3.0)):
        real += dt
        clock.t = real + lags[rank][i + 1]  # the same call, reached a little later on a busy rank
        run_turn(cache, tokens(10 + i, 60), 4)  # from the second on, evicts: that ticks the lease table
        events.append((cache.num_leases, cache.stats["expired"]))
    results[rank] = events
    dist.destroy_process_group()


def test_expiry_is_identical_on_every_tp_rank_when_ranks_run_apart():
    """Two ranks over gloo. Rank 1 reaches the grant 0.1 s and one later call
    0.4 s after rank 0, right across the deadline: with each rank's own clock,
    rank 1 alone would expire the lease there and the trees would diverge."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()  # a forked manager can inherit a held lock and hang
    lags = ((0.0,) * 6, (0.1, 0.0, 0.0, 0.4, 0.0, 0.0))
    mp.spawn(_tp_rank, args=(2, port, lags, results), nprocs=2, join=True)
    assert results[0] == results[1], (results[0], results[1])
    assert results[0][2] == (0, 1)  # both expired it at the call where rank 1 was past the deadline


def _tp_order_rank(rank, world, port, gaps, results):
    import torch.distributed as dist
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    plugin.register()
    HookRegistry.apply_hooks()
    clock = FakeClock()
    # kvttl's own aging bound, 30 re-prefills, is about 1 s for this 34-token context at 1000 tokens/s
    cache = make_cache(tokens=128, clock=clock, tp_group=dist.group.WORLD,
                       config={"policy": "kvttl", "reload_tokens_per_s": 1000.0})
    run_turn(cache, tokens(1, 30), 4, program_id="A", ttl="0s")  # A's first turn: not pinned
    plain = Turn(cache, tokens(2, 10), 2, entered=1050.0).arrive()
    # A's next turn entered after the plain request on both ranks, but the ranks' clocks spaced the two
    # stamps differently (2 s and 0.5 s apart): the same arrival order, other numbers
    returning = Turn(cache, tokens(1, 34) + tokens(3, 5), 2, hints=make_kv_hints("A"),
                     entered=1050.0 + gaps[rank]).arrive()
    queue = [plain.req, returning.req]
    SchedulePolicy("fcfs", cache, False, False, False).calc_priority(queue)
    results[rank] = ["A" if req is returning.req else None for req in queue]
    dist.destroy_process_group()


def test_tp_ranks_order_the_queue_alike_under_kvttls_own_aging_bound():
    """The operator's queue-jump bounds were off under tensor parallelism
    (each rank stamps arrivals with its own clock), but the kvttl policy's
    own bound still placed a turn at "its arrival - 30 re-prefills": with
    stamps 2 s apart on one rank and 0.5 s on the other, rank 0 served the
    plain request first and rank 1 the agent's turn, and SGLang's ranks must
    schedule alike. Under TP every bound is off: program order, as Continuum."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_tp_order_rank, args=(2, port, (2.0, 0.5), results), nprocs=2, join=True)
    assert results[0] == results[1] == ["A", None], (results[0], results[1])


def test_the_lease_report_is_one_value_per_request_in_sglangs_output():
    """Without the hook SGLang slices customized_info per output token, and
    the one-element report would be cut away from all but the first token."""
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    is_request_level = SchedulerOutputStreamer.is_request_level_customized_info_key
    assert is_request_level(None, "kvttl") is True
    assert is_request_level(None, "something_else") is False  # SGLang's own answer for other keys


def test_an_idle_server_expires_leases_on_time():
    """Issue #17 item 5 on SGLang: an idle server kept expired leases until its
    next request. SGLang's idle loop now ticks the lease table (every
    idle_tick_every iterations: a count every TP rank agrees on)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvttl_sglang import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    assert any(hook is plugin.after_on_idle for _, hook, _ in HookRegistry._hooks[plugin.ON_IDLE])
    clock = FakeClock()
    cache = make_cache(tokens=128, clock=clock)
    run_turn(cache, tokens(1, 30), 4, program_id="A", ttl="2s")
    assert cache.num_leases == 1
    clock.t += 1.0
    for _ in range(2 * cache.idle_tick_every):
        cache.on_idle()
    assert cache.num_leases == 1  # not due yet
    clock.t += 1.5
    for _ in range(cache.idle_tick_every - 1):
        cache.on_idle()
    assert cache.num_leases == 1  # between two checks
    cache.on_idle()
    assert cache.num_leases == 0 and cache.stats["expired"] == 1 and cache.protected_size() == 0
