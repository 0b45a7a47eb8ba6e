"""The `moshi-webrtc` command as a person runs it: `serve` in one process, `call` in another."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from server.caller import write_wav

BIN = Path(sys.executable).parent / "moshi-webrtc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kv_options", [[], ["--kv-attention", "fused", "--kv-cache", "int8"]],
                         ids=["defaults", "kv-options"])
def test_serve_and_call_from_the_command_line(tmp_path, kv_options):
    port = free_port()
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    server = subprocess.Popen(
        [str(BIN), "serve", "--model", "tiny", "--port", str(port), "--max-calls", "2",
         "--ice-host-address", "127.0.0.1", *kv_options],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        banner = []
        for line in server.stderr:  # start-up is announced on stderr; wait for it, not for a timer
            banner.append(line)
            if "ready for" in line:
                break
        text = "".join(banner)
        # Keep reading the server's log, or a full pipe would block it mid-call.
        threading.Thread(target=lambda: [banner.append(line) for line in server.stderr], daemon=True).start()
        assert "TEST MODEL" in text and "babbles" in text and "ready for 2 calls" in text
        if kv_options:
            assert "KV cache: int8 storage, attention over each call's own filled entries (fused kernel)" in text
        else:
            assert "KV cache" not in text  # moshi's own cache, untouched

        t = np.arange(int(1.5 * 48000)) / 48000
        write_wav(tmp_path / "in.wav", (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 48000)
        done = subprocess.run(
            [str(BIN), "call", str(tmp_path / "in.wav"), "--out", str(tmp_path / "out.wav"),
             "--url", f"http://127.0.0.1:{port}", "--tail", "0.3", "--ice-host-address", "127.0.0.1"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
        assert summary["connect_ms"] > 0 and summary["events"][0] == "ready" and summary["text_messages"] > 0
        with wave.open(str(tmp_path / "out.wav")) as reply:
            assert reply.getframerate() == 24000 and reply.getnchannels() == 1
            assert abs(reply.getnframes() / 24000 - 1.8) < 0.3
        assert "transcript:" in done.stdout
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0


def test_serve_refuses_kv_options_that_do_not_go_together():
    done = subprocess.run([str(BIN), "serve", "--model", "tiny", "--port", str(free_port()), "--kv-attention", "fused",
                           "--kv-cache", "fp8"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, NO_TORCH_COMPILE="1"))
    assert done.returncode == 1
    assert "the fused attention reads int8 or the model's dtype, not fp8" in done.stderr


def test_serve_refuses_a_model_that_does_not_fit(tmp_path):
    from server.model.tiny_model import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["unheard_of_option"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    done = subprocess.run([str(BIN), "serve", "--model", str(directory), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, NO_TORCH_COMPILE="1"))
    assert done.returncode == 1
    assert "refusing to start" in done.stderr and "unheard_of_option" in done.stderr


def test_a_precomputed_voice_made_by_the_cli_serves_a_persona_call(tmp_path):
    """`voice-prompt` turns a clip into a PersonaPlex .pt voice; `serve --voices` offers it; `call --voice` uses it."""
    from server.model.persona_step import synthetic_voices

    env = dict(os.environ, NO_TORCH_COMPILE="1")
    write_wav(tmp_path / "clara.wav", synthetic_voices()["test-high"], 24000)
    voices = tmp_path / "voices"
    voices.mkdir()
    made = subprocess.run([str(BIN), "voice-prompt", str(tmp_path / "clara.wav"), "--out", str(voices / "clara.pt"),
                           "--model", "tiny-persona"], capture_output=True, text=True, timeout=120, env=env)
    assert made.returncode == 0, made.stderr
    assert "wrote" in made.stdout and (voices / "clara.pt").stat().st_size > 1000

    port = free_port()
    server = subprocess.Popen(
        [str(BIN), "serve", "--model", "tiny-persona", "--voices", str(voices), "--port", str(port),
         "--ice-host-address", "127.0.0.1"], stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        log = []
        for line in server.stderr:
            log.append(line)
            if "ready for" in line:
                break
        threading.Thread(target=lambda: [log.append(line) for line in server.stderr], daemon=True).start()
        assert "1 voices (clara), default voice clara" in "".join(log)
        write_wav(tmp_path / "in.wav", np.zeros(48000, np.float32) + 0.01, 48000)
        done = subprocess.run(
            [str(BIN), "call", str(tmp_path / "in.wav"), "--out", str(tmp_path / "out.wav"), "--voice", "clara",
             "--prompt", "You are a pirate.", "--url", f"http://127.0.0.1:{port}", "--tail", "2",
             "--ice-host-address", "127.0.0.1"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
        assert "prompt" in summary["events"] and summary["answer_to_first_audio_ms"] > 0
        refused = subprocess.run(
            [str(BIN), "call", str(tmp_path / "in.wav"), "--out", str(tmp_path / "x.wav"), "--voice", "bob",
             "--url", f"http://127.0.0.1:{port}", "--ice-host-address", "127.0.0.1"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert refused.returncode == 2 and "400: unknown voice 'bob'; this server's voices: clara" in refused.stderr
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0


CPU_ENGINE_COMPILES = """
import asyncio, logging, sys
import numpy as np
import torch
compiled = []
torch.compile = lambda fn, *args, **kwargs: compiled.append(fn) or fn  # counts; compiles nothing
from server.model import moshi_compat
if sys.argv[1] == "keep-compile":  # the control: what a CPU engine would do without turning it off
    moshi_compat.disable_torch_compile = lambda: None
from server.engine.setup import create_engine
from server.model.source import ModelSource

async def main():
    logging.basicConfig(level=logging.INFO)
    engine = create_engine(ModelSource("tiny"), max_calls=2, cpu_threads=1)
    await engine.start()  # warm-up steps every slot
    call = await engine.open_call(seed=1)
    for _ in range(3):
        await call.process(np.zeros(1920, np.float32))
    await call.close()
    await engine.stop()
    print("compiled", len(compiled))

asyncio.run(main())
"""


def test_a_cpu_model_is_served_without_torch_compile():
    """As `./run serve` runs it, NO_TORCH_COMPILE unset: moshi compiles its small kernels on first use, which
    took ~25 s of a 26 s warm-up on a 2-core machine; a CPU engine turns that off and says so in its log."""
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    runs = {}
    for mode in ("serve", "keep-compile"):
        done = subprocess.run([sys.executable, "-c", CPU_ENGINE_COMPILES, mode], capture_output=True, text=True,
                              timeout=300, env=env, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr
        runs[mode] = int(done.stdout.split("compiled")[-1])
        if mode == "serve":
            assert "warming up: 5 steps of all 2 slots on cpu (no torch.compile on a CPU)" in done.stderr
    assert runs == {"serve": 0, "keep-compile": runs["keep-compile"]} and runs["keep-compile"] > 0
