"""The HTTP side: offer/answer, hang-up, health, status, and the web page.

    POST   /offer             {"sdp", "type": "offer", "persona"?} -> 200 {"sdp", "type": "answer", "session_id",
                              "resume_token"}; with "resume": the call's caller on a new connection, and
                              POST /sessions/{id}/offer: an ICE restart (signaling.recovery)
    DELETE /sessions/{id}     hang a call up                       -> 200 {"session_id", "ended": true}
    GET    /sessions/{id}     a call's live figures                -> 200 JSON
    GET    /healthz           alive: 200, or 503 once the model's device has failed (restart the process)
    GET    /readyz            ready for a call: warm, a slot free, the device answers (and, relay-only, TURN
                              allocates); else 503 and why
    GET    /metrics           Prometheus metrics (signaling.metrics)
    GET    /status            model, test-model flag, free call slots
    GET    /ice-servers       the STUN/TURN servers clients should use: {"iceServers": [...]}
    GET    /personas          whether the model takes a persona, its voices, default and limits
    GET    /                  the web page (web/index.html; assets under /web/)
    /whip ...                 WHIP (RFC 9725), see signaling/whip.py

Errors are JSON `{"error": "..."}` with a 4xx that says what the client got
wrong, or 503 with `Retry-After` when every call slot is taken. A persona
(`{"prompt": str, "voice": str}`, PersonaPlex-style models only) that is too
long, names a voice the server lacks, or is sent to a model that takes none
gets a 400 that says which.
The owner of the app starts and stops the engine; the app only uses it.
Token, CORS and offer-rate guards: signaling.guards; HTTP connection caps and deadlines:
signaling.connections; the health, readiness, status and metrics pages: signaling.health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiortc import RTCSessionDescription

from server.engine import ClientAtLimit, Engine, EngineFull, EngineNotReady
from server.media.ice import IceConfig
from server.media.peer import CallSession, RelayUnavailable
from server.media.turn_check import TurnMonitor
from server.media.workers import MediaWorkers
from server.model.persona import Persona, PersonaError

from .connections import BodyRefused, BodyTooLarge, ConnectionGuard, ConnectionLimits, read_body, start_guarded_runner
from .ended import EndedSessions
from .errors import SessionRefused, json_error
from .forward import CallForwarder, WorkerTotals
from .guards import OfferRateLimit, client_of, cors_middleware, token_middleware
from .health import ServiceHealth
from .metrics import METRICS_KEY, ServiceMetrics, TurnTotals
from .offer_check import MAX_BODY_BYTES, OfferRejected, parse_offer_json
from .recovery import CallRecovery
from .whip import WhipEndpoint, whip_options

log = logging.getLogger(__name__)

# The page lives in the repository's web/; an installed copy is pointed at it by this variable.
WEB_DIR = Path(os.environ.get("MOSHI_WEBRTC_WEB_DIR", Path(__file__).resolve().parent.parent / "web"))
SERVICE_KEY = web.AppKey("service", "SignalingService")


SERVER_RESTART = "server_restart"  # the reason (and kind) of calls a drain had to end


def default_calls_per_client(max_calls: int) -> int:
    """A quarter of the lines, at least one: two strangers together hold at most half of them, and an office
    behind one NAT address still gets several lines on a server of any size (16 of 64)."""
    return max(1, -(-max_calls // 4))


@dataclass
class SignalingConfig:
    ice: IceConfig = field(default_factory=IceConfig)
    media_timeout_s: float = 10.0
    resume_window_s: float = 30.0  # a call whose caller went away waits this long for it to come back; 0: ends
    connect_timeout_s: float | None = 5.0  # an answered call not connected this long gives its slot back
    max_output_buffer_ms: int = 400  # model audio waiting to be sent; past it the oldest is dropped
    max_standing_ms: int = 60  # delay the outbound buffer may hold for a whole second before it is shed
    answer_timeout_s: float = 15.0
    retry_after_s: int = 5
    web_dir: Path = WEB_DIR
    api_token: str | None = None  # bearer token for the call API (offer, sessions, WHIP, ICE servers); None: open
    cors_origins: tuple[str, ...] = ()  # other origins whose pages may call the API
    max_offers_per_minute: int = 20  # per client address; 0: no limit
    max_calls_per_client: int | None = None  # calls one client holds, connected or being set up; None: a quarter
    # of the lines, at least one (`default_calls_per_client`); 0: no limit
    max_ice_server_requests_per_minute: int = 60  # GET /ice-servers (fresh TURN credentials) per client; 0: none
    trust_forwarded_for: bool = False  # behind a reverse proxy: the client is X-Forwarded-For's first address
    max_call_s: float | None = 3600.0  # a call ends after this long
    session_id_prefix: str = ""  # the replica's (`r1.`) and a media worker's (`w0.`): routes by id alone
    public_url: str | None = None  # this replica's own URL: WHIP Location and `session_url` are absolute
    ended_sessions_kept: int = 256  # ended calls whose summary GET /sessions/{id} still shows ...
    ended_session_keep_s: float = 300.0  # ... for this long
    turn_check_interval_s: float | None = 30.0  # a TURN Allocate this often (None: never; media workers don't)
    turn_check_retry_s: float = 5.0  # ... and this often while it fails
    turn_check_timeout_s: float = 3.0  # no answer in this long: TURN is unreachable
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # HTTP connection caps and deadlines


class SignalingService:
    def __init__(self, engine: Engine, config: SignalingConfig | None = None, workers: MediaWorkers | None = None):
        """`workers`: media runs in these worker processes, and this service (the front) forwards every
        call route to them (signaling.forward); None: calls are served in this process."""
        self.config = config or SignalingConfig()
        self.sessions: dict[str, CallSession] = {}
        self.ended = EndedSessions(self.config.ended_sessions_kept, self.config.ended_session_keep_s)
        self.metrics = ServiceMetrics(lambda: self.engine, lambda: list(self.sessions.values()))
        self.workers = workers
        self.forwarder = CallForwarder(workers, gate=self.admission_refusal, client_of=self.client,
                                       body_timeout_s=self.config.connections.body_timeout_s) if (
            workers is not None) else None
        if workers is not None:
            self.metrics.registry.register(WorkerTotals(workers))
        self.turn: TurnMonitor | None = None
        if self.config.turn_check_interval_s is not None:
            self.turn = TurnMonitor(self.config.ice, interval_s=self.config.turn_check_interval_s,
                                    retry_s=self.config.turn_check_retry_s, timeout_s=self.config.turn_check_timeout_s)
            self.metrics.registry.register(TurnTotals(self.turn))
        self.use_engine(engine)
        self.health = ServiceHealth(self)
        self.draining = False  # set by drain(): no new calls, readiness fails, calls in progress go on
        self.connections = ConnectionGuard(self.config.connections, on_refused=self.metrics.connection_refused)
        self.recovery = CallRecovery(self)

    def app(self) -> web.Application:
        config = self.config
        limit = OfferRateLimit(config.max_offers_per_minute, config.trust_forwarded_for)
        credentials = OfferRateLimit(config.max_ice_server_requests_per_minute, config.trust_forwarded_for,
                                     paths=("/ice-servers",), method="GET", what="ICE server requests",
                                     reason="credentials_rate")
        middlewares = [self.connections.middleware(), cors_middleware(config.cors_origins, self.client),
                       token_middleware(config.api_token, self.client), limit.middleware(),
                       credentials.middleware()]
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        app[SERVICE_KEY] = self
        app[METRICS_KEY] = self.metrics
        if self.forwarder is not None:
            self.forwarder.add_routes(app)
            app.router.add_route("OPTIONS", "/whip", whip_options)
        else:
            app.router.add_post("/offer", self.post_offer)
            app.router.add_delete("/sessions/{session_id}", self.delete_session)
            app.router.add_get("/sessions/{session_id}", self.get_session)
            self.recovery.add_routes(app)
            WhipEndpoint(self).add_routes(app)
        self.health.add_routes(app)
        app.router.add_get("/ice-servers", self.ice_servers)
        app.router.add_get("/personas", self.personas)
        app.router.add_get("/", self.index)
        app.router.add_static("/web/", self.config.web_dir)
        app.on_shutdown.append(self._hang_up_all)
        if self.turn is not None:
            app.on_startup.append(self._start_turn_checks)
            app.on_cleanup.append(self._stop_turn_checks)
        return app

    async def start_runner(self) -> web.AppRunner:
        """The app, set up and guarded (signaling.connections: caps and deadlines on HTTP connections); add a
        site to it. A media worker, which only its front talks to, runs its app unguarded."""
        return await start_guarded_runner(self.app(), self.connections)

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body, within the body deadline and size; raises BodyRefused (BodyTimeout, BodyTooLarge):
        answer with its `response()`."""
        try:
            return await read_body(request, self.config.connections.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes; an offer is a few kB") from None

    async def _start_turn_checks(self, app: web.Application) -> None:
        self.turn.start()

    async def _stop_turn_checks(self, app: web.Application) -> None:
        await self.turn.stop()

    def use_engine(self, engine: Engine) -> None:
        """Serve calls from `engine` (the CLI swaps in the tiny model when the real one fails to load)."""
        self.engine = engine
        engine.step_listeners.append(self.metrics.engine_step)

    # -- calls ---------------------------------------------------------------------------------

    async def post_offer(self, request: web.Request) -> web.Response:
        try:
            body = await self.read_body(request)
        except BodyRefused as exc:
            return exc.response()
        try:
            offer = parse_offer_json(body, request.content_type)
        except OfferRejected as rejected:
            self.metrics.rejected("bad_offer", self.client(request), f"{rejected.status}: {rejected.message}")
            return json_error(rejected.status, rejected.message)
        if offer.resume is not None:  # a call in progress: no new slot, never "busy"
            return await self.recovery.resume(request, offer)
        try:
            session, answer = await self.start_session(offer.description, offer.persona, self.client(request))
        except SessionRefused as refused:
            return refused.response()
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.session_id,
                                  "session_url": self.session_url("sessions", session.session_id),
                                  "resume_token": session.handovers.token,
                                  "resume_window_s": session.handovers.window_s})

    def client(self, request: web.Request) -> str:
        """Who is calling (signaling.guards.client_of): behind the front of media workers, the front says."""
        return client_of(request, self.config.trust_forwarded_for)

    def calls_per_client(self) -> int | None:
        """The most calls one client may hold at once (None: no limit)."""
        limit = self.config.max_calls_per_client
        if limit is None:
            return default_calls_per_client(self.engine.batch_size)
        return limit if limit > 0 else None

    async def start_session(
        self, offer: RTCSessionDescription, persona: Persona | None = None, client: str | None = None
    ) -> tuple[CallSession, RTCSessionDescription]:
        """Check the persona, take a slot (within `client`'s share), make the peer, answer. Raises
        SessionRefused, leaving no peer and no slot behind. A model that takes a persona gets the caller's,
        or its default one."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        refusal = await self.admission_refusal()
        if refusal is not None:
            raise refusal
        try:
            plan = None
            if persona is not None or self.engine.prompt_book is not None:
                plan = self.engine.plan_persona(persona)
            call = await self.engine.open_call(prompt=plan, client=client, client_limit=self.calls_per_client())
        except ClientAtLimit as exc:
            self.metrics.rejected("client_limit", client, str(exc))
            raise SessionRefused(429, f"{exc}: hang one up first", retry) from None
        except PersonaError as exc:
            self.metrics.rejected("persona", client, str(exc))
            raise SessionRefused(400, str(exc)) from None
        except EngineFull as exc:
            self.metrics.rejected("busy", client, str(exc))
            raise SessionRefused(503, f"the line is busy: {exc}; try again shortly", retry) from None
        except EngineNotReady as exc:
            self.metrics.rejected("not_ready", client, str(exc))
            raise SessionRefused(503, f"the model is not ready: {exc}", retry) from None
        session_id = self.config.session_id_prefix + secrets.token_urlsafe(12)
        session = CallSession(session_id, self.engine, call, self.config.ice,
                              media_timeout=self.config.media_timeout_s,
                              max_output_buffer_ms=self.config.max_output_buffer_ms,
                              max_standing_ms=self.config.max_standing_ms, on_end=self._forget,
                              observer=self.metrics, max_duration_s=self.config.max_call_s,
                              connect_timeout=self.config.connect_timeout_s, client=client,
                              resume_window_s=self.config.resume_window_s)
        try:
            answer = await asyncio.wait_for(session.answer(offer), self.config.answer_timeout_s)
        except RelayUnavailable as exc:
            log.warning("session %s: %s", session_id, exc)
            await session.hang_up(str(exc), kind="no_relay")
            self.ended.add(session_id, session.summary())
            self.metrics.rejected("no_relay")
            raise SessionRefused(502, str(exc), session_id=session_id) from None
        except Exception as exc:  # a bad offer must not leave a peer or a slot behind
            await session.hang_up("the offer could not be applied", kind="bad_offer")
            self.metrics.rejected("bad_offer", client, f"the offer could not be applied: {type(exc).__name__}: {exc}")
            raise SessionRefused(400, f"the offer could not be applied: {type(exc).__name__}: {exc}") from None
        self.sessions[session_id] = session
        session.started()
        log.info("session %s: answered, slot %d", session_id, call.slot)
        return session, answer

    def session_url(self, kind: str, session_id: str) -> str:
        """Where a call's later requests go (`/sessions/{id}`, `/whip/{id}`): relative, so a balancer routes them
        by the id's replica prefix, or absolute on this replica's `public_url`."""
        path = f"/{kind}/{session_id}"
        return self.config.public_url.rstrip("/") + path if self.config.public_url else path

    async def admission_refusal(self) -> SessionRefused | None:
        """Why a new call is refused before anything is made for it (draining, or relay-only with TURN
        down), or None: go ahead. The front asks it for its workers too."""
        if self.draining:
            self.metrics.rejected("draining")
            return SessionRefused(503, "this server is restarting and takes no new calls; try again",
                                  {"Retry-After": str(self.config.retry_after_s)})
        return await self.relay_refusal()

    def calls_in_progress(self) -> int:
        return len(self.sessions) if self.workers is None else self.workers.host.calls_held()

    async def drain(self, seconds: float, poll_s: float = 0.2) -> int:
        """Stop admitting (readiness fails, offers get 503 with Retry-After) and let the calls in progress go
        on for up to `seconds`; then end the rest with reason `server_restart`. Returns how many were ended."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        log.warning("draining: no new calls; %d call(s) in progress may go on for up to %g s",
                    self.calls_in_progress(), seconds)
        while self.calls_in_progress() and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        left = self.calls_in_progress()
        if left:
            log.warning("drain time is up: ending %d call(s) (server_restart)", left)
        await self.end_all_calls(SERVER_RESTART, kind=SERVER_RESTART)
        return left

    async def relay_refusal(self) -> SessionRefused | None:
        """Relay-only with TURN known to be down: refuse at once (and count it), instead of letting the
        server's peer wait out its gather for a relay that cannot come. Waits for the first check, if
        it is still under way (at most its timeout)."""
        if not self.config.ice.relay_only or self.turn is None:
            return None
        state = await self.turn.settled()
        if state is None or state.up:
            return None
        message = f"relay-only calls need TURN, and TURN is {state.outcome}: {state.detail}; try again shortly"
        log.warning("offer refused: %s", message)
        self.metrics.rejected("no_relay")
        return SessionRefused(503, message, {"Retry-After": str(round(self.config.turn_check_retry_s))})

    def turn_down(self) -> str | None:
        """Why relay-only calls cannot be placed now (TURN's last check failed), or None."""
        if not self.config.ice.relay_only or self.turn is None or self.turn.state is None or self.turn.state.up:
            return None
        state = self.turn.state
        return f"relay-only calls need TURN, and TURN is {state.outcome}: {state.detail}"

    def _forget(self, session: CallSession) -> None:
        """A call ended: out of the live calls, its summary kept a while (a refused offer was never in)."""
        if self.sessions.pop(session.session_id, None) is not None:
            self.ended.add(session.session_id, session.summary())

    def _session(self, request: web.Request) -> CallSession | None:
        return self.sessions.get(request.match_info["session_id"])

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return json_error(404, "no such session (it may have ended already)")
        await session.hang_up("hung up")
        return web.json_response({"session_id": session.session_id, "ended": True})

    async def get_session(self, request: web.Request) -> web.Response:
        """A live call's figures, or an ended one's last figures and why it ended, while it is kept."""
        session = self._session(request)
        if session is not None:
            return web.json_response(session.summary())
        ended = self.ended.get(request.match_info["session_id"])
        if ended is None:
            return json_error(404, "no such session (it ended long ago, or never was)")
        return web.json_response(ended)

    async def _hang_up_all(self, app: web.Application) -> None:
        await self.end_all_calls("server shutting down", kind="shutdown")

    async def end_all_calls(self, reason: str, kind: str) -> None:
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.hang_up(reason, kind=kind)

    # -- page and client setup -----------------------------------------------------------------

    async def ice_servers(self, request: web.Request) -> web.Response:
        """Servers for one client; TURN credentials, when issued, are fresh, short-lived and its own."""
        ice = self.config.ice
        servers = ice.servers_for(f"caller-{secrets.token_hex(6)}")
        return web.json_response(
            {"iceServers": [server.to_json() for server in servers],
             "iceTransportPolicy": "relay" if ice.relay_only else "all"},
            headers={"Cache-Control": "no-store"},
        )

    async def personas(self, request: web.Request) -> web.Response:
        if not self.engine.ready:
            return web.json_response({"ready": False}, status=503, headers={"Retry-After": "2"})
        book = self.engine.prompt_book
        if book is None:
            info = self.engine.info
            return web.json_response({"takes_persona": False, "model": info.name,
                                      "reason": f"{info.name} ({info.kind}) takes no text or voice prompt"})
        return web.json_response({"takes_persona": True, "model": self.engine.info.name, **book.describe()})

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.config.web_dir / "index.html")
