"""The code's layout keeps its promises: imports point down the data path's layers, private parts of
other objects (aiortc's, moshi's) are touched only in the pinned compatibility modules, and the page
follows the `events` messages the server defines."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from server.media.events import EVENT_TYPES
from server.model import moshi_compat

ROOT = Path(__file__).resolve().parent.parent

# Lower layers never import higher ones (server/__init__.py says what each holds).
LAYERS = ["server.audio", "server.model", "server.engine", "server.media", "signaling", "tools"]
TOOLS = {"server.cli", "server.caller", "server.worker"}
COMPAT_MODULES = {"server.media.aiortc_compat", "server.media.ice_compat", "server.media.sctp_compat",
                  "server.model.moshi_compat", "server.model.kv_compat"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted([*ROOT.joinpath("server").rglob("*.py"), *ROOT.joinpath("signaling").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _layer(module: str) -> int | None:
    if module in TOOLS:
        return LAYERS.index("tools")
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None  # the `server` package itself


def _imports(module: str, tree: ast.Module, is_package: bool) -> set[str]:
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names |= {f"{target}.{alias.name}" for alias in node.names} if node.module is None else {target}
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.split(".")[0] in ("server", "signaling")}


def test_imports_point_down_the_layers():
    modules = _modules()
    upward = []
    for module, tree in modules.items():
        is_package = (ROOT / module.replace(".", "/") / "__init__.py").exists()
        own = _layer(module)
        for target in _imports(module, tree, is_package):
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
    assert {_layer(m) for m in modules} >= set(range(len(LAYERS)))  # every layer is still there


def test_a_layer_violation_would_be_seen():
    tree = ast.parse("from ..media.peer import CallSession\n")
    (target,) = _imports("server.engine.engine", tree, is_package=False)
    assert target == "server.media.peer" and _layer(target) > _layer("server.engine.engine")


def test_private_attributes_of_other_objects_only_in_the_compat_modules():
    reached = []
    for module, tree in _modules().items():
        if module in COMPAT_MODULES:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            reached.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not reached, "private attributes of other objects:\n" + "\n".join(reached)


def test_moshi_compat_is_pinned(monkeypatch):
    moshi_compat.check_version()
    assert "dim" in moshi_compat.moshi_7b_lm_kwargs()
    monkeypatch.setattr(moshi_compat.moshi, "__version__", "0.3.0")
    with pytest.raises(moshi_compat.MoshiChanged, match="0.3.0"):
        moshi_compat.moshi_7b_lm_kwargs()


def _page_event_cases() -> dict[str, set[str]]:
    """`case "type":` blocks of web/app.js's onEvent, and the `event.<field>` each reads."""
    source = (ROOT / "web" / "app.js").read_text()
    body = source[source.index("function onEvent(event)"):]
    body = body[: body.index("\n}\n")]
    cases: dict[str, set[str]] = {}
    for block in re.split(r'\n\s*case ', body)[1:]:
        name = re.match(r'"(\w+)":', block).group(1)
        cases[name] = set(re.findall(r"\bevent\.(\w+)", block))
    return cases


def test_the_page_handles_every_event_and_reads_only_their_fields():
    cases = _page_event_cases()
    assert set(cases) == set(EVENT_TYPES), "web/app.js onEvent must handle exactly server.media.events' types"
    for name, fields in cases.items():
        declared = {field.name for field in dataclasses.fields(EVENT_TYPES[name])} | {"type"}
        assert fields <= declared, f"the page reads {fields - declared} of a {name!r} event, which has none"


def test_events_encode_with_their_type():
    from server.media.events import Bye, Drops

    assert Bye("hung up").to_json() == '{"type": "bye", "reason": "hung up"}'
    assert EVENT_TYPES["drops"] is Drops
    assert {field.name for field in dataclasses.fields(Drops)} == {"input_frames", "output_ms"}
