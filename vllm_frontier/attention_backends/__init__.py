"""DSA (sparse MLA + lightning indexer) and dense MLA backends for vLLM, on `vllm_frontier.kernels`.

Backends are reached by class path from our platform's `get_attn_backend_cls`; `register()` installs the
indexer (a vLLM custom op) and runs in every vLLM process when DSA is on.
"""


def register() -> None:
    from vllm_frontier.plugins.features import load_features

    if load_features().dsa:
        from .indexer_op import register_indexer

        register_indexer()
