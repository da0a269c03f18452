"""CUDA backend, on a GPU: the same round trips through the kernels (and the
memcpy paths) with torch and cupy tensors, the CPU backend as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from kvttl.errors import UnknownBlockError
from kvttl.swap import HostTier, TransferEngine

pytestmark = pytest.mark.gpu


def frameworks():
    out = []
    try:
        import torch

        if torch.cuda.is_available():
            out.append("torch")
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401

        out.append("cupy")
    except ImportError:
        pass
    return out or ["none"]


def device_layers(framework, host_layers):
    if framework == "torch":
        import torch

        return [torch.from_numpy(l).cuda() for l in host_layers]
    if framework == "cupy":
        import cupy

        return [cupy.asarray(l) for l in host_layers]
    pytest.skip("neither torch with CUDA nor cupy is installed")


def to_numpy(t):
    return t.cpu().numpy() if hasattr(t, "cpu") else t.get()


@pytest.mark.parametrize("framework", frameworks())
@pytest.mark.parametrize("method", ["kernel", "batched", "loop"])
@pytest.mark.parametrize("page_bytes", [16, 1000, 8192, 32768, 65536 + 3])
def test_round_trip_matches_cpu_backend(framework, method, page_bytes):
    rng = np.random.default_rng(page_bytes)
    host_layers = [rng.integers(0, 256, (32, page_bytes), dtype=np.uint8) for _ in range(4)]
    blocks, slots = [5, 0, 31, 7, 8], [1, 9, 0, 4, 3]
    # oracle
    cpu_layers = [l.copy() for l in host_layers]
    cpu_host = HostTier.for_layers(cpu_layers, num_slots=10)
    TransferEngine(cpu_layers, cpu_host, backend="cpu").offload(blocks, slots).wait()
    # device
    dev = device_layers(framework, host_layers)
    tier = HostTier.for_layers(dev, num_slots=10)
    assert tier.pinned
    eng = TransferEngine(dev, tier, backend="cuda")
    eng.offload(blocks, slots, method=method).wait()
    # only the written slots: the others hold whatever the allocator left there
    assert np.array_equal(tier.array()[slots], cpu_host.array()[slots])
    eng.reload(slots, [10, 11, 12, 13, 14], method=method).wait()
    eng.copy([10, 11], [20, 21], method=method).wait()
    for d, h in zip(dev, host_layers):
        got = to_numpy(d)
        assert np.array_equal(got[[10, 11, 12, 13, 14]], h[blocks])
        assert np.array_equal(got[[20, 21]], h[[5, 0]])


@pytest.mark.parametrize("max_ctas", [1, 3, 8])
@pytest.mark.parametrize("page_bytes", [4, 1004, 4099, 8192 + 48, 40008])
def test_kernel_grid_and_tails_match_cpu_backend(max_ctas, page_bytes):
    """The kernel gives one warp to each (block, layer) fragment and strides
    the warps over all of them: a grid much smaller than the work, fragments
    of every vector width and lane tails that are not a whole round."""
    torch = cuda_torch()
    rng = np.random.default_rng(page_bytes + max_ctas)
    host_layers = [rng.integers(0, 256, (64, page_bytes), dtype=np.uint8) for _ in range(5)]
    blocks = [int(b) for b in rng.permutation(64)[:40]]
    slots = [int(s) for s in rng.permutation(48)[:40]]
    cpu_layers = [l.copy() for l in host_layers]
    cpu_host = HostTier.for_layers(cpu_layers, num_slots=48)
    TransferEngine(cpu_layers, cpu_host, backend="cpu").offload(blocks, slots).wait()
    dev = [torch.from_numpy(l).cuda() for l in host_layers]
    tier = HostTier.for_layers(dev, num_slots=48)
    eng = TransferEngine(dev, tier, backend="cuda", max_ctas=max_ctas)
    eng.offload(blocks, slots, method="kernel").wait()
    assert np.array_equal(tier.array()[slots], cpu_host.array()[slots])
    for d in dev:
        d.zero_()
    eng.reload(slots, blocks, method="kernel").wait()
    for d, h in zip(dev, host_layers):
        assert np.array_equal(d.cpu().numpy()[blocks], h[blocks])


@pytest.mark.parametrize("framework", frameworks())
def test_stream_ordering_and_bad_ids(framework):
    rng = np.random.default_rng(0)
    host_layers = [rng.integers(0, 256, (8, 4096), dtype=np.uint8) for _ in range(2)]
    dev = device_layers(framework, host_layers)
    tier = HostTier.for_layers(dev, num_slots=8)
    eng = TransferEngine(dev, tier, backend="cuda")
    if framework == "torch":
        import torch

        stream = torch.cuda.Stream()
    else:
        import cupy

        stream = cupy.cuda.Stream(non_blocking=True)
    eng.offload(range(8), range(8), stream=stream).wait()
    before = tier.array().copy()
    with pytest.raises(UnknownBlockError):
        eng.offload([0, 8], [0, 1])
    assert np.array_equal(tier.array(), before)


def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def uint8_engine(torch):
    layers = [torch.zeros(8, 1 << 16, dtype=torch.uint8, device="cuda") for _ in range(2)]
    tier = HostTier.for_layers(layers, num_slots=8)
    return layers, tier, TransferEngine(layers, tier, backend="cuda")


def busy_then_fill(torch, layers, value):
    """Tens of milliseconds of matrix work on the current stream, then the write."""
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a
        a /= a.norm()
    for l in layers:
        l.fill_(value)


def test_host_copier_round_trips_vllm_shaped_bf16_kv():
    """The adapters' path: HostCopier over K and V of a CUDA-shaped vLLM
    layer (``[2, num_blocks, block, heads, head_dim]``, bf16), copies
    ordered after the compute stream."""
    torch = cuda_torch()
    from kvttl.swap.copier import HostCopier

    num_blocks, layers = 64, []
    kv_per_layer = [torch.randn(2, num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    for kv in kv_per_layer:
        layers.extend((kv[0], kv[1]))
    copier = HostCopier(layers, 16, after=torch.cuda.current_stream)
    assert copier.engine.backend == "cuda" and copier.tier.pinned
    assert copier.slot_bytes == 6 * 16 * 8 * 128 * 2
    blocks, slots = [3, 40, 63, 0], [15, 2, 7, 0]
    expected = [l[blocks].clone() for l in layers]
    assert copier.offload(list(zip(blocks, slots)))
    for l in layers:
        l.zero_()  # on the compute stream: the reload must follow it
    assert copier.reload(list(zip(slots, [10, 11, 12, 13]))) == set()
    for l, e in zip(layers, expected):
        assert torch.equal(l[[10, 11, 12, 13]], e)
        assert not l[[3, 40, 63, 0]].any()
    nbytes, seconds = copier.take_timing()
    assert nbytes == 8 * copier.slot_bytes and seconds > 0


@pytest.mark.parametrize("method", ["kernel", "batched", "loop"])
def test_after_orders_a_transfer_behind_another_streams_writes(method):
    """``after=`` makes an offload on one stream see what another stream
    wrote just before, however long that write takes."""
    torch = cuda_torch()
    layers, tier, eng = uint8_engine(torch)
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(compute):
        busy_then_fill(torch, layers, 7)
    eng.offload(range(8), range(8), stream=copy, after=compute, method=method).wait()
    assert (tier.array() == 7).all()


@pytest.mark.parametrize("method", ["kernel", "batched", "loop"])
def test_transfers_on_the_default_stream_keep_its_order(method):
    """With no stream named, a transfer runs after the default stream's work
    and before what is enqueued there next (cudaMemcpyBatchAsync refuses the
    legacy default stream: the batched path runs on a stream of its own)."""
    torch = cuda_torch()
    layers, tier, eng = uint8_engine(torch)
    busy_then_fill(torch, layers, 7)
    eng.offload(range(8), range(8), method=method).wait()
    assert (tier.array() == 7).all()
    tier.array()[:] = 3
    handle = eng.reload(range(8), range(8), method=method)  # not waited on: the stream's next kernel must see it
    assert all(int(l.sum()) == 3 * l.numel() for l in layers)
    handle.wait()
