"""One call: an aiortc RTCPeerConnection wired to one engine slot.

    caller's Opus RTP --> AudioReceiver (adaptive jitter buffer, libopus FEC/concealment, 1920-sample
        frames at 24 kHz) --> engine Call.submit ... results in order --> OutboundAudioTrack (20 ms, paced)
        --> caller;  text pieces --> "events" data channel --> caller

aiortc's own audio jitter buffer and decoder are bypassed (server.media.aiortc_compat):
each RTP packet goes to our receive path (server.media.audio_receive), which submits
whole frames to the engine; a task plays the results in order. The inbound
track only tells when the caller's audio ends. When the model falls behind, the
engine drops the oldest waiting frames and the outbound track the oldest
unsent audio, so the delay stays bounded; drops are counted and reported on
`events` as `{"type": "drops", ...}`, at most once a second. A call ends, once, when the caller hangs up, the
connection fails or closes, the track ends or stays silent past the media
timeout, the engine fails the call, or the server hangs up (DELETE). Ending
frees the engine slot, stops the tracks and closes the peer connection.

Messages on `events` (JSON): `ready` (model, test_model, notice, prompting,
persona), `prompt` (state "done", seconds: the persona prompt has been
replayed and the model listens), `text` (text), `drops` (input_frames,
output_ms), `error` (reason), `bye` (reason).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import RTCDataChannel, RTCIceCandidate, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from ..engine import Call, CallStats, Engine, FrameDropped
from . import aiortc_compat, events, ice_compat, sctp_compat
from .audio_out import OutboundAudioTrack, SenderTrack
from .audio_receive import AudioReceiver
from .call_moves import CallMoves
from .handover import Handovers
from .ice import IceConfig
from .ice_restart import ReOffer
from .media_watch import MediaWatch
from .peer_close import close_peer

log = logging.getLogger(__name__)

EVENTS_LABEL = "events"


@dataclass
class PeerStats:
    """What only the peer knows; frame counts and levels are the engine call's (`CallStats`)."""

    call: CallStats
    connected_at: float | None = None
    answered_at: float | None = None
    first_model_audio_at: float | None = None  # the first frame of the model's own audio, after any prompt

    @property
    def mean_input_rms(self) -> float:
        return self.call.mean_input_rms


class RelayUnavailable(RuntimeError):
    """Media must go through TURN, and TURN gave this peer no relay address."""


class CallObserver(Protocol):
    """Who counts calls (signaling.metrics.ServiceMetrics)."""

    def call_started(self) -> None: ...
    def call_connected(self, path: str) -> None: ...
    def call_frame(self, input_rms: float, output_rms: float, mouth_to_ear_s: float,
                   receive_delay_s: float = 0.0) -> None: ...
    def call_ended(self, kind: str, output_dropped_s: float, receive: dict | None = None) -> None: ...
    def call_moved(self, kind: str, gap_s: float) -> None: ...


# The model answers a frame one frame later than it hears it (its structural delay).
MODEL_FRAME_S = 0.08
OPUS_ONLY = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
LOSS_REPORT_EVERY_S = 1.0


class CallSession(MediaWatch, CallMoves):
    """A caller's peer connection and engine slot, from offer to hang-up."""

    def __init__(
        self,
        session_id: str,
        engine: Engine,
        call: Call,
        ice: IceConfig,
        media_timeout: float = 10.0,
        max_output_buffer_ms: int = 400,
        max_standing_ms: int = 60,
        on_end: Callable[[CallSession], None] | None = None,
        observer: CallObserver | None = None,
        max_duration_s: float | None = None,
        connect_timeout: float | None = None,
        client: str | None = None,
        resume_window_s: float = 0.0,
    ):
        """`media_timeout`: end the call when the caller sends no audio that long (a vanished caller is
        noticed then, long before ICE consent expires). `max_duration_s`: end it after that long.
        `connect_timeout`: end it when its connection is not up that long after the answer, so an offer
        nobody follows up (or a stranger's, sent to hold a slot) gives its slot back in seconds.
        `client`: who placed the call (an address), for the logs. `resume_window_s`: how long a caller who
        went away may take to come back (server.media.handover); 0: its call ends at once."""
        self.session_id = session_id
        self.client = client
        self.engine = engine
        self.call = call
        self.media_timeout = media_timeout
        self.relay_only = ice.relay_only
        self.ice = ice
        aiortc_compat.allow_rsa_dtls_peers()  # before the peer connection makes its DTLS contexts
        self.outbound = OutboundAudioTrack(sample_rate=engine.sample_rate, max_buffer_ms=max_output_buffer_ms,
                                           max_standing_ms=max_standing_ms, align_to_pushes=True)
        self.receiver = AudioReceiver(self._on_inbound_frame, sample_rate=engine.sample_rate,
                                      frame_size=engine.frame_size)
        self.encoder = aiortc_compat.OpusSenderEncoder()  # in-band FEC as the caller's reports ask for
        self.events: RTCDataChannel | None = None  # the caller's `events` channel, once open
        self.stats = PeerStats(call.stats)
        self.started_at = time.monotonic()
        self.end_reason: str | None = None
        self.end_kind: str | None = None
        self.ended = asyncio.Event()
        self._on_end = on_end
        self._tasks: set[asyncio.Task] = set()  # every task this call starts; hang-up cancels them all
        self._reader: asyncio.Task | None = None
        self._results: asyncio.Queue[asyncio.Future] = asyncio.Queue()
        self._drops_reported = (0, 0)
        self._drops_reported_at = 0.0
        self._ending = False
        self.observer = observer
        self.max_duration_s = max_duration_s
        self.connect_timeout = connect_timeout
        self._connect_timer: asyncio.TimerHandle | None = None
        self.path: str | None = None  # "relay" or "direct" once media flows
        self.mouth_to_ear_estimate_s: float | None = None
        self._counted = False
        self._duration_timer: asyncio.TimerHandle | None = None
        self._no_track_timer: asyncio.TimerHandle | None = None
        self._failures: aiortc_compat.TransportFailures | None = None
        self.trickled_candidates = 0  # counted here, bounded by signaling (WHIP PATCH)
        self.trickle_requests = 0  # WHIP PATCH requests taken, counted and bounded by signaling
        self.ice_restart_requests = 0  # re-offers taken (each gives the answer a new WHIP ETag)
        self.data_guard: sctp_compat.DataChannelGuard | None = None  # once the offer is applied
        self.follower: ice_compat.PathFollower | None = None  # once the answer is made
        self.handovers = Handovers(resume_window_s, self._resume_expired, self._on_move)
        self._return_kind = "returned"  # how an away caller's packets will have come back
        self._playing = False
        self._restart: ReOffer | None = None  # the caller's latest ICE restart, once there is one
        self._local_ice: ice_compat.IceCredentials | None = None  # the server's, after that restart
        if call.prompt is not None:
            self._spawn(self._announce_prompt())
        self.pc = self._new_peer()

    def _new_peer(self) -> RTCPeerConnection:
        """A peer connection whose events reach this call while it is the call's own (a resume replaces it)."""
        pc = RTCPeerConnection(self.ice.server_rtc_configuration(self.session_id))  # no STUN/TURN wait unless relay
        pc.on("track", lambda track: self._on_track(pc, track))
        pc.on("datachannel", lambda channel: self._on_datachannel(pc, channel))
        pc.on("connectionstatechange", lambda: self._on_connection_state(pc))
        return pc

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Start a task owned by this call: kept referenced while it runs, cancelled on hang-up."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- setup --------------------------------------------------------------------------------

    def started(self) -> None:
        """The call was answered: count it, and start the clock on its maximum length."""
        self._counted = True
        if self.observer is not None:
            self.observer.call_started()
        if self.max_duration_s is not None:
            self._duration_timer = asyncio.get_running_loop().call_later(
                self.max_duration_s,
                lambda: self._spawn(self.hang_up(
                    f"the call reached its maximum length of {self.max_duration_s:g} s", kind="max_duration")),
            )

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Apply the caller's offer; the answer returned already holds our ICE candidates."""
        answer = await self._apply_offer(offer)
        if self.connect_timeout is not None:
            self._connect_timer = asyncio.get_running_loop().call_later(self.connect_timeout, self._not_connected)
        return answer

    async def _apply_offer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Wire `self.pc` to this call: the caller's audio to the receive path, ours to it, `events`."""
        # The transceiver exists before the offer is applied, so that codecs are negotiated with our
        # preference: Opus only, whatever else is offered (both media paths here speak Opus).
        audio = self.pc.addTransceiver("audio", direction="sendrecv")
        audio.setCodecPreferences(OPUS_ONLY)
        await self.pc.setRemoteDescription(offer)
        # What the caller sends on data channels is bounded (size, rate); past that, this call ends.
        self.data_guard = sctp_compat.guard_data_channels(
            self.pc, lambda reason: self.fail(reason, kind="data_channel_abuse"))
        for other in self.pc.getTransceivers():
            if other is not audio:  # offered video is declined: nobody would read it (an unread track grows)
                other.direction = "inactive"
        self._failures = aiortc_compat.watch_transport_failures(self.pc)  # before ICE starts
        aiortc_compat.tap_audio_receiver(audio.receiver, self._on_packet)  # aiortc's decoder sees nothing
        aiortc_compat.count_unroutable_rtp(audio.receiver, self.receiver.on_unroutable_packet)
        audio.sender.replaceTrack(SenderTrack(self.outbound))  # this connection's: a resume keeps the call's
        aiortc_compat.use_opus_encoder(audio.sender, self.encoder)
        # The DTLS server role where the caller leaves it to us: then any certificate the caller has works.
        await aiortc_compat.answer_as_dtls_server(self.pc)
        self.stats.answered_at = self.stats.answered_at or time.monotonic()
        if self._reader is None and self._no_track_timer is None:  # no audio track came with the offer
            self._no_track_timer = asyncio.get_running_loop().call_later(self.media_timeout, self._no_track)
        if self.follower is not None:
            self.follower.close()
        self.follower = ice_compat.follow_caller(self.pc, self._on_path_switch)
        if self.relay_only and " typ relay" not in self.pc.localDescription.sdp:
            raise RelayUnavailable(
                "the server got no TURN relay candidate: the TURN server is unreachable or refused "
                "the server's credentials (check --turn-url and --turn-secret)"
            )
        return RTCSessionDescription(sdp=self.local_sdp, type="answer")

    def _not_connected(self) -> None:
        if self.stats.connected_at is None and not self._ending:
            self.fail(*self._never_connected_cause(self.connect_timeout, "after the answer"))

    def _no_track(self) -> None:
        if self._reader is None and not self._ending:
            self.fail(f"no audio track from the caller within {self.media_timeout:g} s", kind="no_media")

    def _on_track(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        if pc is not self.pc or track.kind != "audio" or self._reader is not None:
            return
        self._reader = self._spawn(self._watch_audio(pc, track))
        if not self._playing:
            self._playing = True
            self._spawn(self._play_results())
            self._spawn(self._follow_reported_loss())

    def _on_datachannel(self, pc: RTCPeerConnection, channel: RTCDataChannel) -> None:
        if pc is not self.pc or channel.label != EVENTS_LABEL:
            return
        self.events = channel
        info = self.engine.info
        prompt = self.call.prompt
        self.send_event(events.Ready(model=info.name, test_model=info.is_test_model, notice=info.notice,
                                     session_id=self.session_id, prompting=self.call.prompting,
                                     persona=prompt.description if prompt is not None else None))

    async def _announce_prompt(self) -> None:
        """Tell the caller when the model has heard its persona prompt and starts listening."""
        try:
            seconds = await self.call.prompt_done
        except Exception:  # noqa: BLE001 - the failure reaches the caller through the frames' results
            return
        self.send_event(events.PromptDone(seconds=round(seconds, 3)))

    async def _on_connection_state(self, pc: RTCPeerConnection) -> None:
        if pc is not self.pc:
            return  # a connection a resume replaced
        state = pc.connectionState
        log.info("session %s: connection %s", self.session_id, state)
        if state == "connected" and self.stats.connected_at is None:
            self.stats.connected_at = time.monotonic()
            self.path = self._media_path()
            if self.observer is not None:
                self.observer.call_connected(self.path)
        elif state == "failed" and not self._ending:
            self._lost(*(self._recorded_failure() or ("connection failed", "connection_failed")))
        elif state == "closed" and not self._ending:
            # A state handler runs after the state it was told of: when consent expiry closes ICE, aiortc
            # closes the whole connection at once, and this handler may see "closed" for "failed".
            failure = self._recorded_failure()
            if failure is not None:
                self._lost(*failure)
            else:
                await self.hang_up("the caller closed the connection", kind="connection_closed")

    def _recorded_failure(self) -> tuple[str, str] | None:
        """Why a transport failed, and the metrics kind, if one did: ICE first (DTLS cannot start without it)."""
        failures = self._failures
        if failures is not None and failures.ice is not None:
            return failures.ice, "ice_failed"
        if failures is not None and failures.dtls is not None:
            return failures.dtls, "dtls_failed"
        return None

    def _media_path(self) -> str:
        """`relay` when the nominated ICE pair goes through TURN on either side, else `direct`."""
        kinds = ice_compat.nominated_candidate_types(self.pc)
        if kinds is None:
            return "unknown"
        return "relay" if "relay" in kinds else "direct"

    async def _follow_reported_loss(self) -> None:
        """Set our encoder's expected loss from the caller's RTCP receiver reports, once a second."""
        try:
            while not self._ending:
                await asyncio.sleep(LOSS_REPORT_EVERY_S)
                for sender in self.pc.getSenders():
                    for report in (await sender.getStats()).values():
                        if report.type == "remote-inbound-rtp" and report.fractionLost is not None:
                            self.encoder.set_expected_loss(100 * report.fractionLost / 256)  # RTCP's 8-bit fraction
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - statistics are best effort; the call goes on
            log.warning("session %s: cannot follow the caller's loss reports: %s", self.session_id, exc)

    def _on_inbound_frame(self, samples) -> None:
        """A whole frame of the caller's audio from the receive path: to the engine, results in order."""
        if self._ending:
            return
        try:
            self._results.put_nowait(self.call.submit(samples))  # the call logs and counts its input level
        except Exception as exc:  # the engine refused this call's frames
            reason = f"engine error: {exc}"
            log.error("session %s: %s", self.session_id, reason)
            self.send_event(events.Error(reason))
            self._spawn(self.hang_up(reason, kind="engine_error"))

    async def _play_results(self) -> None:
        """Take the engine's results in order: audio to the outbound track, text to `events`."""
        try:
            while not self._ending:
                future = await self._results.get()
                try:
                    result = await future
                except FrameDropped:
                    self._report_drops()
                    continue
                self.outbound.push(result.audio)
                self._observe(result)
                if not result.silent and self.stats.first_model_audio_at is None:
                    self.stats.first_model_audio_at = time.monotonic()
                if result.text is not None:
                    self.send_event(events.Text(result.text))
                self._report_drops()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # the engine failed this call (an out-of-range token, say)
            self._discard_results()  # the frames queued behind it failed too: nobody will play them
            reason = f"engine error: {exc}"
            log.error("session %s: %s", self.session_id, reason)
            self.send_event(events.Error(reason))
            if not self._ending:
                self._spawn(self.hang_up(reason, kind="engine_error"))

    def _discard_results(self) -> None:
        """Consume or cancel every result still queued. After an engine failure the frames behind the
        failed one fail too, and asyncio logs a failed future that nobody awaited as "Future exception was
        never retrieved" (an ERROR line per frame, long after the call, when it is collected)."""
        while not self._results.empty():
            future = self._results.get_nowait()
            if not future.done():
                future.cancel()  # the engine skips a frame whose future is done
            elif not future.cancelled():
                future.exception()  # retrieved: the failure was reported once, for the call

    def _observe(self, result) -> None:
        """The server's share of the mouth-to-ear delay for this frame (see signaling.metrics)."""
        queued_s = self.outbound.buffered_samples / self.outbound.sample_rate
        framing_s = self.engine.frame_size / self.engine.sample_rate / 2  # a sample waits half a frame on average
        rtt_s = self._rtt_s or 0.0
        receive_s = self.receiver.target_delay_s  # how long a packet waits in the jitter buffer
        self.mouth_to_ear_estimate_s = (receive_s + framing_s + result.latency_ms / 1000 + queued_s + MODEL_FRAME_S
                                        + rtt_s)
        if self.observer is not None:
            self.observer.call_frame(result.input_rms, result.output_rms, self.mouth_to_ear_estimate_s, receive_s)

    @property
    def _rtt_s(self) -> float | None:
        """The round trip time from the caller's RTCP receiver reports, when there are some."""
        senders = self.pc.getSenders()
        return aiortc_compat.sender_rtt_s(senders[0]) if senders else None

    def _report_drops(self) -> None:
        """Tell the caller when audio was dropped to keep the delay bounded; at most once a second."""
        drops = (self.call.stats.frames_dropped, self.outbound.samples_dropped)
        now = time.monotonic()
        if drops == self._drops_reported or now - self._drops_reported_at < 1.0:
            return
        self._drops_reported, self._drops_reported_at = drops, now
        output_ms = round(1000 * drops[1] / self.outbound.sample_rate)
        log.warning("session %s: model behind: %d input frames and %d ms of output dropped so far",
                    self.session_id, drops[0], output_ms)
        self.send_event(events.Drops(input_frames=drops[0], output_ms=output_ms))

    def send_event(self, event: events.Event) -> None:
        """Send on the `events` channel if it is open (a caller may not have opened one) and its transport
        still carries it: a channel whose caller's DTLS closed first can still read "open", and aiortc
        would then fail the send in a task of its own (logged as "Task exception was never retrieved")."""
        channel = self.events
        if channel is None or channel.readyState != "open":
            return
        sctp = channel.transport
        if sctp.state != "connected" or sctp.transport.state != "connected":
            return
        channel.send(event.to_json())

    def fail(self, reason: str, kind: str) -> None:
        """End the call for a failure the caller should hear about: logged as a warning with the session,
        sent as an `error` event when the channel still carries it, then hung up with `reason` (which
        GET /sessions/{id} keeps showing for a while) and counted under `kind`."""
        if self._ending:
            return
        log.warning("session %s (client %s): %s", self.session_id, self.client or "unknown", reason)
        self.send_event(events.Error(reason))
        self._spawn(self.hang_up(reason, kind=kind))

    # -- ending -------------------------------------------------------------------------------

    async def hang_up(self, reason: str, kind: str = "hung_up") -> None:
        """End the call once: say bye, free the slot, stop the tracks, close the peer connection.
        `kind`: the reason's category, for metrics (hung_up, caller_gone, no_media, max_duration, ...)."""
        if self._ending:
            await self.ended.wait()
            return
        self._ending = True
        self.handovers.close()
        if self.follower is not None:
            self.follower.close()
        self.receiver.close()  # the receive clock stops now: nothing is decoded for a call that is ending
        self.end_reason = reason
        self.end_kind = kind
        try:
            if self._duration_timer is not None:
                self._duration_timer.cancel()
            for timer in (self._no_track_timer, self._connect_timer):
                if timer is not None:
                    timer.cancel()
            log.info("session %s: ending (%s)", self.session_id, reason)
            self.send_event(events.Bye(reason))
            tasks = {task for task in self._tasks if task is not asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)  # they also stop by themselves on the next frame
            self._discard_results()
            await self.call.close()
        finally:  # whatever failed above, the peer's sockets close and nobody waits forever
            self.outbound.stop()
            await close_peer(self.pc)
            self.ended.set()
            if self._counted and self.observer is not None:
                self.observer.call_ended(kind, self.outbound.samples_dropped / self.outbound.sample_rate,
                                         self.receiver.stats.as_dict())
            if self._on_end is not None:
                self._on_end(self)

    # -- what signaling may ask ---------------------------------------------------------------

    @property
    def remote_sdp(self) -> str:
        """The caller's offer as applied (WHIP checks trickled ICE credentials against it)."""
        description = self.pc.remoteDescription
        return description.sdp if description is not None else ""

    async def add_remote_candidate(self, candidate: RTCIceCandidate) -> None:
        """A candidate the caller trickled after its offer (WHIP PATCH; signaling bounds how many)."""
        self.trickled_candidates += 1
        if self._restart is not None and self.follower is not None:  # aiortc's transport has ended its candidates
            ice_compat.add_remote_candidate(self.follower, candidate)
        else:
            await self.pc.addIceCandidate(candidate)

    @property
    def output_dropped_s(self) -> float:
        """The model's audio dropped so far to keep the outbound delay bounded."""
        return self.outbound.samples_dropped / self.outbound.sample_rate

    def receive_figures(self) -> dict:
        """The receive path's counters (packets lost, late, recovered by FEC, concealed ms, ...)."""
        return self.receiver.stats.as_dict()

    def summary(self) -> dict:
        call = self.call.stats
        return {
            "session_id": self.session_id,
            "connection": self.pc.connectionState,
            "ended": self.ended.is_set(),
            "end_reason": self.end_reason,
            "end_kind": self.end_kind,
            "slot": self.call.slot,
            "frames_in": call.frames_in,
            "frames_out": call.frames_out,
            "frames_silent": call.frames_silent,
            "text_pieces": call.text_pieces,
            "token_errors": call.token_errors,
            "mean_input_rms": round(self.stats.mean_input_rms, 6),
            "mean_step_ms": round(call.mean_step_ms, 3),
            "outbound_frames_sent": self.outbound.frames_sent,
            "frames_dropped": call.frames_dropped,
            "outbound_samples_dropped": self.outbound.samples_dropped,
            "path": self.path,
            **self.handovers.summary(),
            "receive": self.receiver.stats.as_dict(),
            "send": {"expected_loss_percent": self.encoder.expected_loss_percent},
            "mouth_to_ear_estimate_ms": (
                round(1000 * self.mouth_to_ear_estimate_s) if self.mouth_to_ear_estimate_s is not None else None
            ),
            "persona": self.call.prompt.description if self.call.prompt is not None else None,
            "prompting": self.call.prompting,
            "frames_during_prompt": call.frames_during_prompt,
            "answer_to_first_model_audio_s": (
                round(self.stats.first_model_audio_at - self.stats.answered_at, 3)
                if self.stats.first_model_audio_at and self.stats.answered_at else None
            ),
        }
