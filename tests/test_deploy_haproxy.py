"""The shipped HAProxy configuration (deploy/haproxy/haproxy.cfg) parses, as shipped and with a test's own
ports, and keeps the rules the replicas rely on. Independent of the server package: it reads one file and
runs `haproxy -c`. The balancer's behaviour with real replicas is tested end to end in
tests/test_haproxy_balancer.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or next(
    (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(path, os.X_OK)), None)
REPLICAS = ("r1", "r2", "r3")


def sections(text: str) -> dict[str, list[str]]:
    """'backend new_calls' -> its lines, comments and blank lines left out."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):  # the file has whole-line comments only
            continue
        if not line[0].isspace():
            current = line.strip()
            found[current] = []
        elif current is not None:
            found[current].append(line.strip())
    return found


@pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed (./run test installs it)")
@pytest.mark.parametrize("ports", [None, {"MOSHI_LB_PORT": "18080", "MOSHI_R1_PORT": "18081",
                                          "MOSHI_R2_PORT": "18082", "MOSHI_R3_PORT": "18083"}])
def test_haproxy_accepts_the_config(ports):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MOSHI_")}
    env.update(ports or {})
    checked = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True,
                             timeout=30)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "Configuration file is valid" in output
    assert "[WARNING]" not in output, output  # a warning here has meant a rule that runs in another order


def test_new_calls_are_balanced_on_readyz_and_refused_with_retry_after_when_none_is_ready():
    parts = sections(CONFIG.read_text())
    front = parts["frontend signaling"]
    new_calls = parts["backend new_calls"]
    assert "balance roundrobin" in new_calls
    assert "http-check send meth GET uri /readyz" in new_calls
    assert "http-check expect status 200" in new_calls
    check = next(line for line in new_calls if line.startswith("default-server"))
    inter = re.search(r"\binter (\d+)ms", check)
    fall = re.search(r"\bfall (\d+)", check)
    assert inter and fall and int(inter.group(1)) * int(fall.group(1)) <= 2000, check  # out within ~2 s
    assert any(line.startswith("use_backend new_calls if") for line in front)
    refusal = next(line for line in front if line.startswith("http-request return status 503"))
    assert "hdr Retry-After" in refusal and "!any_ready" in refusal
    assert "acl any_ready nbsrv(new_calls) gt 0" in front
    assert "acl new_call_path path /offer /whip" in front


@pytest.mark.parametrize("backend", ["backend new_calls", "backend replicas"])
def test_every_replica_is_in_both_backends(backend):
    servers = [line.split()[1] for line in sections(CONFIG.read_text())[backend] if line.startswith("server ")]
    assert tuple(servers) == REPLICAS


def test_a_calls_requests_go_to_the_replica_its_id_names_even_when_it_is_full():
    replicas = sections(CONFIG.read_text())["backend replicas"]
    assert "http-check send meth GET uri /healthz" in replicas  # alive, not ready: full replicas stay up here
    for name in REPLICAS:
        assert f"acl to_{name} path_beg /whip/{name}. /sessions/{name}." in replicas
        assert f"use-server {name} if to_{name}" in replicas
    assert "force-persist if " + " || ".join(f"to_{name}" for name in REPLICAS) in replicas
    assert not any("redispatch" in line for line in replicas)
