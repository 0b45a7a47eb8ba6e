"""A real Firefox (Debian's firefox-esr), headless, driven over Marionette with the `marionette-driver` package.

We start Firefox ourselves (`--marionette --headless --no-remote --profile DIR`) with a throwaway profile
whose user.js holds the prefs below, and talk to it on a free port named by the `marionette.port` pref.
marionette-driver's client blocks on its socket, so every call here runs in a thread: the server under
test shares the test's event loop and must keep running while Firefox is asked something.

Scripts run in the page's own realm (`sandbox=None`), so they see the page's globals (`window.moshiCall`).

Firefox gets a sound device of its own: a private PulseAudio daemon whose only sink is a null sink (see
SoundServer). Without one, cubeb has no backend, WebAudio has no clock and `AudioContext.resume()` never
settles. Firefox's own mock (`media.cubeb.force_mock_context`) is no answer: it exists only in builds with
the mock cubeb compiled in (Debian's 153 ESR has it, its 140 ESR knows neither the code nor the pref).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# MOSHI_WEBRTC_FIREFOX names another Firefox binary (e.g. another ESR unpacked beside the installed one).
FIREFOX_OVERRIDE = os.environ.get("MOSHI_WEBRTC_FIREFOX")
FIREFOX = FIREFOX_OVERRIDE or shutil.which("firefox-esr")
PULSEAUDIO = shutil.which("pulseaudio")
try:
    from marionette_driver.marionette import Marionette
except ImportError:  # the `test` extra installs it
    Marionette = None

MISSING = (
    f"MOSHI_WEBRTC_FIREFOX={FIREFOX_OVERRIDE} is not an executable file"
    if FIREFOX_OVERRIDE and not os.access(FIREFOX_OVERRIDE, os.X_OK)
    else "Debian's firefox-esr is not installed (./run test installs it)" if FIREFOX is None
    else "Debian's pulseaudio is not installed, Firefox has no sound device (./run test installs it)"
    if PULSEAUDIO is None
    else "the marionette-driver package is not installed (pip install -e '.[test]')" if Marionette is None
    else None
)

AUDIO_CHECK_S = 10.0  # how long a fresh AudioContext may take to start running (it takes well under 1 s)

PREFS = {
    # Fake media: a generated microphone (a steady tone), no permission prompt.
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,  # allow audio to play without a user gesture
    "media.autoplay.block-webaudio": False,
    # ICE on loopback, as in every test here: Firefox leaves loopback candidates out by default (without
    # this, no call connects in a loopback-only network namespace). Host addresses as they are, not mDNS
    # names (Firefox shows them anyway to a page holding a microphone permission: see allow_microphone).
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    # Nothing but the page: no first-run pages, updates, telemetry or background connections.
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.page": 0,
    "browser.startup.homepage": "about:blank",
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "startup.homepage_welcome_url": "about:blank",
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.server": "",
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.blocklist.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "services.settings.server": "",
    "browser.newtabpage.enabled": False,
    "browser.region.network.url": "",
    "remote.prefs.recommended": True,
}


# A fresh AudioContext in the page: resumed, then watched until it runs and its clock moves. Returns what it
# saw ({state, currentTime, sampleRate}); `running` is true only if both happened within arguments[0] s.
AUDIO_CLOCK_CHECK = """
const deadline = performance.now() + arguments[0] * 1000;
const context = new AudioContext();
context.resume();
let running = false;
while (!running && performance.now() < deadline) {
  await new Promise((r) => setTimeout(r, 50));
  running = context.state === 'running' && context.currentTime > 0;
}
const seen = {running, state: context.state, currentTime: context.currentTime, sampleRate: context.sampleRate};
await Promise.race([context.close(), new Promise((r) => setTimeout(r, 1000))]);  // a stuck one never closes
return seen;
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SoundServer:
    """A private PulseAudio daemon with one null sink, for one Firefox: a sound device that consumes audio
    in real time, so cubeb opens a stream and WebAudio has a clock. It loads no other module (no hardware,
    no TCP), keeps its socket and state in a temporary directory and logs to `log_path`."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "native"

    @property
    def env(self) -> dict[str, str]:
        """What a client (Firefox) needs to find this server and no other."""
        return {"PULSE_SERVER": f"unix:{self.socket_path}"}

    def start(self, timeout_s: float = 10.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="moshi-pulse-"))  # short: a unix socket path has 108 bytes
        home = {"HOME": str(self.dir), "XDG_RUNTIME_DIR": str(self.dir), "PULSE_RUNTIME_PATH": str(self.dir / "run"),
                "PULSE_STATE_PATH": str(self.dir / "state")}  # nothing read from or written to the real home
        self.process = subprocess.Popen(
            [PULSEAUDIO, "--daemonize=no", "-n", "--exit-idle-time=-1", "--use-pid-file=no", "--realtime=no",
             "--high-priority=no", f"--log-target=file:{self.log_path}",
             "-L", f"module-native-protocol-unix socket={self.socket_path} auth-anonymous=1",
             "-L", "module-null-sink sink_name=firefox"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **home},
        )
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PulseAudio (for Firefox's sound device) did not start: see {self.log_path}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class Firefox:
    """One headless Firefox process and its Marionette session. Use `async with Firefox(tmp_path) as ff`."""

    def __init__(self, workdir: Path, prefs: dict | None = None):
        self.profile = workdir / "firefox-profile"
        self.profile.mkdir(parents=True, exist_ok=True)
        self.port = free_tcp_port()
        prefs = {**PREFS, **(prefs or {}), "marionette.port": self.port}
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())
        )
        self.log_path = workdir / "firefox.log"
        self.sound = SoundServer(workdir / "pulseaudio.log")
        self.process: subprocess.Popen | None = None
        self.client = None

    async def __aenter__(self) -> Firefox:
        try:
            await self.start()
        except BaseException:
            await self.close()  # a failed start leaves no Firefox or PulseAudio behind
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        await asyncio.to_thread(self.sound.start)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [FIREFOX, "--marionette", "--remote-allow-system-access", "--headless", "--no-remote", "--profile",
                 str(self.profile)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.sound.env, "MOZ_HEADLESS": "1"},
            )
        self.client = Marionette(host="127.0.0.1", port=self.port, startup_timeout=60)
        await asyncio.to_thread(self.client.start_session)  # waits for the port, then opens a session
        await self.check_audio_clock()

    async def check_audio_clock(self) -> None:
        """Fail now, saying why, if WebAudio has no clock here: otherwise the first test that listens to a
        stream waits for an AudioContext that never runs and times out with nothing to go on."""
        await self.navigate("about:blank")
        seen = await self.run_async(AUDIO_CLOCK_CHECK, AUDIO_CHECK_S, timeout_s=AUDIO_CHECK_S + 10)
        if isinstance(seen, dict) and seen.get("running"):
            return
        version = self.client.session_capabilities.get("browserVersion", "?")
        raise RuntimeError(
            f"Firefox {version} ({FIREFOX}) has no working audio output: a fresh AudioContext is still {seen} "
            f"after {AUDIO_CHECK_S:g} s. cubeb could not open a stream on the PulseAudio null sink at "
            f"{self.sound.env['PULSE_SERVER']} (see {self.sound.log_path} and {self.log_path}; "
            "MOZ_LOG=cubeb:5,MediaTrackGraph:4 says more), so WebAudio has no clock."
        )

    async def close(self) -> None:
        if self.client is not None and self.client.session is not None:
            with contextlib.suppress(Exception):  # Firefox may be gone already
                await asyncio.to_thread(self.client.delete_session)
        if self.client is not None:
            self.client.cleanup_ran = True  # nothing of ours for its __del__ to clean up
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        await asyncio.to_thread(self.sound.stop)  # after Firefox, which holds a stream on it

    async def allow_microphone(self, origin: str) -> None:
        """Store a microphone permission for `origin`, as a person's "Allow" would. Without one, Firefox
        gathers ICE candidates on its default-route address only (never loopback): in a loopback-only
        network namespace it then offers no candidate at all and the call fails."""

        def grant():
            with self.client.using_context("chrome"):
                self.client.execute_script(
                    "const principal = Services.scriptSecurityManager.createContentPrincipalFromOrigin(arguments[0]);"
                    "Services.perms.addFromPrincipal(principal, 'microphone', Services.perms.ALLOW_ACTION);",
                    (origin,),
                )

        await asyncio.to_thread(grant)

    async def navigate(self, url: str) -> None:
        await asyncio.to_thread(self.client.navigate, url)

    async def run(self, script: str, *args):
        """Run `script` (a function body; `arguments` are `args`) in the page; returns what it returns."""
        return await asyncio.to_thread(self.client.execute_script, script, args, True, None)

    async def run_async(self, script: str, *args, timeout_s: float = 60.0):
        """Run an async function body in the page and return what its promise resolves to.

        A rejection comes back as {"error": message}."""
        body = (
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
            ".then(done, (e) => done({error: String(e && e.stack || e)}));"
        )
        return await asyncio.to_thread(
            self.client.execute_async_script, body, args, True, None, int(timeout_s * 1000)
        )

    async def wait_for(self, condition: str, timeout_s: float = 30.0, every_ms: int = 100):
        """Wait in the page until the JavaScript expression `condition` is truthy; returns its value.
        `timeout_s` guards against a hang (it fails the test); it is not a timing under test."""
        result = await self.run_async(
            f"for (;;) {{ const v = await (async () => ({condition}))(); if (v) return {{ok: v}};"
            f" await new Promise((r) => setTimeout(r, {every_ms})); }}",
            timeout_s=timeout_s,
        )
        if not isinstance(result, dict) or "ok" not in result:
            raise AssertionError(f"{condition!r} failed in Firefox: {result}")
        return result["ok"]

