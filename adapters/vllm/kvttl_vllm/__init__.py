"""kvttl's vLLM adapter. Imported by vLLM through ``kv_connector_module_path``
(``kvttl_vllm.connector``); importing this package itself imports nothing of vLLM."""
