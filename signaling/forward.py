"""The front's call routes when media runs in worker processes: each request goes to the right worker.

A new call (`POST /offer`, `POST /whip`) goes to the worker with the fewest
calls; a request about a call (`/sessions/{id}`, `/whip/{id}`) goes to the
worker named by the id's prefix, or gets a 404 when that worker is gone (its
calls ended with it). The front's guards (token, CORS, offer limits) have run
before a request gets here. `/metrics` sums every worker's exposition with the
front's own, the engine's figures taken from the front alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from server.media.workers import MediaWorkers, WorkerProcess

from .connections import BodyTimeout, read_body
from .errors import SessionRefused, json_error
from .offer_check import resume_target

log = logging.getLogger(__name__)

REQUEST_HEADERS = ("Content-Type", "If-Match", "Accept")
RESPONSE_HEADERS = ("Content-Type", "Location", "ETag", "Retry-After", "Link", "Accept-Patch")
# counted by the engine, which lives in the front: workers' copies of these are zero
ENGINE_METRICS = {"moshi_input_frames_dropped", "moshi_engine_steps", "moshi_engine_prompt_steps",
                  "moshi_token_errors", "moshi_call_slots_free", "moshi_engine_ready", "moshi_engine_step_seconds"}


class CallForwarder:
    def __init__(self, workers: MediaWorkers, timeout_s: float = 30.0,
                 gate: Callable[[], Awaitable[SessionRefused | None]] | None = None,
                 client_of: Callable[[web.Request], str] | None = None, body_timeout_s: float = 10.0):
        """`gate`: asked before a new call is forwarded; a refusal goes back as it is (relay-only with
        TURN down: the front knows, its workers do not check TURN themselves). `client_of`: who sent a new
        call, passed on as X-Forwarded-For (a worker trusts its front) for the per-client share of the lines,
        which the engine, in the front, counts over all workers."""
        self.workers = workers
        self.gate = gate
        self.client_of = client_of
        self.body_timeout_s = body_timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/offer", self.new_call)
        app.router.add_post("/whip", self.new_call)
        for path in ("/sessions/{session_id}", "/sessions/{session_id}/offer", "/whip/{session_id}"):
            app.router.add_route("*", path, self.existing_call)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self.timeout)
        return self._http

    async def new_call(self, request: web.Request) -> web.Response:
        if request.path == "/offer" and (resumed := await self._resumed_session(request)) is not None:
            worker = self.workers.holding(resumed)  # the call's own worker, past every gate: it holds a slot
            if worker is None:
                return json_error(404, "no such session (its media worker is gone, and the call with it)")
            return await self._forward(request, worker)
        if request.method == "POST" and self.gate is not None and (refused := await self.gate()) is not None:
            return json_error(refused.status, refused.message, refused.headers)
        worker = self.workers.pick()
        if worker is None:
            return json_error(503, "no media worker is running; try again shortly", {"Retry-After": "2"})
        client = {"X-Forwarded-For": self.client_of(request)} if self.client_of is not None else {}
        with self.workers.offer_under_way(worker):
            return await self._forward(request, worker, client)

    async def existing_call(self, request: web.Request) -> web.Response:
        worker = self.workers.holding(request.match_info["session_id"])
        if worker is None:
            return json_error(404, "no such session (it may have ended already)")
        return await self._forward(request, worker)

    async def _resumed_session(self, request: web.Request) -> str | None:
        """The session a `POST /offer` resumes, if any (the body is read here once; aiohttp keeps it)."""
        try:
            body = await read_body(request, self.body_timeout_s)
        except BodyTimeout:
            return None  # _forward reads it again and answers 408
        return resume_target(body)

    async def _forward(self, request: web.Request, worker: WorkerProcess, extra: dict | None = None) -> web.Response:
        try:
            body = await read_body(request, self.body_timeout_s)
        except BodyTimeout as exc:
            return exc.response()
        headers = {name: request.headers[name] for name in REQUEST_HEADERS if name in request.headers}
        headers.update(extra or {})
        url = f"http://127.0.0.1:{worker.link.http_port}{request.rel_url}"
        try:
            async with self._client().request(request.method, url, data=body, headers=headers) as answer:
                payload = await answer.read()
                kept = CIMultiDict()  # every value of each: a WHIP answer has a Link header per ICE server
                for name in RESPONSE_HEADERS:
                    for value in answer.headers.getall(name, ()):
                        kept.add(name, value)
                return web.Response(status=answer.status, body=payload, headers=kept)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.error("media worker %d did not answer %s %s: %s", worker.index, request.method, request.path, exc)
            return json_error(502, f"the media worker handling this request failed: {type(exc).__name__}")

    async def worker_metrics(self) -> list[str]:
        async def fetch(worker: WorkerProcess) -> str:
            try:
                async with self._client().get(f"http://127.0.0.1:{worker.link.http_port}/metrics") as answer:
                    return await answer.text()
            except (TimeoutError, aiohttp.ClientError):
                return ""

        return list(await asyncio.gather(*(fetch(worker) for worker in self.workers.alive())))


def merge_expositions(front: str, workers: list[str]) -> bytes:
    """One Prometheus exposition: each sample summed over the front and every worker, except the
    engine's own metrics, which come from the front alone (`_created` timestamps are left out)."""
    described: dict[str, tuple[str, str]] = {}
    sums: dict[str, dict[tuple[str, tuple], float]] = defaultdict(dict)
    for origin, text in [("front", front)] + [("worker", text) for text in workers]:
        for family in text_string_to_metric_families(text):
            if origin == "worker" and family.name in ENGINE_METRICS:
                continue
            described.setdefault(family.name, (family.documentation, family.type))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                sums[family.name][key] = sums[family.name].get(key, 0.0) + sample.value
    lines = []
    for name, (documentation, kind) in described.items():
        lines.append(f"# HELP {name} {_escape(documentation, help_text=True)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in sums[name].items():
            rendered = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels)
            lines.append(f"{sample_name}{{{rendered}}} {value!r}" if rendered else f"{sample_name} {value!r}")
    return ("\n".join(lines) + "\n").encode()


def _escape(text: str, help_text: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text if help_text else text.replace('"', '\\"')


class WorkerTotals(Collector):
    """The front's own figures about its workers and the process boundary."""

    def __init__(self, workers: MediaWorkers):
        self.workers = workers

    def collect(self):
        host = self.workers.host.stats
        yield GaugeMetricFamily("moshi_media_workers", "Media worker processes running and connected",
                                value=len(self.workers.alive()))
        yield CounterMetricFamily("moshi_media_worker_restarts", "Media workers that exited and were replaced",
                                  value=self.workers.restarts)
        yield CounterMetricFamily("moshi_engine_results_dropped", "Results a media worker did not read in time "
                                  "(its socket was full): that worker's frames only", value=host.results_dropped)
        yield CounterMetricFamily("moshi_engine_bad_messages", "Messages from media workers that did not parse, "
                                  "or named a call the worker does not hold", value=host.bad_messages
                                  + host.foreign_frames)
