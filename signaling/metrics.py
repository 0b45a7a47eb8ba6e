"""Prometheus metrics for operators: `GET /metrics`, one registry per service.

Counters and histograms are fed as things happen (calls from the signaling
side, frames from each call's player, steps from the engine's thread);
totals the engine already keeps (dropped input frames, steps) are read at
scrape time. See docs/OPERATIONS.md for what each one means.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine import Engine
from server.media.turn_check import OUTCOMES, TurnMonitor

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_KEY: web.AppKey[ServiceMetrics] = web.AppKey("metrics")
LEVEL_BUCKETS = (-90, -70, -60, -50, -40, -30, -20, -10, -3, 0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
DELAY_BUCKETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
MOVE_GAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
RECEIVE_DELAY_BUCKETS = (0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4)
# ReceiveStats fields (server.media.audio_receive) summed over live and ended calls
RECEIVE_COUNTERS = (
    ("packets", "moshi_receive_packets", "RTP packets received from callers"),
    ("lost", "moshi_receive_packets_lost", "Callers' packets missing when due (restored by FEC or concealed)"),
    ("late", "moshi_receive_packets_late", "Callers' packets that came after their time was filled without them"),
    ("fec_packets", "moshi_receive_packets_fec", "Callers' packets that carried in-band FEC for the one before"),
    ("recovered", "moshi_receive_packets_recovered", "Lost packets restored from the next packet's in-band FEC"),
    ("concealed_ms", "moshi_receive_concealed_milliseconds", "Callers' audio made up by Opus loss concealment"),
    ("bad_packets", "moshi_receive_packets_bad", "Callers' packets that were not Opus"),
    ("unknown_payload_type", "moshi_receive_packets_unknown_payload_type",
     "Callers' RTP packets with a payload type that was not negotiated (dropped)"),
    ("loop_stalls", "moshi_receive_loop_stalls",
     "Times a call's receive clock found the server's event loop held up (its packets held back, not concealed)"),
    ("loop_stalled_ms", "moshi_receive_loop_stalled_milliseconds", "How long those event loop stalls were"),
    ("frames_over_real_time", "moshi_receive_frames_over_real_time",
     "Callers' frames dropped because they came faster than real time (the engine steps a slot at most that fast)"),
)


def dbfs(rms: float) -> float:
    return 20 * math.log10(rms) if rms > 1e-5 else -100.0


class _EngineTotals(Collector):
    """Read at scrape time: what the engine and the live calls count themselves."""

    def __init__(self, engine: Callable[[], Engine], live_output_dropped_s: Callable[[], float],
                 ended_output_dropped_s: Callable[[], float], receive_totals: Callable[[], dict[str, float]]):
        self.engine = engine
        self.live_output_dropped_s = live_output_dropped_s
        self.ended_output_dropped_s = ended_output_dropped_s
        self.receive_totals = receive_totals

    def collect(self) -> Iterable:
        engine = self.engine()
        stats = engine.stats
        yield CounterMetricFamily("moshi_input_frames_dropped", "Caller frames dropped because the model fell "
                                  "behind (bounded delay)", value=stats.frames_dropped)
        dropped_s = self.ended_output_dropped_s() + self.live_output_dropped_s()
        yield CounterMetricFamily("moshi_output_dropped_seconds", "Model audio dropped before sending, to keep "
                                  "the delay bounded", value=dropped_s)
        yield CounterMetricFamily("moshi_engine_steps", "Batched model steps", value=stats.steps)
        yield CounterMetricFamily("moshi_engine_prompt_steps", "Slot steps spent replaying persona prompts",
                                  value=stats.prompt_steps)
        yield CounterMetricFamily("moshi_token_errors", "Out-of-range tokens caught (each ends its call)",
                                  value=stats.token_errors)
        receive = self.receive_totals()
        for key, name, help_text in RECEIVE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=receive.get(key, 0))
        free = engine.free_slots if engine.ready else 0
        yield GaugeMetricFamily("moshi_call_slots_free", "Call slots free now", value=free)
        yield GaugeMetricFamily("moshi_engine_ready", "1 when warm and the device is usable",
                                value=1.0 if engine.ready and engine.fatal is None else 0.0)


class TurnTotals(Collector):
    """The TURN checks' outcomes (server.media.turn_check), read at scrape time; nothing without TURN."""

    def __init__(self, monitor: TurnMonitor):
        self.monitor = monitor

    def collect(self) -> Iterable:
        if not self.monitor.enabled:
            return
        state = self.monitor.state
        if state is not None:
            yield GaugeMetricFamily("moshi_turn_up", "1 when the last TURN Allocate with the server's credentials "
                                    "succeeded", value=1.0 if state.up else 0.0)
            outcome = GaugeMetricFamily("moshi_turn_state", "The last TURN check's outcome (1 for the current one)",
                                        labels=["outcome"])
            for name in OUTCOMES:
                outcome.add_metric([name], 1.0 if state.outcome == name else 0.0)
            yield outcome
            yield GaugeMetricFamily("moshi_turn_check_seconds", "How long the last TURN check took (or waited)",
                                    value=state.seconds)
        checks = CounterMetricFamily("moshi_turn_checks", "TURN checks, by outcome", labels=["outcome"])
        for name in OUTCOMES:
            checks.add_metric([name], self.monitor.checks[name])
        yield checks


class RefusalLog:
    """A refusal logged with its client and reason, at most once a minute per client and reason: a stranger
    who floods must not flood the log too (the counter still counts each one)."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log):
        self.every_s, self.clock, self.logger = every_s, clock, logger
        self._last: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    def note(self, client: str, reason: str, why: str) -> None:
        now, key = self.clock(), (client, reason)
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        if len(self._last) > 4096:  # forget what was not logged for a while, so the table stays small
            self._last = {k: t for k, t in self._last.items() if now - t < self.every_s}
            self._unlogged = {k: n for k, n in self._unlogged.items() if k in self._last}
        self._last[key] = now
        more = self._unlogged.pop(key, 0)
        self.logger.warning("refused %s (%s): %s%s", client, reason, why, f" ({more} more since)" if more else "")


class ServiceMetrics:
    """The service's metrics; CallSession reports to it through the `call_*` methods."""

    def __init__(self, engine: Callable[[], Engine], live_sessions: Callable[[], Iterable]):
        self.registry = CollectorRegistry()
        self.refusals = RefusalLog()
        r = self.registry
        self.calls_active = Gauge("moshi_calls_active", "Calls in progress", registry=r)
        self.calls_started = Counter("moshi_calls_started", "Calls answered", registry=r)
        self.calls_ended = Counter("moshi_calls_ended", "Calls ended, by reason", ["reason"], registry=r)
        self.calls_rejected = Counter("moshi_calls_rejected", "Offers refused, by reason", ["reason"], registry=r)
        self.connections_refused = Counter(
            "moshi_http_connections_refused", "HTTP connections closed by the server's guard, by reason "
            "(connections, connections_per_client: over a cap; head_timeout: slow or idle)", ["reason"], registry=r)
        self.calls_connected = Counter("moshi_calls_connected", "Calls whose media connected, by path "
                                       "(relay: through TURN; direct: host or server-reflexive)", ["path"], registry=r)
        self.step_seconds = Histogram("moshi_engine_step_seconds", "Duration of one batched model step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.input_level = Histogram("moshi_input_level_dbfs", "RMS level of each 80 ms frame from callers",
                                     buckets=LEVEL_BUCKETS, registry=r)
        self.output_level = Histogram("moshi_output_level_dbfs", "RMS level of each 80 ms frame of the model's audio",
                                      buckets=LEVEL_BUCKETS, registry=r)
        self.mouth_to_ear = Histogram(
            "moshi_mouth_to_ear_estimate_seconds",
            "Per frame: receive buffer target + mean framing wait + engine time + outbound queue + the model's "
            "frame of delay + RTT (the caller's own jitter buffer is not visible to the server)",
            buckets=DELAY_BUCKETS, registry=r)
        self.receive_delay = Histogram(
            "moshi_receive_target_delay_seconds",
            "Per frame: the receive jitter buffer's target delay (follows the caller's arrival jitter)",
            buckets=RECEIVE_DELAY_BUCKETS, registry=r)
        self.call_moves = Counter(
            "moshi_call_moves", "Calls that carried on through a network change, by how (followed: the server "
            "followed the caller to a new address; renominated: the caller chose a new path; restart: an ICE "
            "restart; resume: a new peer connection; returned: the same path came back)", ["kind"], registry=r)
        self.call_move_gap = Histogram("moshi_call_move_gap_seconds", "How long the audio stopped, per move",
                                       ["kind"], buckets=MOVE_GAP_BUCKETS, registry=r)
        self._ended_output_dropped_s = 0.0
        self._ended_receive: dict[str, float] = {}
        self._live_sessions = live_sessions
        r.register(_EngineTotals(engine, self._live_output_dropped_s, lambda: self._ended_output_dropped_s,
                                 self._receive_totals))

    def _receive_totals(self) -> dict[str, float]:
        totals = dict(self._ended_receive)
        for session in self._live_sessions():
            for key, value in session.receive_figures().items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def _live_output_dropped_s(self) -> float:
        return sum(session.output_dropped_s for session in self._live_sessions())

    def engine_step(self, seconds: float, rows: int) -> None:
        """Called on the engine's inference thread (prometheus_client is thread-safe)."""
        self.step_seconds.observe(seconds)

    # -- from CallSession ----------------------------------------------------------------------------

    def call_started(self) -> None:
        self.calls_started.inc()
        self.calls_active.inc()

    def call_connected(self, path: str) -> None:
        self.calls_connected.labels(path).inc()

    def call_frame(self, input_rms: float, output_rms: float, mouth_to_ear_s: float,
                   receive_delay_s: float = 0.0) -> None:
        self.input_level.observe(dbfs(input_rms))
        self.output_level.observe(dbfs(output_rms))
        self.mouth_to_ear.observe(mouth_to_ear_s)
        self.receive_delay.observe(receive_delay_s)

    def call_ended(self, kind: str, output_dropped_s: float, receive: dict | None = None) -> None:
        self.calls_active.dec()
        self.calls_ended.labels(kind).inc()
        self._ended_output_dropped_s += output_dropped_s
        for key, _, _ in RECEIVE_COUNTERS:
            self._ended_receive[key] = self._ended_receive.get(key, 0) + (receive or {}).get(key, 0)

    def call_moved(self, kind: str, gap_s: float) -> None:
        self.call_moves.labels(kind).inc()
        self.call_move_gap.labels(kind).observe(gap_s)

    def rejected(self, reason: str, client: str | None = None, why: str = "") -> None:
        """Count a refused request; with its `client`, log it too (signaling.metrics.RefusalLog)."""
        self.calls_rejected.labels(reason).inc()
        if client is not None:
            self.refusals.note(client, reason, why)

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
