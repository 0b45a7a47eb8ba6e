"""Health, readiness, status and metrics pages: what a load balancer, Kubernetes and Prometheus ask.

    GET /healthz   alive: 200, or 503 once the model's device has failed (restart the process)
    GET /readyz    ready for a call: warm, a slot free, the device answers (and, relay-only, TURN allocates)
    GET /status    model, test-model flag, free call slots, engine figures
    GET /metrics   Prometheus text (signaling.metrics), summed over media workers
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from .forward import merge_expositions
from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .app import SignalingService


class ServiceHealth:
    """The pages above for one signaling service (its engine, workers, TURN monitor and drain state)."""

    def __init__(self, service: SignalingService):
        self.service = service
        self._device_checked_at = 0.0
        self._device_ok = True

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/status", self.status)

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: fails only when the process must be restarted (its model's device failed)."""
        fatal = self.service.engine.fatal
        if fatal is not None:
            return web.json_response({"alive": False, "reason": str(fatal)}, status=503)
        return web.json_response({"alive": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: warm, a call slot free, and the device answers a tiny operation."""
        engine = self.service.engine
        reason = None
        if engine.fatal is not None:
            reason = str(engine.fatal)
        elif self.service.draining:
            reason = "draining: the server is restarting"
        elif not engine.ready:
            reason = "the model is warming up"
        elif engine.free_slots == 0:
            reason = f"all {engine.batch_size} call slots are busy"
        elif self.service.workers is not None and not self.service.workers.alive():
            reason = "no media worker is running"
        elif (turn_down := self.service.turn_down()) is not None:
            reason = turn_down
        elif not await self._device_answers():
            reason = "the model's device did not answer a test operation within 2 s"
        monitor = self.service.turn
        turn = {"turn": monitor.describe()} if monitor is not None and monitor.enabled else {}
        if reason is not None:
            return web.json_response({"ready": False, "reason": reason, **turn}, status=503,
                                     headers={"Retry-After": "2"})
        return web.json_response({"ready": True, "free_slots": engine.free_slots, **turn})

    async def _device_answers(self) -> bool:
        """Run a tiny operation on the model's device between steps; at most once a second."""
        now = asyncio.get_running_loop().time()
        if now - self._device_checked_at < 1.0:
            return self._device_ok
        self._device_checked_at = now
        try:
            self._device_ok = await asyncio.wait_for(self.service.engine.check_device(), 2.0)
        except Exception:  # noqa: BLE001 - a timeout or an error both mean "not usable now"
            self._device_ok = False
        return self._device_ok

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = self.service.metrics.render()
        if self.service.forwarder is not None:
            body = merge_expositions(body.decode(), await self.service.forwarder.worker_metrics())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def status(self, request: web.Request) -> web.Response:
        service, engine = self.service, self.service.engine
        if not engine.ready:
            return web.json_response({"ready": False}, status=503, headers={"Retry-After": "2"})
        info = engine.info
        return web.json_response({
            "ready": True,
            "auth": service.config.api_token is not None,
            "model": info.name,
            "kind": info.kind,
            "test_model": info.is_test_model,
            "notice": info.notice,
            "max_calls": engine.batch_size,
            "free_slots": engine.free_slots,
            "active_sessions": service.calls_in_progress(),
            "media_workers": None if service.workers is None else len(service.workers.alive()),
            "engine": engine.stats.summary(),
            "turn": service.turn.describe() if service.turn is not None else None,
        })
