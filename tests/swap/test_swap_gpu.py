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
    assert np.array_equal(tier.array(), cpu_host.array())
    eng.reload(slots, [10, 11, 12, 13, 14], method=method).wait()
    eng.copy([10, 11], [20, 21], method=method).wait()
    for d, h in zip(dev, host_layers):
        got = to_numpy(d)
        assert np.array_equal(got[[10, 11, 12, 13, 14]], h[blocks])
        assert np.array_equal(got[[20, 21]], h[[5, 0]])


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
