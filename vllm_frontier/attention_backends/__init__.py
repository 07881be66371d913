"""DSA (sparse MLA + lightning indexer) and dense MLA backends for vLLM, on `vllm_frontier.kernels`.

Backends are reached by class path from our platform's `get_attn_backend_cls`; the DSA feature object
(`plugins/dsa.py`) installs the indexer (a vLLM custom op, `indexer_op.register_indexer`) in every process.
"""
