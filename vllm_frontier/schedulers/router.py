"""P/D router: an OpenAI-compatible front that sends each request through a prefill
and a decode instance (`vllm-frontier router --prefill URL... --decode URL...`).

Per request (``/v1/completions``, ``/v1/chat/completions``, streaming or not):

1. lease a prefill instance P and a decode instance D from the `InstancePool`;
2. send P the request with ``max_tokens=1`` and ``kv_transfer_params`` *produce*
   (P computes the prompt, stages its KV layer by layer, returns one token);
3. send D the client's request with *consume* parameters naming P's KV listener;
   D pulls the KV after P answered (``--dispatch sequential``, the default) or while P
   still computes (``--dispatch concurrent``: P's staged layers stream as they are
   produced), then decodes; D's answer goes back to the client unchanged.

Failures: an instance that refuses connections or answers 5xx is taken out of
rotation (a health loop puts it back). A failed prefill does not fail the request: D's
pull fails and D computes the prompt itself. A decode failure before anything was sent
to the client is retried on another decode instance (computing the prompt there);
after the stream started, the client gets an error event. No instance for a stage:
HTTP 503 with a message. ``/health``, ``/metrics`` (Prometheus) and ``/v1/models``.

KV listener addresses are learnt from each instance with a one-token *hello* request
(see `vllm_frontier.kv_connectors.connector`).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import math
import re
import sys
import time
import uuid

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from vllm_frontier.pd_protocol import consume_params, hello_params, produce_params
from vllm_frontier.schedulers.controller import SLO_KINDS
from vllm_frontier.schedulers.instance_pool import InstancePool, NoInstanceAvailable, Stage
from vllm_frontier.schedulers.router_metrics import RouterMetrics

__all__ = ["main", "build_app", "parse_args", "Router"]

logger = logging.getLogger("vllm_frontier.router")

_RECV_BYTES = re.compile(r"^frontier_pd_recv_bytes_total\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)


class InstanceError(RuntimeError):
    """The instance failed (connection refused/reset, 5xx); it leaves the rotation."""


class Router:
    def __init__(self, pool: InstancePool, args: argparse.Namespace) -> None:
        self.pool = pool
        self.args = args
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None
        self._models: dict[str, str] = {}  # url -> served model name
        self._bg: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.args.request_timeout, sock_connect=5)
        )
        await asyncio.gather(*(self._probe(u) for u in self.pool.urls()))
        self._bg.append(asyncio.create_task(self._health_loop()))

    async def stop(self, app: web.Application) -> None:
        for t in self._bg:
            t.cancel()
        if self.session is not None:
            await self.session.close()

    async def _probe(self, url: str) -> bool:
        """Health check + model name + KV listener address; marks the instance up or down."""
        try:
            async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    raise InstanceError(f"/health answered {r.status}")
            if url not in self._models or self.pool.get(url).kv_addr is None:
                async with self.session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    self._models[url] = (await r.json())["data"][0]["id"]
                body = {"model": self._models[url], "prompt": "hello", "max_tokens": 1,
                        "kv_transfer_params": hello_params()}
                async with self.session.post(url + "/v1/completions", json=body,
                                             timeout=aiohttp.ClientTimeout(total=60)) as r:
                    params = (await r.json()).get("kv_transfer_params") or {}
                if not params.get("kv_addr"):
                    raise InstanceError(
                        "it did not report a KV listener; start it with FRONTIER_PD=1 and "
                        "--kv-transfer-config '{\"kv_connector\":\"FrontierPDConnector\",...}'"
                    )
                self.pool.set_kv_addr(url, params["kv_addr"])
        except (aiohttp.ClientError, asyncio.TimeoutError, InstanceError, KeyError, IndexError,
                TypeError, AttributeError, ValueError) as e:  # the last four: a malformed answer
            if self.pool.get(url).healthy:
                logger.warning("router: %s out of rotation: %s", url, e or type(e).__name__)
            self.pool.mark_down(url, str(e) or type(e).__name__)
            return False
        if not self.pool.get(url).healthy:
            logger.info("router: %s back in rotation", url)
        self.pool.mark_up(url)
        return True

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.health_interval)
            await asyncio.gather(*(self._probe(u) for u in self.pool.urls()),
                                 return_exceptions=True)

    # ------------------------------------------------------------------ helpers
    def _lease(self, stage: Stage, exclude=()):
        inst = self.pool.acquire(stage, exclude)
        self.metrics.inflight.labels(inst.url, stage.value).inc()
        return inst

    def _release(self, url: str, stage: Stage, ok: bool) -> None:
        self.pool.release(url, stage, ok)
        self.metrics.inflight.labels(url, stage.value).dec()

    def _fail_instance(self, url: str, err: BaseException) -> None:
        logger.warning("router: %s failed (%s); out of rotation until healthy", url, err)
        self.pool.mark_down(url, str(err) or type(err).__name__)

    async def _acquire_waiting(self, stage: Stage, exclude=()):
        """Lease an instance for `stage`, waiting up to --queue-timeout for one."""
        deadline = time.monotonic() + self.args.queue_timeout
        waiting = False
        try:
            while True:
                try:
                    return self._lease(stage, exclude)
                except NoInstanceAvailable:
                    if time.monotonic() >= deadline:
                        raise
                    if not waiting:
                        waiting = True
                        self.pool.waiting_changed(stage, 1)
                        self.metrics.queue.labels(stage.value).inc()
                    await asyncio.sleep(0.05)
        finally:
            if waiting:
                self.pool.waiting_changed(stage, -1)
                self.metrics.queue.labels(stage.value).dec()

    # ------------------------------------------------------------------ prefill
    async def _prefill(self, path: str, body: dict, tid: str, inst) -> tuple[dict | None, float | None]:
        """Run the prefill stage on `inst` (already leased): (P's JSON or None, when P answered)."""
        pbody = copy.deepcopy(body)
        pbody.update(stream=False, n=1, max_tokens=1,
                     kv_transfer_params=produce_params(tid, self.args.wire))
        pbody.pop("stream_options", None)
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        pbody.setdefault("model", self._models.get(inst.url))
        ok = False
        try:
            async with self.session.post(inst.url + path, json=pbody) as r:
                data = await r.json(content_type=None)
                if r.status >= 500:
                    raise InstanceError(f"prefill answered {r.status}")
                ok = r.status == 200
                return (data, time.monotonic()) if ok else (None, None)
        except (aiohttp.ClientConnectionError, InstanceError) as e:
            self._fail_instance(inst.url, e)
            return None, None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            logger.warning("router: prefill on %s failed: %s", inst.url, e)
            return None, None
        finally:
            self._release(inst.url, Stage.PREFILL, ok)

    # ------------------------------------------------------------------ request
    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        endpoint = "chat" if "chat" in path else "completions"
        t0 = time.monotonic()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as e:
            self.metrics.requests.labels(endpoint, "bad_request").inc()
            return _error(400, f"invalid JSON body: {e}")
        stream = bool(body.get("stream"))
        tid = uuid.uuid4().hex

        try:
            pinst = await self._acquire_waiting(Stage.PREFILL)
        except NoInstanceAvailable as e:
            self.metrics.requests.labels(endpoint, "no_instance").inc()
            self.pool.record_done(False)
            return _error(503, f"{e}; check the instances' /health and the router log")
        remote = pinst.kv_addr
        prefill_task = asyncio.create_task(self._prefill(path, body, tid, pinst))
        if self.args.dispatch == "sequential":
            pdata, _ = await asyncio.shield(prefill_task)
            if pdata is None:
                remote = None  # prefill failed: the decode instance computes the prompt

        tried: list[str] = []
        resp: web.StreamResponse | None = None
        first_at = None
        ntok = 0
        tok_at: list[float] = []  # arrival of every streamed token (per-token SLOs)
        outcome = "error"
        try:
            for attempt in range(self.args.max_retries + 1):
                try:
                    dinst = await self._acquire_waiting(Stage.DECODE, exclude=tried)
                except NoInstanceAvailable as e:
                    if resp is None:
                        outcome = "no_instance"  # counted in `finally`
                        return _error(503, f"{e}; check the instances' /health and the router log")
                    break
                tried.append(dinst.url)
                dbody = copy.deepcopy(body)
                dbody.setdefault("model", self._models.get(dinst.url))
                if attempt == 0 and remote:
                    dbody["kv_transfer_params"] = consume_params(tid, remote)
                else:  # a retry computes the prompt where it lands
                    self.metrics.retries.labels("decode").inc()
                    dbody.pop("kv_transfer_params", None)
                ok = False
                try:
                    async with self.session.post(dinst.url + path, json=dbody) as r:
                        if r.status >= 500:
                            raise InstanceError(f"decode answered {r.status}: {(await r.text())[:200]}")
                        if not stream or r.status != 200:
                            raw = await r.read()
                            ok = r.status == 200
                            resp = web.Response(body=raw, status=r.status,
                                                content_type="application/json")
                            if ok:
                                usage = json.loads(raw).get("usage") or {}
                                ntok = int(usage.get("completion_tokens") or 0)
                            outcome = "ok" if ok else f"http_{r.status}"
                            return resp
                        resp = web.StreamResponse(status=200, headers={
                            "Content-Type": r.headers.get("Content-Type", "text/event-stream"),
                            "Cache-Control": "no-cache"})
                        await resp.prepare(request)
                        async for line in r.content:
                            if line.startswith(b"data: {") and b'"choices":[{' in line.replace(b" ", b""):
                                ntok += 1
                                tok_at.append(time.monotonic())
                                if first_at is None:
                                    first_at = tok_at[0]
                            await resp.write(line)
                        await resp.write_eof()
                        ok = True
                        outcome = "ok"
                        return resp
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, InstanceError,
                        asyncio.TimeoutError) as e:
                    self._fail_instance(dinst.url, e)
                    if resp is not None and resp.prepared:
                        msg = json.dumps({"error": {"message": f"decode instance failed mid-stream: {e}",
                                                    "type": "frontier_router_error", "code": 502}})
                        try:
                            await resp.write(f"data: {msg}\n\n".encode())
                            await resp.write_eof()
                        except (ConnectionError, RuntimeError):
                            pass
                        outcome = "failed_mid_stream"
                        return resp
                finally:
                    self._release(dinst.url, Stage.DECODE, ok)
            outcome = "decode_failed"
            return _error(502, f"decode failed on {tried}; see the router log")
        finally:
            self.metrics.requests.labels(endpoint, outcome).inc()
            p, p_done = await _settle(prefill_task)
            end = time.monotonic()
            if outcome == "ok":
                if first_at is None:  # non-streaming: the first token exists when P answers
                    first_at = p_done if p_done is not None else end
                ttft = first_at - t0
                prompt_tokens = ((p or {}).get("usage") or {}).get("prompt_tokens")
                self.metrics.ttft.observe(ttft)
                self.pool.record_ttft(ttft, prompt_tokens)
                if ntok > 1:
                    tpot = (end - first_at) / (ntok - 1)
                    self.metrics.tpot.observe(tpot)
                    self.pool.record_tpot(tpot)
                if len(tok_at) > 1:
                    self.pool.record_tbt(*gap_percentiles(tok_at))
                self.metrics.e2e.observe(end - t0)
            self.pool.record_done(outcome == "ok")

    async def health(self, request: web.Request) -> web.Response:
        snap = self.pool.snapshot()
        inst = [{"url": i.url, "role": i.role, "healthy": i.healthy,
                 "inflight_prefill": i.inflight_prefill, "inflight_decode": i.inflight_decode}
                for i in snap.instances]
        ok = bool(self.pool.candidates(Stage.PREFILL)) and bool(self.pool.candidates(Stage.DECODE))
        return web.json_response({"ok": ok, "instances": inst}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        for url in self.pool.urls():
            if self.pool.get(url).healthy:
                try:
                    async with self.session.get(url + "/v1/models") as r:
                        return web.Response(body=await r.read(), status=r.status,
                                            content_type="application/json")
                except aiohttp.ClientError:
                    continue
        return _error(503, "no healthy instance")

    async def prometheus(self, request: web.Request) -> web.Response:
        total = 0.0
        for url in self.pool.urls():
            inst = self.pool.get(url)
            self.metrics.healthy.labels(url, inst.role.value).set(1 if inst.healthy else 0)
            if not inst.healthy:
                continue
            try:
                async with self.session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    total += sum(float(v) for v in _RECV_BYTES.findall(await r.text()))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
        self.metrics.kv_bytes.set(total)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4"})


async def _settle(task: asyncio.Task) -> tuple[dict | None, float | None]:
    """(P's JSON or None, when P answered)."""
    try:
        return await task
    except Exception:  # prefill failures are already handled and logged
        return None, None


def gap_percentiles(times: list[float]) -> tuple[float, float]:
    """Nearest-rank P90 and P99 of the gaps between consecutive token arrival `times` (>= 2 of them)."""
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    n = len(gaps)
    return gaps[max(0, -(-9 * n // 10) - 1)], gaps[max(0, -(-99 * n // 100) - 1)]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "frontier_router_error",
                                        "code": status}}, status=status)


def build_app(pool: InstancePool, args: argparse.Namespace) -> tuple[web.Application, Router]:
    router = Router(pool, args)
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", router.handle)
    app.router.add_post("/v1/chat/completions", router.handle)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/health", router.health)
    app.router.add_get("/metrics", router.prometheus)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    return app, router


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vllm-frontier router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs="*", default=[], metavar="URL", help="prefill-only instances")
    ap.add_argument("--decode", nargs="*", default=[], metavar="URL", help="decode-only instances")
    ap.add_argument("--both", nargs="*", default=[], metavar="URL",
                    help="instances that serve either stage (kv_both)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--dispatch", choices=("sequential", "concurrent"), default="sequential",
                    help="send the decode request after the prefill answered (default), or together "
                         "with it so the KV streams layer by layer while the prefill computes (needs "
                         "FRONTIER_PD_UNKNOWN_WAIT on prefill instances above their queueing delay)")
    ap.add_argument("--wire", choices=("raw", "fp8"), default=None,
                    help="KV wire encoding requested from prefill instances (default: theirs)")
    ap.add_argument("--max-retries", type=int, default=1, help="decode retries on another instance")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per instance call")
    ap.add_argument("--queue-timeout", type=float, default=30.0,
                    help="seconds a request waits for an instance before 503")
    ap.add_argument("--health-interval", type=float, default=5.0, help="seconds between health checks")
    ap.add_argument("--auto-ratio", action="store_true",
                    help="let the ratio controller change instance roles to meet the SLOs")
    ap.add_argument("--slo-ttft", type=float, default=None, metavar="MS")
    ap.add_argument("--slo-tpot", type=float, default=None, metavar="MS")
    ap.add_argument("--slo-kind", default="tpot-mean", choices=SLO_KINDS,
                    help="what --slo-tpot bounds: a request's mean time per output token, or the P90 / P99 of "
                    "its gaps between streamed tokens (the controller's decode feedback uses the same)")
    ap.add_argument("--decode-move-pressure", default=None, metavar="P|off",
                    help="with --auto-ratio: move instances from prefill to decode only when the split's pressure "
                    "exceeds P (default 0.9: undoing such a move waits for a drain); 'off' moves whenever the "
                    "split's pressure improves")
    args = ap.parse_args(argv)
    if args.decode_move_pressure not in (None, "off"):
        try:
            value = float(args.decode_move_pressure)
        except ValueError:
            value = math.nan
        if not 0 <= value < math.inf:   # nan fails too
            ap.error(f"--decode-move-pressure takes a number >= 0 or 'off', got {args.decode_move_pressure!r}")
        args.decode_move_pressure = value
    if not (args.prefill or args.both) or not (args.decode or args.both):
        ap.error("give at least one prefill-capable (--prefill/--both) and one decode-capable "
                 "(--decode/--both) instance URL")
    if args.auto_ratio and (args.slo_ttft is None or args.slo_tpot is None):
        ap.error("--auto-ratio needs --slo-ttft MS and --slo-tpot MS")
    for name in ("max_retries", "request_timeout", "queue_timeout", "health_interval"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def make_pool(args: argparse.Namespace) -> InstancePool:
    return InstancePool([(u, "prefill") for u in args.prefill]
                        + [(u, "decode") for u in args.decode]
                        + [(u, "both") for u in args.both])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        pool = make_pool(args)
    except ValueError as e:
        print(f"vllm-frontier router: error: {e}", file=sys.stderr)
        return 2
    app, router = build_app(pool, args)
    if args.auto_ratio:
        from vllm_frontier.schedulers.auto_ratio import start_auto_ratio

        async def _start_controller(app: web.Application) -> None:
            start_auto_ratio(pool, args, registry=router.metrics.registry)

        app.on_startup.append(_start_controller)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
