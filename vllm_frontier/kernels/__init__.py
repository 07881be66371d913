"""FlashMLA-equivalent Triton kernels with torch references (imports torch and triton only).

Public API:
- :mod:`.fp8`: ``quantize_fp8_e4m3``, ``dequantize_fp8_e4m3``.
- :mod:`.latent_cache`: ``write_latent_cache``, ``read_latent_cache`` (576-float / 656-byte FP8 rows).
- :mod:`.flash_mla_interface`: FlashMLA's interface: ``get_mla_metadata``, ``flash_mla_with_kvcache``
  (dense / sparse decode; sparse indices are physical cache slots), ``flash_mla_sparse_fwd`` (sparse prefill);
  ``request_positions_to_slots`` (request-local positions + block table -> slots).
- :mod:`.indexer`: ``write_indexer_k_cache``, ``indexer_paged_logits``, ``indexer_ragged_logits``,
  ``topk_indices``.
- :mod:`.indexer_topk`: ``indexer_topk_request`` (indexer logits fused with a stable top-k over one request's
  contiguous keys, in tiles of bounded memory) and ``stable_topk_prefix``: DSA's CPU path.
- :mod:`.sparse_mla_tokens`: ``sparse_mla_tokens`` (sparse MLA with rows gathered once per token tile): DSA's
  CPU path.
- :mod:`.ref`: the torch references (``ref_*``), also the CPU execution path of the dense kernels.

Every op takes ``backend=None|"triton"|"torch"``: None runs Triton on CUDA tensors and the reference elsewhere.
Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before this package is imported.
"""

from .flash_mla_interface import (
    FlashMLASchedMeta,
    flash_mla_sparse_fwd,
    flash_mla_with_kvcache,
    get_mla_metadata,
    request_positions_to_slots,
)
from .fp8 import dequantize_fp8_e4m3, quantize_fp8_e4m3
from .indexer import indexer_paged_logits, indexer_ragged_logits, topk_indices, write_indexer_k_cache
from .latent_cache import read_latent_cache, write_latent_cache
from .mla_attention import KernelConfig

__all__ = [
    "FlashMLASchedMeta",
    "KernelConfig",
    "dequantize_fp8_e4m3",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "indexer_paged_logits",
    "indexer_ragged_logits",
    "quantize_fp8_e4m3",
    "read_latent_cache",
    "request_positions_to_slots",
    "topk_indices",
    "write_indexer_k_cache",
    "write_latent_cache",
]
