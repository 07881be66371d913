"""`FrontierPDConnector`: vLLM's KV-connector interface over the staging store and a transport.

Protocol (per request, chosen by its ``kv_transfer_params``, see `vllm_frontier.pd_protocol`; every instance runs
``kv_role="kv_both"`` and can take either side):

- **produce** ``{"frontier_pd": "produce", "transfer_id": T[, "wire": "raw"|"fp8"]}``:
  while the prompt is computed, `save_kv_layer` copies each layer's rows of the
  prompt into the staging store (layer by layer, so a puller already streams layer
  0 while layer 1 runs); layers the attention wrapper does not report (e.g. the V3.2
  indexer K cache, MTP draft layers) are copied in `wait_for_save`. The engine frees
  the request's blocks as usual: staged KV is the connector's own copy.
- **consume** ``{"frontier_pd": "consume", "transfer_id": T, "remote_addr": A}``: the
  scheduler reports the prompt as an asynchronous external hit; the worker pulls T
  from A on a background thread and writes the rows into the request's blocks. A
  failed, rejected or timed-out pull is reported through ``failed_recving`` so vLLM
  applies ``kv_load_failure_policy`` (``recompute``: the prompt is computed locally).
- **hello** ``{"frontier_pd": "hello"}``: the response's ``kv_transfer_params`` carry
  ``kv_addr``, the instance's KV listener (the router learns addresses this way).

Layout assumptions (checked at `register_kv_caches`): every layer's cache tensor has
the scheduler's block count as its first dimension and the row width last, so
``cache.reshape(-1, W)[block * rows_per_block + offset]`` is a token's row. The V3.2
indexer K cache is the exception: a block holds all its tokens' FP8 values, then all
their scales, so its "rows" are whole blocks (a token range moves as the blocks that
cover it; a chunk's ``s``/``e`` count blocks for such layers).
Pipeline parallelism is not supported; tensor-parallel rank r listens on port + r.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.logger import init_logger

from vllm_frontier.pd_protocol import CONSUME, HELLO, PARAM, PRODUCE, PRODUCED
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from vllm_frontier.kv_connectors import wire
from vllm_frontier.kv_connectors.settings import PDSettings, read_settings
from vllm_frontier.kv_connectors.staging import Chunk, StagingStore
from vllm_frontier.kv_connectors.stats import FrontierPDPromMetrics, FrontierPDStats
from vllm_frontier.kv_connectors.transport import (Counters, TransferError, get_transport,
                                                  unpin_current_thread)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.frontier.pd.connector")  # under "vllm.": vLLM configures its handlers

__all__ = ["FrontierPDConnector", "FrontierPDMetadata", "SaveSpec", "LoadSpec"]



@dataclass
class SaveSpec:
    """Prefill side: stage prompt rows ``[start, end)`` of `tid` after this step."""

    tid: str
    block_ids: tuple[list[int], ...]
    start: int
    end: int
    num_prompt: int
    first: bool  # (re)open the transfer: first chunk, or after a preemption
    encoding: str


@dataclass
class LoadSpec:
    """Decode side: pull `tid` from `remote_addr` into prompt rows ``[start, num_tokens)``."""

    req_id: str
    tid: str
    remote_addr: str
    block_ids: tuple[list[int], ...]
    start: int
    num_tokens: int


@dataclass
class FrontierPDMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # produce transfers that will never close


@dataclass
class _Producing:
    tid: str
    num_prompt: int
    encoding: str
    block_ids: tuple[list[int], ...] = ()
    first: bool = True


def _is_block_layout(vllm_config: VllmConfig, layer: str) -> bool:
    """True for the V3.2 indexer K cache (values then scales per block, not per-token rows)."""
    from vllm_frontier.compat import is_indexer_cache

    return is_indexer_cache(vllm_config.compilation_config.static_forward_context.get(layer))


class FrontierPDConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self._settings: PDSettings = read_settings(ktc.kv_connector_extra_config, ktc.kv_port)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("FrontierPDConnector does not support pipeline parallelism yet")
        self._groups = {
            name: g
            for g, grp in enumerate(kv_cache_config.kv_cache_groups if kv_cache_config else [])
            for name in grp.layer_names
        }
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config else None
        if role == KVConnectorRole.SCHEDULER:
            self._producing: dict[str, _Producing] = {}
            self._pending_loads: dict[str, LoadSpec] = {}
            self._load_issued: set[str] = set()
            self._consume_start: dict[str, int] = {}
            self._aborted: list[str] = []
        else:
            self._init_worker(vllm_config)

    # ======================================================================= scheduler
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        p = request.kv_transfer_params or {}
        if p.get(PARAM) != CONSUME or request.request_id in self._load_issued:
            return 0, False
        if not p.get("transfer_id") or not p.get("remote_addr"):
            logger.warning(
                "frontier-pd: request %s asks to consume KV without transfer_id/remote_addr; "
                "computing its prompt locally", request.request_id,
            )
            return 0, False
        n = len(request.prompt_token_ids or ()) - num_computed_tokens
        if n <= 0:
            return 0, False
        self._consume_start[request.request_id] = num_computed_tokens
        return n, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ):
        p = request.kv_transfer_params or {}
        rid = request.request_id
        if p.get(PARAM) == PRODUCE:
            tid = str(p.get("transfer_id") or rid)
            enc = str(p.get("wire") or self._settings.wire)
            if enc not in wire.ENCODINGS:
                logger.warning("frontier-pd: unknown wire %r for %s; using raw", enc, rid)
                enc = "raw"
            self._producing[rid] = _Producing(
                tid=tid, num_prompt=len(request.prompt_token_ids or ()), encoding=enc
            )
        elif p.get(PARAM) == CONSUME and num_external_tokens > 0:
            start = self._consume_start.pop(rid, request.num_computed_tokens)
            self._pending_loads[rid] = LoadSpec(
                req_id=rid,
                tid=str(p["transfer_id"]),
                remote_addr=str(p["remote_addr"]),
                block_ids=tuple(list(b) for b in blocks.get_block_ids()),
                start=start,
                num_tokens=start + num_external_tokens,
            )
            self._load_issued.add(rid)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = FrontierPDMetadata(loads=list(self._pending_loads.values()), aborted=self._aborted)
        self._pending_loads = {}
        self._aborted = []
        n_sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._producing.get(new.req_id)
            if st is not None:
                st.block_ids = tuple(list(b) for b in new.block_ids)
                st.first = True
                self._add_save(meta, new.req_id, st, new.num_computed_tokens, n_sched)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._producing.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids, st.first = tuple(list(b) for b in (new_ids or ())), True
            elif new_ids is not None:
                st.block_ids = tuple(old + list(add) for old, add in zip(st.block_ids, new_ids))
            self._add_save(meta, rid, st, cached.num_computed_tokens[i], n_sched)
        return meta

    def _add_save(self, meta, rid, st: _Producing, num_computed: int, n_sched) -> None:
        end = min(num_computed + n_sched.get(rid, 0), st.num_prompt)
        start = 0 if st.first else num_computed  # ship locally cached prefix rows too
        if start >= end and not (st.first and end == st.num_prompt):
            return
        meta.saves.append(SaveSpec(
            tid=st.tid, block_ids=st.block_ids, start=start, end=end,
            num_prompt=st.num_prompt, first=st.first, encoding=st.encoding,
        ))
        st.first = False
        if end >= st.num_prompt:
            del self._producing[rid]  # prompt fully staged

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        p = request.kv_transfer_params or {}
        self._load_issued.discard(rid)
        self._consume_start.pop(rid, None)
        if self._pending_loads.pop(rid, None) is not None:
            # aborted between alloc and the next step: no worker pull will report it,
            # so the scheduler must not wait for one
            logger.info("frontier-pd: %s finished before its KV pull started", rid)
        kind = p.get(PARAM)
        if kind == HELLO:
            return False, {PARAM: HELLO, "kv_addr": self._settings.kv_addr(0),
                           "wire": self._settings.wire}
        if kind == PRODUCE:
            st = self._producing.pop(rid, None)
            tid = str(p.get("transfer_id") or rid)
            if st is not None:  # finished (aborted) before its prompt was staged
                self._aborted.append(tid)
                return False, None
            return False, {PARAM: PRODUCED, "transfer_id": tid,
                           "remote_addr": self._settings.kv_addr(0),
                           "num_tokens": len(request.prompt_token_ids or ())}
        # Blocks are never held past the request: staged KV is a copy (produce side),
        # and a consume request's blocks are freed by vLLM once its pull is reported.
        return False, None

    # ========================================================================== worker
    def _init_worker(self, vllm_config: VllmConfig) -> None:
        s = self._settings
        self._rank = vllm_config.parallel_config.rank
        self._counters = Counters()
        self._store = StagingStore(
            ttl_s=s.staging_ttl_s, max_bytes=s.staging_max_bytes,
            on_evict=lambda tid, why: logger.warning("frontier-pd: dropped staged %s: %s", tid, why),
        )
        self._transport = get_transport(s.transport)
        self._server = None
        # One thread per request the engine can hold: a pull holds its thread while it waits (WAIT keepalives)
        # for its prefill, so a small pool would queue later pulls behind waiting ones. (Raising it from 4 did
        # not remove the fallbacks of the 50-request test; those were staged KV expiring before its pull.)
        max_seqs = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None) or 4
        workers = max(4, min(64, int(max_seqs)))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frontier-pd-pull",
                                        initializer=unpin_current_thread)
        self._caches: dict[str, torch.Tensor] = {}  # layer -> [rows, W] view of its cache
        self._rows_per_block: dict[str, int] = {}
        self._saved_this_step: set[str] = set()
        self._opened: set[str] = set()  # transfers (re)opened in this step
        self._slot_cache: dict[tuple[str, int, int, int], torch.Tensor] = {}
        self._tokens_per_row: dict[str, int] = {}  # 1, or the block size for block-layout caches
        self._done_lock = threading.Lock()
        self._recv_ok: set[str] = set()
        self._recv_failed: set[str] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        for name, t in kv_caches.items():
            if self._num_blocks is None or t.shape[0] != self._num_blocks:
                raise ValueError(
                    f"frontier-pd: cache of {name} has shape {tuple(t.shape)}; expected the "
                    f"block count {self._num_blocks} first (unsupported KV cache layout)"
                )
            if not t.is_contiguous():
                raise ValueError(f"frontier-pd: cache of {name} is not contiguous")
            if _is_block_layout(self._vllm_config, name):
                flat = t.reshape(t.shape[0], -1)  # one row per block
                self._tokens_per_row[name] = t[0].numel() // t.shape[-1]  # [blocks, (1,) block, D + 4]
            else:
                flat = t.reshape(-1, t.shape[-1])
                self._tokens_per_row[name] = 1
            self._caches[name] = flat
            self._rows_per_block[name] = flat.shape[0] // t.shape[0]
        s = self._settings
        self._server = self._transport.make_server(
            self._store, s.host, s.port + self._rank, s.secret, self._counters,
            unknown_wait_s=s.unknown_wait_s,
        )
        self._server.start()
        logger.info(
            "frontier-pd: KV listener %s (advertised %s), transport=%s, wire=%s, layers: %s",
            self._server.address, s.kv_addr(self._rank), self._transport.name, s.wire, ", ".join(self._caches),
        )
        logger.debug("frontier-pd: cache shapes %s, groups %s, tokens per row %s",
                     {n: tuple(t.shape) for n, t in kv_caches.items()}, self._groups, self._tokens_per_row)

    def _meta(self) -> FrontierPDMetadata | None:
        if not self.has_connector_metadata():
            return None
        m = self._get_connector_metadata()
        return m if isinstance(m, FrontierPDMetadata) else None

    def _rows(self, layer: str, start: int, end: int) -> tuple[int, int]:
        """Token range -> this layer's row range (blocks covering it for block-layout caches)."""
        tpr = self._tokens_per_row[layer]
        return start // tpr, -(-end // tpr)

    def _slots(self, tid: str, group: int, block_ids: list[int], rpb: int, start: int,
               end: int) -> torch.Tensor:
        key = (tid, group, rpb, start)
        sl = self._slot_cache.get(key)
        if sl is None:
            pos = torch.arange(start, end)
            blocks = torch.tensor(block_ids, dtype=torch.long)[pos // rpb]
            sl = self._slot_cache[key] = blocks * rpb + pos % rpb
        return sl

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is None:
            return
        for tid in meta.aborted:
            self._store.fail(tid, "request aborted on the prefill instance")
        for spec in meta.loads:
            self._pool.submit(self._pull, spec)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the request waits in WAITING_FOR_REMOTE_KVS

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kw) -> None:
        meta = self._meta()
        if meta is None or not meta.saves:
            return
        self._stage_layer(meta, layer_name)

    def _stage_layer(self, meta: FrontierPDMetadata, layer: str) -> None:
        if layer in self._saved_this_step or layer not in self._caches:
            return
        self._saved_this_step.add(layer)
        flat = self._caches[layer]
        rpb = self._rows_per_block[layer]
        group = self._groups.get(layer, 0)
        for spec in meta.saves:
            if spec.first and spec.tid not in self._opened:
                self._store.open(spec.tid)
                self._opened.add(spec.tid)
            if spec.end <= spec.start:
                continue
            r0, r1 = self._rows(layer, spec.start, spec.end)
            rows = flat.index_select(0, self._slots(spec.tid, group, spec.block_ids[group], rpb,
                                                    r0, r1).to(flat.device))
            enc, payload = wire.encode_rows(rows, spec.encoding)
            payload = payload.cpu()
            self._store.add(spec.tid, Chunk(
                layer=layer, start=r0, end=r1, encoding=enc,
                dtype=str(flat.dtype).removeprefix("torch."), width=flat.shape[1],
                payload=memoryview(payload.numpy()).cast("B"),
            ))
            self._counters.incr("staged_bytes", payload.numel())

    def wait_for_save(self):
        meta = self._meta()
        try:
            if meta is None or not meta.saves:
                return
            for layer in self._caches:  # layers the attention wrapper did not report
                self._stage_layer(meta, layer)
            for spec in meta.saves:
                if spec.first and spec.tid not in self._opened:  # nothing staged yet
                    self._store.open(spec.tid)
                if spec.end >= spec.num_prompt:
                    self._store.close(spec.tid, spec.num_prompt)
        finally:
            self._saved_this_step.clear()
            self._slot_cache.clear()
            self._opened.clear()

    def _pull(self, spec: LoadSpec) -> None:
        s = self._settings
        next_pos = {name: 0 for name in self._caches}
        need = {name: self._rows(name, 0, spec.num_tokens)[1] for name in self._caches}
        addr = spec.remote_addr
        if self._rank:
            host, port = addr.rsplit(":", 1)
            addr = f"{host}:{int(port) + self._rank}"

        def on_chunk(h: dict, payload: memoryview) -> None:
            layer = h.get("l")
            if layer not in self._caches:
                raise TransferError(f"unknown layer {layer!r} in transfer {spec.tid}")
            flat = self._caches[layer]
            start, end = int(h["s"]), int(h["e"])
            if not (0 <= start <= next_pos[layer] and start < end <= need[layer]):
                raise TransferError(
                    f"chunk rows [{start}, {end}) of {layer} do not fit transfer {spec.tid} "
                    f"({spec.num_tokens} prompt tokens = {need[layer]} rows, {next_pos[layer]} received)"
                )
            dtype = wire.dtype_from_name(h["dt"])
            if int(h["w"]) != flat.shape[1] or (h["enc"] == "raw" and dtype != flat.dtype):
                raise TransferError(
                    f"layer {layer}: peer rows are {h['w']} x {h['dt']}, ours "
                    f"{flat.shape[1]} x {flat.dtype} (different model or cache dtype)"
                )
            buf = torch.frombuffer(payload, dtype=torch.uint8).reshape(end - start, -1)
            rows = wire.decode_rows(buf, h["enc"], flat.shape[1], flat.dtype)
            lo = max(start, spec.start // self._tokens_per_row[layer])  # spec.start is block-aligned (checked)
            if lo < end:
                rpb = self._rows_per_block[layer]
                pos = torch.arange(lo, end)
                bids = spec.block_ids[self._groups.get(layer, 0)]
                blocks = torch.tensor(bids, dtype=torch.long)[pos // rpb]
                flat.index_copy_(0, (blocks * rpb + pos % rpb).to(flat.device),
                                 rows[lo - start:].to(flat.device))
            next_pos[layer] = max(next_pos[layer], end)

        try:
            for name, tpr in self._tokens_per_row.items():
                if spec.start % tpr:  # a block-layout block cannot be half local, half pulled
                    raise TransferError(f"local prefix of {spec.start} tokens is not a multiple of "
                                        f"{name}'s block of {tpr}")
            res = self._transport.pull(
                addr, spec.tid, s.secret, on_chunk, self._counters,
                timeout_s=s.timeout_s, idle_timeout_s=s.idle_timeout_s,
            )
            missing = [n for n, p in next_pos.items() if p < need[n]]
            if res.num_tokens != spec.num_tokens or missing:
                raise TransferError(
                    f"transfer {spec.tid}: peer staged {res.num_tokens} tokens, we need "
                    f"{spec.num_tokens}; incomplete layers: {missing[:3]}"
                )
            self._counters.incr("recv_wall_us", int(res.seconds * 1e6))
            ok = True
        except Exception as e:  # any failure -> vLLM's kv_load_failure_policy
            ok = False
            self._counters.incr("recv_failed")
            logger.warning("frontier-pd: KV pull for %s failed: %s", spec.req_id, e)
        with self._done_lock:
            (self._recv_ok if ok else self._recv_failed).add(spec.req_id)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        with self._done_lock:
            ok, failed = self._recv_ok, self._recv_failed
            self._recv_ok, self._recv_failed = set(), set()
        return KVConnectorTransferResults(
            finished_sending=set(), finished_recving=ok | failed, failed_recving=failed
        )

    def get_kv_connector_stats(self):
        if self._role != KVConnectorRole.WORKER:
            return None
        d = self._counters.take()
        d["staging_bytes_now"] = self._store.nbytes
        d["staging_transfers_now"] = len(self._store)
        return FrontierPDStats(data=d)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return FrontierPDStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return FrontierPDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self._role == KVConnectorRole.WORKER:
            if self._server is not None:
                self._server.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)
