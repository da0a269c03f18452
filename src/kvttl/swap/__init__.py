"""The swap layer: a host tier of KV slots and block transfers to and from it.

A ``HostTier`` is a BlockPool over a host buffer (pinned, device-mapped
memory on a GPU machine; ordinary memory otherwise) whose slots are laid out
block-first: one block's pages for every layer are contiguous.

A ``TransferEngine`` moves a *batch* of blocks across *all* layers in one
call: ``offload`` (device pages -> host slots), ``reload`` (host slots ->
device pages) and ``copy`` (device -> device). Device KV is given as one
tensor per layer, each viewed as ``(num_blocks, page_bytes)`` -- vLLM's
per-layer K and V tensors and SGLang's per-layer buffers both fit. Tensors
cross as DLPack / ``__cuda_array_interface__`` / the buffer protocol: torch
and cupy both work, and the native module never links torch.

Calls return at once with a ``TransferHandle`` (``done()``, ``wait()``;
errors surface there). On the cuda backend they are ordered on the stream the
caller passes (``stream=``, default: the legacy default stream), after the
work already queued on ``after=`` (e.g. the engine's compute stream). On the
cpu backend they run in order on one worker thread.

Backends: ``cuda`` (kernels in csrc/cuda) and ``cpu`` (plain copies, same API).
``backend="auto"`` picks by where the layer tensors live.
"""

from __future__ import annotations

from typing import Sequence

from kvttl import _core
from kvttl.core import BlockPool
from kvttl.errors import BadArgumentError

__all__ = ["HostTier", "TransferEngine", "TransferHandle", "cuda_unavailable_reason", "METHODS"]

#: Transfer paths of the cuda backend; "auto" picks one per call.
METHODS = ("auto", "kernel", "batched", "loop")

#: With method="auto", layers whose mean page is smaller than this go through
#: the kernel, larger ones through the copy engines (cudaMemcpyBatchAsync).
#: Measured on an H200 (benchmarks/README.md, bench_swap.py): the kernel beats
#: the batched memcpy for every batch of >= 8 blocks at 4-64 KiB fragments
#: (47-52 GB/s against 5-41 at >= 256 blocks); above 64 KiB is not measured.
KERNEL_MAX_FRAGMENT_BYTES = 256 * 1024

#: The kernel's grid caps. Copy CTAs hold their SMs for the whole transfer and
#: a GEMM beside them waits for those SMs, most of all beside copies to the
#: host. Measured on an H100 (benchmarks/README.md, bench_swap.py's sweep, 8 B
#: shape, 8-32 KiB fragments, 64-256 blocks): beside offloads a bf16 GEMM
#: stream ran 1.0-1.06x as long at 2 CTAs, 1.2-1.5x at 8, 1.5-1.7x at 32, while
#: 2 CTAs still moved 34-48 GB/s to the host; beside reloads 1.0-1.1x at 8 CTAs
#: (39-48 GB/s), up to 1.2x at 32. Offloads run beside the model, reloads are
#: what a returning turn waits for: so few CTAs for the first, more for the second.
DEFAULT_MAX_CTAS = 8
DEFAULT_OFFLOAD_MAX_CTAS = 2


def cuda_unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None if it can."""
    info = _core.build_info()
    if not info["cuda"]:
        return "kvttl was built without CUDA (no CUDA toolkit at build time, or KVTTL_CUDA=OFF)"
    probe = _core.cuda_probe()
    if probe["num_devices"] == 0:
        return f"no usable CUDA device: {probe['error'] or 'the driver reports no devices'}"
    return None


class TransferHandle:
    """An in-flight transfer. ``wait()`` blocks (without the GIL) and raises
    the error the transfer ended with, if any."""

    __slots__ = ("_native", "_engine")

    def __init__(self, native, engine):
        self._native = native
        self._engine = engine  # keeps tensors and host memory alive until done

    def done(self) -> bool:
        return self._native.done()

    def wait(self) -> None:
        self._native.wait()

    @property
    def num_bytes(self) -> int:
        return self._native.num_bytes


class HostTier:
    """``num_slots`` host slots of ``slot_bytes`` each (or as many as fit in
    ``size_bytes``), with a BlockPool to allocate them."""

    def __init__(self, *, slot_bytes: int, num_slots: int | None = None, size_bytes: int | None = None,
                 pinned: bool = False):
        if not isinstance(slot_bytes, int) or slot_bytes <= 0:
            raise BadArgumentError(f"host tier: slot_bytes must be a positive int, got {slot_bytes!r}")
        if (num_slots is None) == (size_bytes is None):
            raise BadArgumentError("host tier: give exactly one of num_slots and size_bytes")
        if num_slots is None:
            if not isinstance(size_bytes, int) or size_bytes < slot_bytes:
                raise BadArgumentError(
                    f"host tier: size_bytes must be an int of at least one slot ({slot_bytes} bytes), got {size_bytes!r}")
            num_slots = size_bytes // slot_bytes
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise BadArgumentError(f"host tier: num_slots must be a positive int, got {num_slots!r}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.buffer = _core.HostBuffer(num_slots * slot_bytes, pinned)
        self.pool = BlockPool(num_slots)

    @property
    def pinned(self) -> bool:
        return self.buffer.pinned

    def array(self):
        """The slots as a ``(num_slots, slot_bytes)`` uint8 numpy view."""
        return self.buffer.view(self.num_slots, self.slot_bytes)

    @classmethod
    def for_layers(cls, layers: Sequence, *, num_slots: int | None = None, size_bytes: int | None = None,
                   pinned: bool | None = None) -> "HostTier":
        """A tier whose slots fit one block of every layer in ``layers``;
        pinned by default when the layers are CUDA tensors."""
        slot = sum(_page_bytes(t) for t in layers)
        if pinned is None:
            pinned = _device_type(layers[0]) == "cuda"
        return cls(slot_bytes=slot, num_slots=num_slots, size_bytes=size_bytes, pinned=pinned)


def _device_type(tensor) -> str:
    dl = getattr(tensor, "__dlpack_device__", None)
    if dl is not None:
        return "cuda" if dl()[0] in (2, 13) else "cpu"  # kDLCUDA, kDLCUDAManaged
    return "cuda" if hasattr(tensor, "__cuda_array_interface__") else "cpu"


def _page_bytes(tensor) -> int:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        raise BadArgumentError(f"swap: a layer is a {type(tensor).__name__}; expected a tensor or array")
    shape = tuple(shape)
    if not shape:
        raise BadArgumentError("swap: a layer tensor needs a block dimension first")
    item = getattr(tensor, "itemsize", None) or tensor.element_size()
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n * int(item)


def _stream_handle(stream) -> int:
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise BadArgumentError(f"swap: a stream must be an int handle, a torch or a cupy stream, got {type(stream).__name__}")


class TransferEngine:
    """Block transfers over one set of layer tensors and one host tier.

    ``max_ctas`` caps the cuda kernel's grid for reloads and device copies,
    ``offload_max_ctas`` for offloads: each CTA holds an SM for the whole
    transfer, so the caps bound what a transfer takes from the model's
    kernels (defaults measured: ``DEFAULT_MAX_CTAS``)."""

    def __init__(self, layers: Sequence, host: HostTier, *, backend: str = "auto", max_ctas: int = DEFAULT_MAX_CTAS,
                 offload_max_ctas: int = DEFAULT_OFFLOAD_MAX_CTAS,
                 kernel_max_fragment_bytes: int = KERNEL_MAX_FRAGMENT_BYTES):
        layers = list(layers)
        if not layers:
            raise BadArgumentError("swap: need at least one layer tensor")
        if backend == "auto":
            backend = _device_type(layers[0])
        if backend not in ("cpu", "cuda"):
            raise BadArgumentError(f"swap: backend must be auto, cpu or cuda, got {backend!r}")
        if backend == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise BadArgumentError(f"swap: the cuda backend cannot run here: {reason}")
        if not isinstance(host, HostTier):
            raise BadArgumentError(f"swap: host must be a HostTier, got {type(host).__name__}")
        slot = sum(_page_bytes(t) for t in layers)
        if slot != host.slot_bytes:
            raise BadArgumentError(
                f"swap: one block of every layer takes {slot} bytes; the host tier's slots have "
                f"{host.slot_bytes} (make it with HostTier.for_layers)")
        self.backend = backend
        self.host = host
        self._native = _core.SwapEngine(layers, host.buffer, host.num_slots, backend, max_ctas, offload_max_ctas)
        self._kernel_max = kernel_max_fragment_bytes
        pages = self._native.page_bytes
        self._mean_fragment = sum(pages) / len(pages)

    @property
    def num_blocks(self) -> int:
        return self._native.num_blocks

    @property
    def slot_bytes(self) -> int:
        return self._native.slot_bytes

    def _method(self, method: str) -> str:
        if method not in METHODS:
            raise BadArgumentError(f"swap: method must be one of {', '.join(METHODS)}, got {method!r}")
        if method != "auto":
            return method
        if self._mean_fragment < self._kernel_max or not _core.has_batched_memcpy():
            return "kernel"
        return "batched"

    def _submit(self, src, dst, direction, stream, after, method) -> TransferHandle:
        native = self._native.submit(src, dst, direction, self._method(method), _stream_handle(stream),
                                     _stream_handle(after))
        return TransferHandle(native, self)

    def offload(self, blocks, slots, *, stream=None, after=None, method: str = "auto") -> TransferHandle:
        """Copies device ``blocks[i]`` of every layer into host ``slots[i]``."""
        return self._submit(blocks, slots, "to_host", stream, after, method)

    def reload(self, slots, blocks, *, stream=None, after=None, method: str = "auto") -> TransferHandle:
        """Copies host ``slots[i]`` back into device ``blocks[i]`` of every layer."""
        return self._submit(slots, blocks, "to_device", stream, after, method)

    def copy(self, src_blocks, dst_blocks, *, stream=None, after=None, method: str = "auto") -> TransferHandle:
        """Device to device: ``src_blocks[i]`` into ``dst_blocks[i]``, every layer."""
        return self._submit(src_blocks, dst_blocks, "device", stream, after, method)
