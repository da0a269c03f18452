"""CPU backend: bit-exact round trips, layouts, concurrency, and rejection of
bad input with no partial copy."""

from __future__ import annotations

import threading

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from kvttl.errors import BadArgumentError, UnknownBlockError
from kvttl.swap import HostTier, TransferEngine


def vllm_like(rng, num_blocks=16, layers=3, block_size=16, kv_heads=2, head_dim=8):
    """vLLM keeps K and V per layer: (num_blocks, block_size, kv_heads, head_dim) each."""
    return [rng.integers(0, 2**16, (num_blocks, block_size, kv_heads, head_dim), dtype=np.uint16)
            for _ in range(2 * layers)]


def sglang_like(rng, num_pages=12, layers=2, page_size=4, heads=3, head_dim=5):
    """SGLang keeps one buffer per layer of tokens (size, heads, head_dim); with
    page_size tokens per page it is viewed as (num_pages, page_size * heads * head_dim)."""
    return [rng.standard_normal((num_pages * page_size, heads, head_dim)).astype(np.float32)
            .reshape(num_pages, page_size * heads * head_dim) for _ in range(2 * layers)]


def engine_for(layers, num_slots=20):
    host = HostTier.for_layers(layers, num_slots=num_slots)
    return TransferEngine(layers, host, backend="cpu"), host


@pytest.mark.parametrize("make", [vllm_like, sglang_like])
def test_round_trip_is_bit_exact(make):
    rng = np.random.default_rng(0)
    layers = make(rng)
    original = [l.copy() for l in layers]
    eng, host = engine_for(layers)
    blocks, slots = [3, 0, 7, 5], [10, 2, 19, 0]
    eng.offload(blocks, slots).wait()
    # the host slots hold block-first copies: block 3's pages for every layer, in order
    flat = host.array()[10]
    offset = 0
    for layer in original:
        page = layer[3].tobytes()
        assert flat[offset: offset + len(page)].tobytes() == page
        offset += len(page)
    for layer in layers:
        layer[blocks] = 0  # evicted
    eng.reload(slots, [1, 2, 4, 6]).wait()
    for layer, before in zip(layers, original):
        assert np.array_equal(layer[[1, 2, 4, 6]], before[blocks])
    handle = eng.copy([1, 2], [8, 9])
    handle.wait()
    assert handle.done() and handle.num_bytes == 2 * sum(l[0].nbytes for l in layers)
    for layer, before in zip(layers, original):
        assert np.array_equal(layer[[8, 9]], before[[3, 0]])


@pytest.mark.parametrize("page_bytes", [1, 3, 7, 1000, 4099, 65536])
def test_odd_page_sizes(page_bytes):
    rng = np.random.default_rng(page_bytes)
    layers = [rng.integers(0, 256, (6, page_bytes), dtype=np.uint8) for _ in range(3)]
    original = [l.copy() for l in layers]
    eng, _ = engine_for(layers, num_slots=6)
    eng.offload(range(6), [5, 4, 3, 2, 1, 0]).wait()
    for l in layers:
        l[:] = 0
    eng.reload([5, 4, 3, 2, 1, 0], range(6)).wait()
    assert all(np.array_equal(a, b) for a, b in zip(layers, original))


def test_unaligned_and_padded_rows():
    rng = np.random.default_rng(1)
    backing = rng.integers(0, 256, (8, 53), dtype=np.uint8)
    saved = backing.copy()
    layer = backing[:, 1:38]  # base off by one byte, rows padded: stride 53, page 37
    other = rng.integers(0, 256, (8, 5), dtype=np.uint8)
    original = [layer.copy(), other.copy()]
    eng, _ = engine_for([layer, other], num_slots=8)
    assert eng.slot_bytes == 42
    eng.offload([0, 7], [0, 1]).wait()
    layer[:] = 0
    other[:] = 0
    eng.reload([1, 0], [3, 4]).wait()
    assert np.array_equal(layer[3], original[0][7]) and np.array_equal(layer[4], original[0][0])
    assert np.array_equal(other[3], original[1][7])
    # the bytes around each row's page were never written
    assert np.array_equal(backing[:, 0], saved[:, 0]) and np.array_equal(backing[:, 38:], saved[:, 38:])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_batches_match_numpy(data):
    num_blocks = data.draw(st.integers(1, 24))
    num_slots = data.draw(st.integers(1, 24))
    n = data.draw(st.integers(0, min(num_blocks, num_slots)))
    blocks = data.draw(st.permutations(range(num_blocks)))[:n]
    slots = data.draw(st.permutations(range(num_slots)))[:n]
    pages = data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    layers = [rng.integers(0, 256, (num_blocks, p), dtype=np.uint8) for p in pages]
    eng, host = engine_for(layers, num_slots=num_slots)
    before = host.array().copy()
    eng.offload(np.array(blocks, dtype=np.int64), slots).wait()
    expect = before.copy()
    for b, s in zip(blocks, slots):
        expect[s] = np.concatenate([l[b] for l in layers])
    assert np.array_equal(host.array(), expect)


def test_transfers_run_in_order_and_concurrently_from_threads():
    rng = np.random.default_rng(2)
    layers = vllm_like(rng, num_blocks=64)
    original = [l.copy() for l in layers]
    eng, _ = engine_for(layers, num_slots=64)
    # offload then reload without waiting in between: the queue orders them
    handles = [eng.offload([b], [b]) for b in range(64)]
    handles[-1].wait()
    for l in layers:
        l[:] = 0
    errors = []

    def back(part):
        try:
            eng.reload(part, part).wait()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=back, args=(list(range(i, 64, 4)),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(h.done() for h in handles)
    assert all(np.array_equal(a, b) for a, b in zip(layers, original))


@pytest.mark.parametrize("call, error, words", [
    (lambda e: e.offload([0, 99], [0, 1]), UnknownBlockError, ["device block 99", "pair 1"]),
    (lambda e: e.offload([0, 1], [0, 20]), UnknownBlockError, ["host slot 20"]),
    (lambda e: e.offload([0, 1], [3, 3]), BadArgumentError, ["host slot 3 is written twice"]),
    (lambda e: e.reload([0, 1], [-1, 2]), UnknownBlockError, ["outside"]),
    (lambda e: e.copy([0, 1], [1, 2]), BadArgumentError, ["both read and written"]),
    (lambda e: e.offload([0, 1], [0]), BadArgumentError, ["2 source ids but 1 destination"]),
    (lambda e: e.offload([0.5], [0]), BadArgumentError, ["integers"]),
    (lambda e: e.offload([0], [0], method="fast"), BadArgumentError, ["method"]),
    (lambda e: e.offload([0], [0], stream=7), BadArgumentError, ["no CUDA streams"]),
])
def test_bad_batches_copy_nothing(call, error, words):
    rng = np.random.default_rng(3)
    layers = vllm_like(rng)
    snapshot = [l.copy() for l in layers]
    eng, host = engine_for(layers)
    host_before = host.array().copy()
    with pytest.raises(error) as info:
        call(eng)
    for w in words:
        assert w in str(info.value)
    assert np.array_equal(host.array(), host_before)
    assert all(np.array_equal(a, b) for a, b in zip(layers, snapshot))


@pytest.mark.parametrize("layers, words", [
    ([], ["at least one layer"]),
    ([np.zeros((4, 8)), np.zeros((5, 8))], ["5 blocks", "same number of blocks"]),
    ([np.zeros((4, 8, 2))[:, :, ::2].copy()[:, ::2]], ["contiguous"]),
    (["not a tensor"], ["str"]),
])
def test_bad_layouts(layers, words):
    arrays = layers and all(isinstance(l, np.ndarray) for l in layers)
    host = HostTier.for_layers(layers, num_slots=4) if arrays else HostTier(slot_bytes=4096, num_slots=4)
    with pytest.raises(BadArgumentError) as info:
        TransferEngine(layers, host, backend="cpu")
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("caps, word", [(dict(max_ctas=0), "max_ctas must be >= 1, got 0"),
                                        (dict(offload_max_ctas=-2), "offload_max_ctas must be >= 1, got -2")])
def test_bad_grid_caps_are_named(caps, word):
    layers = [np.zeros((4, 16), np.uint8)]
    with pytest.raises(BadArgumentError, match=word):
        TransferEngine(layers, HostTier.for_layers(layers, num_slots=2), backend="cpu", **caps)


def test_host_tier_sizes_and_errors():
    tier = HostTier(slot_bytes=100, size_bytes=1050)
    assert tier.num_slots == 10 and tier.pool.capacity == 10 and tier.array().shape == (10, 100)
    with pytest.raises(BadArgumentError, match="exactly one"):
        HostTier(slot_bytes=100)
    with pytest.raises(BadArgumentError, match="at least one slot"):
        HostTier(slot_bytes=100, size_bytes=10)
    with pytest.raises(BadArgumentError, match="slot_bytes"):
        HostTier(slot_bytes=0, num_slots=1)
    small = HostTier(slot_bytes=8, num_slots=2)
    with pytest.raises(BadArgumentError, match="slots have 8"):
        TransferEngine([np.zeros((4, 16), np.uint8)], small, backend="cpu")


def test_asking_for_cuda_without_a_gpu_says_why():
    import kvttl

    if kvttl.cuda_probe()["num_devices"] > 0:
        pytest.skip("a GPU is present")
    layers = [np.zeros((4, 16), np.uint8)]
    with pytest.raises(BadArgumentError, match="cuda backend cannot run here: (no usable CUDA device|kvttl was built without CUDA)"):
        TransferEngine(layers, HostTier(slot_bytes=16, num_slots=4), backend="cuda")


def test_dropping_everything_while_copies_are_queued_is_safe():
    """The native engine owns the tensors until its queue has drained."""
    import gc

    rng = np.random.default_rng(9)
    host_copy = None
    for _ in range(20):
        layers = [rng.integers(0, 256, (64, 4096), dtype=np.uint8) for _ in range(4)]
        expect = np.concatenate([l[63] for l in layers])
        eng, host = engine_for(layers, num_slots=64)
        for b in range(64):
            eng.offload([b], [b])
        host_copy = host
        del layers, eng
        gc.collect()
    # the queue drained before the engine went: the last slot holds block 63
    assert np.array_equal(host_copy.array()[63], expect)
