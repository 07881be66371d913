"""Live ratio control inside the P/D router (``vllm-frontier router --auto-ratio --slo-ttft MS --slo-tpot MS``).

`start_auto_ratio(pool, args)` starts an asyncio task that, every ``args.auto_ratio_interval`` seconds
(default 5): scrapes each instance's ``/metrics`` (`monitor`), builds a `LoadSample`, asks the
`RatioController`, and applies its split with `InstancePool.set_role` (draining: requests in flight
finish where they are, no engine restart; instances must run the KV connector as ``kv_both``). Every
change is logged; the split is exported as Prometheus gauges:

- ``frontier_pd_instances{role}``: managed instances per role (prefill, decode);
- ``frontier_pd_prefill_fraction``: prefill / (prefill + decode);
- ``frontier_pd_role_changes_total``: instances re-roled;
- ``frontier_pd_demand_instances{role}``: the controller's demand estimate.

Managed instances: healthy ones whose role is ``prefill`` or ``decode``; ``both`` instances are left
alone. The cost model is ``args.ratio_profile`` (a `cost_model.PROFILES` name, default
``cpu-tiny-deepseek``); the controller's feedback corrects it from the measured P90 TTFT/TPOT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from vllm_frontier.schedulers.controller import ControllerConfig, RatioController, RatioDecision
from vllm_frontier.schedulers.cost_model import PROFILES
from vllm_frontier.schedulers.instance_pool import InstancePool, PoolSnapshot
from vllm_frontier.schedulers.monitor import SampleBuilder, scrape

__all__ = ["start_auto_ratio", "AutoRatio", "RatioGauges", "plan_role_changes", "controller_from_args"]

logger = logging.getLogger("vllm_frontier.auto_ratio")


class RatioGauges:
    """The Prometheus metrics of the ratio controller, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Gauge("frontier_pd_instances", "managed instances per role", ["role"], registry=registry)
        self.fraction = Gauge("frontier_pd_prefill_fraction", "prefill / (prefill + decode) managed instances",
                              registry=registry)
        self.changes = Counter("frontier_pd_role_changes", "instances re-roled by the ratio controller",
                               registry=registry)
        self.demand = Gauge("frontier_pd_demand_instances", "ratio controller demand estimate per role",
                            ["role"], registry=registry)

    def show(self, n_p: int, n_d: int, d: RatioDecision | None = None) -> None:
        self.instances.labels("prefill").set(n_p)
        self.instances.labels("decode").set(n_d)
        self.fraction.set(n_p / (n_p + n_d) if n_p + n_d else 0.0)
        if d is not None:
            self.demand.labels("prefill").set(d.need_prefill)
            self.demand.labels("decode").set(d.need_decode if d.need_decode != float("inf") else 1e9)


def managed_roles(snap: PoolSnapshot) -> dict[str, str]:
    """url -> role of the healthy prefill/decode instances."""
    return {i.url: i.role for i in snap.instances if i.healthy and i.role in ("prefill", "decode")}


def plan_role_changes(snap: PoolSnapshot, n_prefill: int) -> list[tuple[str, str]]:
    """(url, new role) moves that make `n_prefill` of the managed instances prefill: the instances with
    the least in-flight work of their current role move first (they drain fastest)."""
    inst = [i for i in snap.instances if i.healthy and i.role in ("prefill", "decode")]
    pre = [i for i in inst if i.role == "prefill"]
    dec = [i for i in inst if i.role == "decode"]
    if not 0 <= n_prefill <= len(inst):
        raise ValueError(f"n_prefill={n_prefill} outside [0, {len(inst)}] managed instances")
    if n_prefill > len(pre):
        movers = sorted(dec, key=lambda i: (i.inflight_decode, i.url))[: n_prefill - len(pre)]
        return [(i.url, "prefill") for i in movers]
    movers = sorted(pre, key=lambda i: (i.inflight_prefill, i.url))[: len(pre) - n_prefill]
    return [(i.url, "decode") for i in movers]


def controller_from_args(args: argparse.Namespace) -> RatioController:
    """A controller for the router's ``--slo-ttft MS --slo-tpot MS`` (and optional ``ratio_profile``)."""
    if getattr(args, "slo_ttft", None) is None or getattr(args, "slo_tpot", None) is None:
        raise ValueError("--auto-ratio needs --slo-ttft MS and --slo-tpot MS")
    name = getattr(args, "ratio_profile", None) or "cpu-tiny-deepseek"
    if name not in PROFILES:
        raise ValueError(f"unknown ratio profile {name!r}; choose one of {sorted(PROFILES)}")
    prof = PROFILES[name]
    interval = float(getattr(args, "auto_ratio_interval", None) or 5.0)
    pre, dec = prof.with_overhead()  # vLLM allocates KV in pages: kv_paged
    extra = {}
    move = getattr(args, "decode_move_pressure", None)   # None: the config's default; "off": no threshold
    if move is not None:
        extra["decode_move_pressure"] = None if move == "off" else float(move)
    return RatioController(ControllerConfig(
        slo_ttft_s=args.slo_ttft / 1000.0, slo_tpot_s=args.slo_tpot / 1000.0,
        prefill=pre, decode=dec, kv_capacity_tokens=prof.kv_capacity_tokens, kv_paged=True,
        horizon_s=2 * interval, cooldown_s=interval, slo_kind=getattr(args, "slo_kind", None) or "tpot-mean",
        **extra,
    ))


@dataclass
class AutoRatio:
    """The control loop; `tick` is one iteration (separately callable in tests)."""

    pool: InstancePool
    controller: RatioController
    gauges: RatioGauges
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"auto-ratio interval must be > 0 seconds, got {self.interval_s}")
        self._builder = SampleBuilder()

    async def tick(self, session) -> RatioDecision | None:
        snap = self.pool.snapshot()
        managed = managed_roles(snap)
        scraped = await scrape(session, managed)
        sample = self._builder.sample(time.monotonic(), snap, scraped, managed, self.interval_s)
        d = self.controller.step(sample)
        if d.changed:
            snap = self.pool.snapshot()  # roles may have changed during the scrape
            moves = plan_role_changes(snap, d.n_prefill) if len(managed_roles(snap)) == len(managed) else []
            for url, role in moves:
                old = self.pool.set_role(url, role)
                self.gauges.changes.inc()
                logger.info("auto-ratio: %s %s -> %s (P:D now %d:%d; %s)", url, old.value, role,
                            d.n_prefill, d.n_decode, d.reason)
        roles = managed_roles(self.pool.snapshot())
        n_p = sum(1 for r in roles.values() if r == "prefill")
        self.gauges.show(n_p, len(roles) - n_p, d)
        return d

    async def run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            roles = managed_roles(self.pool.snapshot())
            n_p = sum(1 for r in roles.values() if r == "prefill")
            self.gauges.show(n_p, len(roles) - n_p)
            logger.info("auto-ratio: started, P:D %d:%d, every %.1fs", n_p, len(roles) - n_p, self.interval_s)
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.tick(session)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad scrape must not stop the controller
                    logger.exception("auto-ratio: iteration failed; keeping the current split")


def start_auto_ratio(pool: InstancePool, args: argparse.Namespace,
                     registry: CollectorRegistry | None = None) -> asyncio.Task:
    """Start the control loop on the running event loop; returns its task (cancel it to stop).

    `registry`: where the gauges go (the router's registry, so they appear on its ``/metrics``);
    prometheus_client's default registry when None.
    """
    ctrl = controller_from_args(args)
    interval = float(getattr(args, "auto_ratio_interval", None) or 5.0)
    loop = AutoRatio(pool, ctrl, RatioGauges(registry if registry is not None else REGISTRY), interval)
    return asyncio.get_running_loop().create_task(loop.run(), name="frontier-auto-ratio")
