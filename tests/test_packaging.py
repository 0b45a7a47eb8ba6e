"""What is installed and shipped matches what the tests run with: Python 3.11-3.13, aiortc 1.16 (the
version aiortc_compat is written against), av's major, and a Docker image whose Python satisfies that
and which runs `serve` as an unprivileged user. No Docker engine runs here: the Dockerfile is read."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet

from server.media import aiortc_compat

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The python3 each Ubuntu release ships (what `apt-get install python3` gives in a CUDA base image).
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


def requirement(name: str) -> SpecifierSet:
    for line in PROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{name}\s*([<>=!~].*)", line)
        if match:
            return SpecifierSet(match.group(1))
    raise AssertionError(f"{name} is not a dependency")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_python_and_pins_match_what_the_tests_run_with():
    python = SpecifierSet(PROJECT["project"]["requires-python"])
    assert python == SpecifierSet(">=3.11,<3.14")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in python  # this very run
    aiortc = requirement("aiortc")
    assert version("aiortc") in aiortc and aiortc_compat.PINNED_AIORTC + "0" in aiortc
    assert not aiortc.contains("1.17.0") and not aiortc.contains("1.15.0")
    av = requirement("av")
    major = int(version("av").split(".")[0])
    assert version("av") in av and not av.contains(f"{major + 1}.0") and not av.contains(f"{major - 1}.99")
    assert PROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_the_run_script_asks_for_the_same_pythons():
    run = (ROOT / "run").read_text()
    python = SpecifierSet(PROJECT["project"]["requires-python"])
    low, high = (int(re.search(rf"^{name}=(\d+)$", run, re.MULTILINE).group(1)) for name in ("PY_MIN", "PY_MAX"))
    for minor in range(8, 16):  # ./run takes exactly the minors requires-python takes
        assert (low <= minor <= high) == (f"3.{minor}" in python), minor
    tried = re.search(r"for candidate in (.+); do", run).group(1).split()
    assert tried[0] == "python3" and {f"python3.{minor}" for minor in range(low, high + 1)} <= set(tried)
    assert f"Python 3.{low}-3.{high}" in (ROOT / "README.md").read_text()


def test_the_run_script_picks_a_supported_python_and_says_which(tmp_path):
    """A machine with several Pythons (Debian 13: its own 3.13 as python3, beside pyenv's 3.11): ./run takes
    the first supported one, says which, and refuses with a clear message when none is."""
    import os
    import shutil
    import subprocess

    def pick(pythons: dict[str, str]) -> subprocess.CompletedProcess:
        bin_dir = tmp_path / "bin"
        shutil.rmtree(bin_dir, ignore_errors=True)
        bin_dir.mkdir()
        for name, answer in pythons.items():  # stand-ins that answer the version check as that Python would
            script = bin_dir / name
            script.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.version_info = {answer}; "
                              f"exec(sys.argv[1])' \"$2\"\n")
            script.chmod(0o755)
        functions = (ROOT / "run").read_text().split("\ncmd=")[0]  # the script's definitions, not its commands
        script = functions.replace('cd "$(dirname "$0")"', "") + "\npick_python"
        return subprocess.run([shutil.which("bash"), "-c", script], capture_output=True, text=True,
                              env={"PATH": str(bin_dir)})

    found = pick({"python3": "(3, 10, 0)", "python3.13": "(3, 13, 0)", "python3.11": "(3, 11, 7)"})
    assert found.returncode == 0 and found.stdout.strip().endswith("/bin/python3.13")
    found = pick({"python3": "(3, 13, 1)", "python3.11": "(3, 11, 7)"})
    assert found.stdout.strip().endswith("/bin/python3")
    found = pick({"python3": "(3, 14, 0)", "python3.12": "(3, 12, 1)"})
    assert found.stdout.strip().endswith("/bin/python3.12")
    refused = pick({"python3": "(3, 10, 12)"})
    assert refused.returncode != 0 and "needs Python 3.11-3.13" in refused.stderr and not refused.stdout.strip()
    assert os.access(ROOT / "run", os.X_OK)


def test_the_image_has_a_python_the_project_takes_and_serves_as_an_unprivileged_user():
    steps = dockerfile()
    (base,) = [args for op, args in steps if op == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu(\d+\.\d+)", base)
    assert match, base
    assert (int(match.group(1)), int(match.group(2))) >= (12, 8)  # torch 2.9.1's PyPI wheel is built for CUDA 12.8
    assert UBUNTU_PYTHON[match.group(3)] in SpecifierSet(PROJECT["project"]["requires-python"])
    installs = " ".join(args for op, args in steps if op == "RUN" and "apt-get install" in args)
    assert re.search(r"\bpython3\b", installs) and "python3-venv" in installs  # Ubuntu's own python3

    users = [(index, args.split(":")[0]) for index, (op, args) in enumerate(steps) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0")
    user_at, user = users[-1]
    assert any(op == "RUN" and re.search(rf"useradd\b[^&]*\s{user}(\s|$)", args) for op, args in steps[:user_at])
    entry_at, entrypoint = next((i, json.loads(args)) for i, (op, args) in enumerate(steps) if op == "ENTRYPOINT")
    assert entry_at > user_at
    assert entrypoint[:2] == ["moshi-webrtc", "serve"] and "0.0.0.0" in entrypoint
    assert any(op == "HEALTHCHECK" and "/healthz" in args for op, args in steps)

    # The Hugging Face cache is mounted into that user's home, in the README and in compose.yaml alike.
    home_cache = f"/home/{user}/.cache/huggingface"
    assert any(op == "RUN" and home_cache in args for op, args in steps)  # made in the image, the user's own
    assert f":{home_cache}" in (ROOT / "compose.yaml").read_text()
    assert f"-v ~/.cache/huggingface:{home_cache} moshi-webrtc" in (ROOT / "README.md").read_text()
