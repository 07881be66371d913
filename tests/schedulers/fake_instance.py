"""A fake vLLM instance for the router tests (no engines), and a router in front of such fakes.

`FakeInstance` speaks the slice of vLLM's OpenAI API the router uses, with known timings and
answers, and records every request it was sent."""

import asyncio

import aiohttp
from aiohttp import web

from vllm_frontier.schedulers import router as R


class FakeInstance:
    """Answers the router's one-token *hello* with ``kv_addr = tcp://<name>:1`` (recorded in `hellos`);
    every other completion is recorded in `seen`. Prefill calls (produce params) answer after
    `prefill_s` with one token; other calls stream `tokens` tokens, the first after `first_s`, then
    one every `gap_s` (non-streaming: the JSON, text ``name * n``, after the same total time), plus a
    usage chunk when the client asks with ``stream_options.include_usage``. `status` != 200 answers
    that code with `error_text` as message; `drop` closes the connection before answering,
    `drop_after` (a token count) in the middle of a stream. `gate` (an asyncio.Event) holds every
    completion until set. ``/metrics`` answers `metrics_text`, by default 1000 received KV bytes per
    completion seen."""

    content_type = "text/event-stream"

    def __init__(self, name, *, prefill_s=0.0, first_s=0.0, gap_s=0.0, tokens=4, status=200,
                 drop=False, drop_after=None, gate=None, metrics_text=None, error_text="nope"):
        self.name, self.prefill_s, self.first_s, self.gap_s = name, prefill_s, first_s, gap_s
        self.tokens, self.status, self.drop, self.drop_after, self.gate = tokens, status, drop, drop_after, gate
        self.metrics_text, self.error_text = metrics_text, error_text
        self.seen: list[dict] = []
        self.hellos: list[dict] = []
        self.runner = None

    async def start(self):
        app = web.Application(client_max_size=64 << 20)  # as vLLM: long prompts are accepted
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self):
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def health(self, request):
        return web.json_response({})

    async def models(self, request):
        return web.json_response({"data": [{"id": "m"}]})

    async def metrics(self, request):
        if self.metrics_text is not None:
            return web.Response(text=self.metrics_text)
        return web.Response(text=f'frontier_pd_recv_bytes_total{{engine="0"}} {1000 * len(self.seen)}.0\n')

    def hello_answer(self):
        return {"choices": [{"text": "x"}], "kv_transfer_params": {"kv_addr": f"tcp://{self.name}:1"}}

    async def complete(self, request):
        body = await request.json()
        kp = body.get("kv_transfer_params") or {}
        if kp.get("frontier_pd") == "hello":
            self.hellos.append(body)
            return web.json_response(self.hello_answer())
        self.seen.append(body)
        if self.gate is not None:
            await self.gate.wait()
        if self.drop:  # the instance dies: drop the connection
            request.transport.close()
            await asyncio.sleep(0.1)
        if self.status != 200:
            return web.json_response({"error": {"message": self.error_text}}, status=self.status)
        if kp.get("frontier_pd") == "produce":
            await asyncio.sleep(self.prefill_s)
            return web.json_response({"choices": [{"text": "p"}],
                                      "usage": {"prompt_tokens": 7, "completion_tokens": 1}})
        n = min(body.get("max_tokens", 16), self.tokens)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": self.content_type})
            await resp.prepare(request)
            await asyncio.sleep(self.first_s)
            for i in range(n):
                if i == self.drop_after:
                    request.transport.close()
                    return resp
                if i:
                    await asyncio.sleep(self.gap_s)
                await resp.write(b'data: {"choices": [{"text": "t%d"}]}\n\n' % i)
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": %d}}\n\n'
                                 % n)
            await resp.write(b"data: [DONE]\n\n")
            return resp
        await asyncio.sleep(self.first_s + self.gap_s * (n - 1))
        return web.json_response({"choices": [{"text": self.name * n}],
                                  "usage": {"prompt_tokens": 7, "completion_tokens": n}})


async def metrics(session, router_url):
    """The router's Prometheus text."""
    async with session.get(router_url + "/metrics") as r:
        return await r.text()


def run_router(instances, roles, fn, *extra):
    """Start the fakes, a router in front of them (`roles`: prefill/decode/both per instance; `extra`:
    more router flags, later ones win), and run ``await fn(session, router_url, instances, pool, router)``."""
    async def main():
        insts = [await i.start() for i in instances]
        argv = ["--health-interval", "60", "--queue-timeout", "0.2", *extra]
        for role in ("prefill", "decode", "both"):
            urls = [i.url for i, r in zip(insts, roles) if r == role]
            if urls:
                argv += [f"--{role}", *urls]
        args = R.parse_args(argv)
        pool = R.make_pool(args)
        app, router = R.build_app(pool, args)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as s:
                return await fn(s, url, insts, pool, router)
        finally:
            await runner.cleanup()
            for i in insts:
                await i.stop()

    return asyncio.run(main())
