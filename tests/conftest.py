"""Test-wide rules and fixtures: `gpu` tests run only where a CUDA device is
usable; the engine tests (adapters, conformance) share one tiny model."""

from __future__ import annotations

import os

import pytest

# Before any test module imports an engine: vLLM's engine in this process (its
# scheduler and pool are visible to the tests), a small CPU KV space, no downloads.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shutdown_engine(llm) -> None:
    """Stops an in-process vLLM engine now. Its worker's KV connector is
    process-global in vLLM: an engine left for the garbage collector can hand
    its connector to the next module's engine, or tear down that engine's
    parallel groups when it is finally collected."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(autouse=True)
def fresh_hint_warning_budget():
    """Bad hints warn at most 10 times a minute per logger; each test that
    looks for a warning starts with the whole budget."""
    try:
        from kvttl.kit import HINT_WARNINGS
    except ImportError:  # kvttl not built: the tests that need it skip themselves
        yield
        return
    HINT_WARNINGS.reset()
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """2 layers, hidden 128, vocab 2048, bf16: loads in seconds on the CPU."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory) -> str:
    """The same tiny Llama with a byte-level BPE tokenizer trained here on a few
    agent-like lines and padded to the model's 2048 ids, so every id decodes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tiny-llama-tok")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    corpus = ["THOUGHT: run the tests first", "```bash\nls -la\n```", "cd /repo && python -m pytest -q",
              '<tool_call>{"name": "web_search", "arguments": {}}</tool_call>'] * 20
    bpe.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.add_tokens([f"<pad{i}>" for i in range(2048 - len(fast))])
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096,
                                   bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def _cuda_unavailable_reason():
    import kvttl

    probe = kvttl.cuda_probe()
    if probe["num_devices"] > 0:
        return None
    return f"no usable CUDA device: {probe['error']}"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _cuda_unavailable_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
