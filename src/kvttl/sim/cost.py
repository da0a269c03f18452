"""Roofline cost model of one engine step, from model config x GPU spec.

A step's time is the larger of its compute time and its memory time, plus
tensor-parallel all-reduces and a fixed per-step overhead:

    compute = (2 * params * tokens + 4 * layers * heads * head_dim * sum(q * ctx)) / (tp * peak * mfu)
    memory  = (weight bytes + kv bytes/token * kv tokens read) / (tp * hbm * mbu)

``sum(q * ctx)`` is the attention work: a prefill chunk of c tokens after a
prefix p contributes c * (p + c/2), a decode step on a context n contributes n.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs

from kvttl.errors import BadArgumentError
from kvttl.policy.reload import ReloadModel

__all__ = ["ModelSpec", "GpuSpec", "CostModel", "PRESETS", "get_preset"]

GB = 1e9
GiB = 1024**3


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise BadArgumentError(f"{attribute.name} must be a positive number, got {value!r:.40}")


def _positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadArgumentError(f"{attribute.name} must be a positive integer, got {value!r:.40}")


def _share(instance, attribute, value):
    """A fraction of a peak: in (0, 1]."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise BadArgumentError(f"{attribute.name} must be a number in (0, 1], got {value!r:.40}")


def _non_negative(instance, attribute, value):
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise BadArgumentError(f"{attribute.name} must be a finite number >= 0, got {value!r:.40}")


@attrs.frozen(kw_only=True)
class ModelSpec:
    name: str
    num_params: float = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    hidden_size: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    bytes_per_param: float = attrs.field(default=2.0, validator=_positive)  # bf16
    bytes_per_kv_elem: float = attrs.field(default=2.0, validator=_positive)  # bf16 KV cache

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V, every layer, every KV head."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_kv_elem

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.bytes_per_param


@attrs.frozen(kw_only=True)
class GpuSpec:
    name: str
    peak_flops: float = attrs.field(validator=_positive)  # dense bf16, FLOP/s
    hbm_bytes_per_s: float = attrs.field(validator=_positive)
    memory_bytes: float = attrs.field(validator=_positive)
    host_bytes_per_s: float = attrs.field(validator=_positive)  # achieved, pinned, one direction
    interconnect_bytes_per_s: float = attrs.field(default=450 * GB, validator=_positive)


# Sources. H100 SXM5: 989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3 (NVIDIA H100 datasheet);
# 81559 MiB of memory, as nvidia-smi and torch.cuda.mem_get_info report it for the "80 GB"
# part (the datasheet's GB are 2^30 bytes, not 10^9). H200 SXM: same compute, 4.8 TB/s
# HBM3e (NVIDIA H200 datasheet), 143771 MiB as nvidia-smi reports it for the "141 GB" part.
# Host link: PCIe Gen5 x16, ~50 GB/s achieved (DESIGN.md §5); measured on an H200: 54-55 GB/s
# for one large pinned copy, 47-52 GB/s through kvttl's kernel for batches of >= 256 blocks
# (benchmarks/bench_swap.py); on an H100 the same at 32 CTAs, and 34-48 GB/s at the default
# grid caps (2 CTAs out, 8 in), which leave the SMs to the model. One link per GPU, shared by
# every copy in flight.
# NVLink 4: 450 GB/s per direction per GPU.
# Llama 3.1 shapes from the HF configs.
MiB = 1024**2
H100 = GpuSpec(name="H100-SXM", peak_flops=989.4e12, hbm_bytes_per_s=3.35e12, memory_bytes=81559 * MiB,
               host_bytes_per_s=50 * GB)
H200 = GpuSpec(name="H200-SXM", peak_flops=989.4e12, hbm_bytes_per_s=4.8e12, memory_bytes=143771 * MiB,
               host_bytes_per_s=50 * GB)
LLAMA_8B = ModelSpec(name="Llama-3.1-8B", num_params=8.03e9, num_layers=32, hidden_size=4096,
                     num_heads=32, num_kv_heads=8, head_dim=128)
LLAMA_70B = ModelSpec(name="Llama-3.1-70B", num_params=70.6e9, num_layers=80, hidden_size=8192,
                      num_heads=64, num_kv_heads=8, head_dim=128)


@attrs.frozen(kw_only=True)
class CostModel:
    model: ModelSpec
    gpu: GpuSpec
    tp: int = attrs.field(default=1, validator=_positive_int)
    #: Achieved fraction of peak FLOP/s in prefill-heavy steps. Calibrated: 0.4 gives
    #: Llama-3.1-8B on one H100 about 21.7k prefill tokens/s on 8k-token chunks, the top of
    #: the 15-22k tokens/s vLLM measures there (0.6 gave 32.5k, 1.5-2x too fast, which made
    #: re-prefill cheap and flattered the policies that do not pin; issue #13 review).
    #: A lone forward pass measures faster: 0.57-0.59 of peak at 2-16k tokens on an H200
    #: (benchmarks/bench_prefill_gpu.py, transformers' eager Llama-3.1-8B), so 0.4 is on the
    #: expensive side unless scheduling and mixed decode steps eat the difference under load.
    mfu: float = attrs.field(default=0.4, validator=_share)
    #: Achieved fraction of HBM bandwidth in decode-heavy steps. Calibrated with the
    #: all-reduce latency below: 8B/H100 decodes a lone request in about 7.9 ms/token and
    #: 70B/4xH100 in about 20 ms (measurements give 20-25 ms; 0.8 and 10 us gave 15.8).
    mbu: float = attrs.field(default=0.7, validator=_share)
    #: Scheduler and launch overhead per step. Assumption: 1 ms (vLLM V1 order of magnitude).
    step_overhead_s: float = attrs.field(default=1e-3, validator=_non_negative)
    #: Latency of one all-reduce under tensor parallelism (two per layer). Assumption:
    #: 25 us, NCCL's small-message all-reduce on 4 NVLink GPUs without CUDA-graph fusion.
    allreduce_latency_s: float = attrs.field(default=25e-6, validator=_non_negative)
    #: Share of GPU memory the engine may use (vLLM's gpu_memory_utilization default).
    memory_utilization: float = attrs.field(default=0.9, validator=_share)
    #: Activations, CUDA graphs and workspace, per GPU. Assumption: 4 GiB.
    reserved_bytes_per_gpu: float = attrs.field(default=4 * GiB, validator=_non_negative)

    def num_gpu_blocks(self, block_size: int) -> int:
        usable = self.tp * (self.gpu.memory_bytes * self.memory_utilization - self.reserved_bytes_per_gpu)
        kv = usable - self.model.weight_bytes
        blocks = int(kv // (self.model.kv_bytes_per_token * block_size))
        if blocks < 1:
            raise BadArgumentError(
                f"{self.model.name} does not fit on {self.tp} x {self.gpu.name}: "
                f"{self.model.weight_bytes / GB:.1f} GB of weights, {usable / GB:.1f} GB usable")
        return blocks

    def step_s(self, num_tokens: int, attention_work: float, kv_tokens_read: float) -> float:
        """One step: ``num_tokens`` scheduled (prefill chunk tokens + one per
        decode), ``attention_work`` = sum(q * ctx), ``kv_tokens_read`` KV tokens touched."""
        m = self.model
        flops = 2.0 * m.num_params * num_tokens + 4.0 * m.num_layers * m.num_heads * m.head_dim * attention_work
        compute = flops / (self.tp * self.gpu.peak_flops * self.mfu)
        memory = (m.weight_bytes + m.kv_bytes_per_token * kv_tokens_read) / (self.tp * self.gpu.hbm_bytes_per_s * self.mbu)
        comm = 0.0
        if self.tp > 1:
            per_reduce = 2.0 * (self.tp - 1) / self.tp * num_tokens * m.hidden_size * m.bytes_per_param
            comm = 2 * m.num_layers * (self.allreduce_latency_s + per_reduce / self.gpu.interconnect_bytes_per_s)
        return max(compute, memory) + comm + self.step_overhead_s

    def host_reload_s(self, num_tokens: int) -> float:
        return num_tokens * self.model.kv_bytes_per_token / self.gpu.host_bytes_per_s

    def reload_model(self, chunk_tokens: int) -> ReloadModel:
        """Reload(r) as the paper's quadratic: for the roofline model the fit is
        exact in the compute-bound regime (a chunked prefill of n tokens pays
        n/chunk step overheads, folded into the linear term)."""
        m = self.model
        rate = self.tp * self.gpu.peak_flops * self.mfu
        return ReloadModel(
            a=self.step_overhead_s,
            b=2.0 * m.num_params / rate + self.step_overhead_s / chunk_tokens,
            c=2.0 * m.num_layers * m.num_heads * m.head_dim / rate,
            kv_bytes_per_token=m.kv_bytes_per_token,
            host_bytes_per_s=self.gpu.host_bytes_per_s,
        )


PRESETS = {
    "llama-3.1-8b-h100": CostModel(model=LLAMA_8B, gpu=H100),
    "llama-3.1-8b-h200": CostModel(model=LLAMA_8B, gpu=H200),
    "llama-3.1-70b-4xh100": CostModel(model=LLAMA_70B, gpu=H100, tp=4),
}


def get_preset(name_or_path: str) -> CostModel:
    """A preset by name, or a JSON file ``{"model": {...}, "gpu": {...}, "tp": 1, ...}``
    whose model/gpu fields are those of ModelSpec/GpuSpec (a model or gpu may
    also be given by a preset's name, e.g. ``"gpu": "llama-3.1-8b-h200"``)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.suffix == ".json":
        raise BadArgumentError(f"unknown preset {name_or_path!r}; known: {', '.join(PRESETS)} (or a .json file)")
    if not path.exists():
        raise BadArgumentError(f"preset file {path} does not exist (known presets: {', '.join(PRESETS)})")
    if not path.is_file():
        raise BadArgumentError(f"preset file {path} is a directory, not a file")
    try:
        spec = json.loads(path.read_text())
        if not isinstance(spec, dict):
            raise BadArgumentError(f"preset file {path}: expected an object {{\"model\": ..., \"gpu\": ...}}, "
                                   f"got {type(spec).__name__}")
        missing = [k for k in ("model", "gpu") if k not in spec]
        if missing:
            raise BadArgumentError(f"preset file {path}: needs {' and '.join(map(repr, missing))} (a preset's name "
                                   "or an object of fields)")
        model, gpu = spec.pop("model"), spec.pop("gpu")
        for what, given in (("model", model), ("gpu", gpu)):
            if isinstance(given, str) and given not in PRESETS:
                raise BadArgumentError(f"preset file {path}: {what} {given!r} is not a preset; known: "
                                       f"{', '.join(PRESETS)}")
        model = PRESETS[model].model if isinstance(model, str) else ModelSpec(**model)
        gpu = PRESETS[gpu].gpu if isinstance(gpu, str) else GpuSpec(**gpu)
        return CostModel(model=model, gpu=gpu, **spec)
    except BadArgumentError as e:
        if str(e).startswith(f"preset file {path}"):
            raise
        raise BadArgumentError(f"preset file {path}: {e}") from None
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise BadArgumentError(f"preset file {path}: {e}") from None
