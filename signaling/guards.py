"""What stands between the internet and the model: a token, an origin allow-list, an offer rate limit.

(Who a client is, `client_of`, is shared with the per-client share of the call slots, which the engine
counts where it grants slots: see `SignalingService.start_session`.)

All three are aiohttp middlewares, wired in `signaling.app`:

- `token`: with one set, the call API (`/offer`, `/sessions/*`, `/whip*`,
  `/ice-servers`, `/personas`) needs `Authorization: Bearer <token>`, OPTIONS
  included; only CORS preflights pass (they carry no credentials, and no answer to one does). The page,
  health, readiness and metrics stay open (put /metrics behind your network).
- CORS: a browser on another origin may call the API only if its origin is in
  the allow-list; its preflight is answered and a state-changing request from
  any other cross origin gets 403. Same-origin requests (the page) always pass.
- Offers per client per minute: `POST /offer` and `POST /whip` from one
  address past the limit get 429 with `Retry-After`; so do ICE server requests
  (`GET /ice-servers`, which mints TURN credentials) past their own limit.
"""

from __future__ import annotations

import hmac
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from .errors import json_error
from .metrics import METRICS_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED_PREFIXES = ("/offer", "/sessions/", "/whip", "/ice-servers", "/personas")
OFFER_PATHS = ("/offer", "/whip")
ALLOWED_HEADERS = "Authorization, Content-Type, If-Match"
EXPOSED_HEADERS = "Location, Link, ETag, Retry-After"
ALLOWED_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"


def client_of(request: web.Request, trust_forwarded_for: bool) -> str:
    """Who sent the request: the peer's address, or behind a trusted proxy the address that proxy saw, the
    LAST entry of X-Forwarded-For (a client may put anything before it, its proxy appends what it saw)."""
    if trust_forwarded_for and "X-Forwarded-For" in request.headers:
        return request.headers["X-Forwarded-For"].split(",")[-1].strip()
    return request.remote or "unknown"


def _is_protected(path: str) -> bool:
    return any(path == p or path.startswith(p) for p in PROTECTED_PREFIXES)


def _is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Origin" in request.headers and (
        "Access-Control-Request-Method" in request.headers)


def token_middleware(token: str | None, client: Callable[[web.Request], str]):
    """`client`: who sent a request (`client_of` with the service's proxy trust), for the refusal's log."""

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or _is_preflight(request) or not _is_protected(request.path):
            return await handler(request)  # a CORS preflight carries no credentials by design
        given = request.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
            return await handler(request)
        if request.path in OFFER_PATHS:
            request.app[METRICS_KEY].rejected("unauthorized", client(request), f"{request.method} {request.path}")
        return json_error(401, "a bearer token is required: Authorization: Bearer <token>",
                          {"WWW-Authenticate": 'Bearer realm="moshi-webrtc"'})

    return check_token


def cors_middleware(allowed_origins: tuple[str, ...], client: Callable[[web.Request], str]):
    allowed = {origin.rstrip("/") for origin in allowed_origins}

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or urlsplit(origin).netloc == request.host:
            return await handler(request)  # not a browser's cross-origin request
        if origin not in allowed:
            if request.method in ("GET", "HEAD"):
                return await handler(request)  # no CORS headers: the browser keeps the answer from the page
            if request.path in OFFER_PATHS:
                request.app[METRICS_KEY].rejected("origin", client(request), f"from a page on {origin}")
            return json_error(403, f"origin {origin} is not allowed to use this server (see --cors-origin)")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
        return response

    return cors


class OfferRateLimit:
    """At most `per_minute` requests of one kind from one client address in any 60 s: offers (POST /offer,
    POST /whip) by default, or what `paths` and `method` name (GET /ice-servers, which mints TURN
    credentials)."""

    def __init__(self, per_minute: int, trust_forwarded_for: bool = False, clock: Callable[[], float] = time.monotonic,
                 paths: tuple[str, ...] = OFFER_PATHS, method: str = "POST", what: str = "offers",
                 reason: str = "rate_limited"):
        """`reason`: what a refusal is counted as in moshi_calls_rejected_total."""
        self.paths, self.method, self.what, self.reason = paths, method, what, reason
        self.per_minute = per_minute
        self.trust_forwarded_for = trust_forwarded_for
        self.clock = clock
        self._seen: defaultdict[str, deque[float]] = defaultdict(deque)

    def client(self, request: web.Request) -> str:
        return client_of(request, self.trust_forwarded_for)

    def retry_after(self, client: str) -> int | None:
        """None if this offer may go ahead (and counts it), else the seconds to wait."""
        now = self.clock()
        seen = self._seen[client]
        while seen and now - seen[0] >= 60:
            seen.popleft()
        if len(seen) >= self.per_minute:
            return max(1, int(60 - (now - seen[0])) + 1)
        seen.append(now)
        if len(self._seen) > 10_000:  # forget clients that went quiet, so the table stays small
            for key in [k for k, v in self._seen.items() if not v or now - v[-1] >= 60]:
                del self._seen[key]
        return None

    def middleware(self):
        @web.middleware
        async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method != self.method or request.path not in self.paths or self.per_minute <= 0:
                return await handler(request)
            wait = self.retry_after(self.client(request))
            if wait is None:
                return await handler(request)
            request.app[METRICS_KEY].rejected(self.reason, self.client(request),
                                              f"more than {self.per_minute} {self.what} a minute")
            return json_error(429, f"too many {self.what} from {self.client(request)}: at most {self.per_minute} "
                                   "a minute", {"Retry-After": str(wait)})

        return limit
