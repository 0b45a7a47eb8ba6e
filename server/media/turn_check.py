"""Is the TURN server usable? A real TURN Allocate, at start-up and then periodically.

Why: with TURN down or refusing the server's credentials, a relay-only call can
never connect, and aiortc only finds out after waiting for its gather (5 s).
The monitor finds out once, off the call path, so `/readyz` and `/metrics`
say so and a relay-only offer is refused at once with a 503 that says why.

The check does what the server's own peer would do: it takes the first TURN
URL aiortc would use (`IceConfig.turn_target`), with credentials issued the
same way, allocates a relay through aioice's TURN client, and deletes it.
Outcomes: `ok`, `unreachable` (no answer in time, or the address does not
resolve or connect), `unauthorized` (401/403: the shared secret or static
password is wrong), `refused` (any other TURN error, e.g. 486 quota), `error` (the check itself failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aioice import stun
from aioice.turn import create_turn_endpoint

from .ice import IceConfig, TurnTarget

log = logging.getLogger(__name__)

CHECK_NAME = "moshi-webrtc-check"
OUTCOMES = ("ok", "unreachable", "unauthorized", "refused", "error")


@dataclass(frozen=True)
class TurnState:
    """The last check's outcome; `detail` is for people (logs, /readyz)."""

    url: str
    outcome: str
    detail: str
    checked_at: float  # time.time()
    seconds: float  # how long the Allocate took (or waited)

    @property
    def up(self) -> bool:
        return self.outcome == "ok"


class _Relay(asyncio.DatagramProtocol):
    """Receives nothing; tells when the allocation has been deleted and its socket closed."""

    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def check_turn(ice: IceConfig, timeout_s: float = 3.0, attempts: int = 2) -> TurnState | None:
    """Allocate and delete one relay on the TURN server the server's peer would use; None: no TURN set.
    A TURN error answer is retried once from a fresh socket (coturn answers a rare 438 Wrong nonce to a
    first attempt); no answer at all is not, it has already waited `timeout_s`."""
    target = ice.turn_target(CHECK_NAME)
    if target is None:
        return None
    started = time.monotonic()
    for attempt in range(attempts):
        outcome, detail = await _allocate_once(target, timeout_s)
        if outcome in ("ok", "unreachable") or attempt == attempts - 1:
            break
        log.info("TURN check attempt %d: %s: %s; trying again", attempt + 1, outcome, detail)
    return TurnState(url=target.url, outcome=outcome, detail=detail, checked_at=time.time(),
                     seconds=time.monotonic() - started)


async def _allocate_once(target: TurnTarget, timeout_s: float) -> tuple[str, str]:
    try:
        transport, relay = await asyncio.wait_for(
            create_turn_endpoint(_Relay, target.address, target.username, target.password, lifetime=60,
                                 ssl=target.ssl, transport=target.transport),
            timeout_s)
    except TimeoutError:
        return "unreachable", f"no answer from {target.url} within {timeout_s:g} s"
    except stun.TransactionFailed as exc:
        code, text = exc.response.attributes.get("ERROR-CODE", (0, "no error code"))
        text = text.rstrip("\x00")
        if code in (401, 403):
            return "unauthorized", f"{target.url} answered {code} {text} (check --turn-secret against coturn's " \
                                   "static-auth-secret, or the static TURN password)"
        return "refused", f"{target.url} answered {code} {text}"
    except stun.TransactionTimeout:
        return "unreachable", f"no answer from {target.url}"
    except OSError as exc:  # DNS failure, TCP connection refused, no route
        return "unreachable", f"{target.url}: {type(exc).__name__}: {exc}"
    detail = "relay at {}:{}".format(*transport.get_extra_info("sockname"))
    transport.close()  # deletes the allocation (a REFRESH with lifetime 0), then closes the socket
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(relay.closed, timeout_s)
    return "ok", detail


class TurnMonitor:
    """Checks TURN at start and every `interval_s` (every `retry_s` while it is down); one owner: the front."""

    def __init__(self, ice: IceConfig, interval_s: float = 30.0, retry_s: float = 5.0, timeout_s: float = 3.0):
        self.ice = ice
        self.interval_s, self.retry_s, self.timeout_s = interval_s, retry_s, timeout_s
        self.state: TurnState | None = None
        self.checks: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._first = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.ice.turn_target(CHECK_NAME) is not None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def settled(self) -> TurnState | None:
        """The latest state, waiting for the first check if it is still under way (at most its timeout)."""
        if self._task is not None and not self._first.is_set():
            await self._first.wait()
        return self.state

    async def check_now(self) -> TurnState | None:
        """One check, recorded (the periodic loop calls this too)."""
        state = await check_turn(self.ice, self.timeout_s)
        if state is None:
            return None
        previous = self.state
        self.state = state
        self.checks[state.outcome] += 1
        self._first.set()
        if not state.up:
            log.error("TURN check failed: %s: %s", state.outcome, state.detail)
        elif previous is None or not previous.up:
            log.info("TURN check ok: %s, %s, %.0f ms", state.url, state.detail, 1000 * state.seconds)
        return state

    async def _run(self) -> None:
        while True:
            try:
                state = await self.check_now()
            except Exception as exc:  # noqa: BLE001 - a bug in a check must not stop the next ones
                log.exception("TURN check crashed")
                state = TurnState(url="", outcome="error", detail=f"the check crashed: {exc}",
                                  checked_at=time.time(), seconds=0.0)
                self.state = state
                self.checks["error"] += 1
                self._first.set()
            await asyncio.sleep(self.interval_s if state is not None and state.up else self.retry_s)

    def describe(self) -> dict | None:
        """For /readyz and /status: None without TURN, else the last outcome."""
        if not self.enabled:
            return None
        state = self.state
        if state is None:
            return {"up": None, "outcome": "checking", "url": self.ice.turn_target(CHECK_NAME).url}
        return {"up": state.up, "outcome": state.outcome, "detail": state.detail, "url": state.url,
                "checked_at": round(state.checked_at, 3)}
