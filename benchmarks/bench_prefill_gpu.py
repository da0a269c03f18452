"""Prefill throughput of a Llama-3.1-8B-shaped model on a CUDA GPU, against
the simulator's cost model.

    python benchmarks/bench_prefill_gpu.py --json out/bench_prefill_gpu.json

The simulator's ``mfu`` (kvttl.sim.cost) sets how cheap a re-prefill is, and
so how much a pin is worth. This measures it: one forward pass of the real
architecture (transformers' LlamaModel, sdpa attention, bf16, random weights:
timing does not depend on the values) over 1..16k new tokens, CUDA events,
median over --repeats after warm-ups. The lm_head runs on the last token
only, as an engine's prefill does. For each length it reports tokens/s, the
FLOP/s achieved as a share of the GPU's peak (the cost model's own FLOP count,
so the share is directly comparable to ``mfu``), and what the cost model
predicts for the same step. Without a GPU it writes {"gpu": null, ...}.

An engine's fused kernels are faster than transformers' eager modules, so the
measured share is a floor for what vLLM reaches on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

LENGTHS = (512, 2048, 8192, 16384)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="llama-3.1-8b-h200", help="the cost model to compare with (an 8B preset: the model built is Llama-3.1-8B)")
    args = ap.parse_args(argv)
    from kvttl.sim.cost import get_preset

    cost = get_preset(args.preset)
    out = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "cost_model_mfu": cost.mfu}
    try:
        import torch
        import transformers
    except ImportError as e:
        out.update(gpu=None, reason=f"needs torch and transformers: {e}")
        return _write(out, args.json)
    if not torch.cuda.is_available():
        out.update(gpu=None, reason="torch sees no CUDA device")
        return _write(out, args.json)

    m = cost.model
    cfg = transformers.LlamaConfig(
        hidden_size=m.hidden_size, intermediate_size=14336, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
        vocab_size=128256, max_position_embeddings=max(LENGTHS))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16, on the GPU: no fp32 copy, no host round trip
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    params = sum(p.numel() for p in model.parameters())
    out.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
               num_params=params, build_s=time.perf_counter() - started, peak_flops=cost.gpu.peak_flops, rows=[])
    print(f"{out['gpu']}: {params / 1e9:.2f}B parameters built in {out['build_s']:.1f} s", flush=True)

    def forward(ids):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    with torch.inference_mode():
        for n in LENGTHS:
            ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
            for _ in range(2):
                forward(ids)
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward(ids)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            seconds = statistics.median(times)
            attention_work = n * n / 2  # sum(q * ctx) of one chunk of n tokens, no prefix
            flops = 2.0 * m.num_params * n + 4.0 * m.num_layers * m.num_heads * m.head_dim * attention_work
            predicted = cost.step_s(n, attention_work, kv_tokens_read=n)
            row = {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
                   "achieved_share_of_peak": flops / seconds / cost.gpu.peak_flops,
                   "cost_model_seconds": predicted, "cost_model_tokens_per_s": n / predicted,
                   "measured_over_model": seconds / predicted}
            out["rows"].append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del ids
    return _write(out, args.json)


def _write(out, path):
    if out.get("gpu") is None:
        print(json.dumps(out, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
