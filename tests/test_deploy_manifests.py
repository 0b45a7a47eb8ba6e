"""The Kubernetes manifests under deploy/kubernetes: valid against the Kubernetes API schemas (the
kubernetes-validate package bundles them; no cluster), and holding together where an edit could quietly break
them: probes, the drain's grace period, the GPU, secrets and config keys that exist, Services that select the
pods, the router's list of pods. Independent of the server package: it reads YAML (and the two environment
variable names from the CLI's source text).

With kubectl on the PATH (its built-in kustomize), every combination of the components is rendered and
checked too; without it, only the files as they are."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
COMPONENTS = ("route-by-id", "replica-urls", "host-network")
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
# The oldest Kubernetes the manifests claim to work with, and the newest schemas the package has.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())
KUBECTL = shutil.which("kubectl")
HAPROXY = shutil.which("haproxy") or next(
    (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(path, os.X_OK)), None)
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"  # set on each pod by the StatefulSet controller


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(path for pattern in ("*.yaml", "*.yml") for path in DEPLOY.rglob(pattern))


def api_objects(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc.get("kind") not in KUSTOMIZE_KINDS]


def cli_env_name(module: str, constant: str) -> str:
    """An environment variable's name as the server's source defines it, read as text (no import)."""
    match = re.search(rf'^{constant} = "([A-Z0-9_]+)"', (ROOT / module).read_text(), re.MULTILINE)
    assert match, f"{constant} is no longer defined in {module}"
    return match.group(1)


def render(components: tuple[str, ...], tmp_path: Path) -> list[dict]:
    """kubectl kustomize of base plus these components, from a kustomization in tmp_path."""
    folder = tmp_path / ("render-" + "-".join(components or ("base",)))
    folder.mkdir()
    relative = os.path.relpath(DEPLOY, folder)
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", f"resources: [{relative}/base]"]
    if components:
        lines += ["components:", *(f"  - {relative}/components/{name}" for name in components)]
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    built = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc is not None]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(objects: list[dict]) -> tuple[dict, dict]:
    statefulset = one(objects, "StatefulSet")
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, next(c for c in containers if c["name"] == "moshi-webrtc")


def flag(args: list[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(name + "=")]
    assert len(values) <= 1, f"{name} given {len(values)} times"
    return values[0] if values else None


def pod_names(statefulset: dict) -> list[str]:
    return [f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])]


def secret_keys() -> dict[str, set[str]]:
    """The Secret's shape, from base/secret.example.yaml (the Secret itself is created by hand)."""
    return {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
            for doc in load(BASE / "secret.example.yaml") if doc["kind"] == "Secret"}


# -- every file, as it is ---------------------------------------------------------------------------------


FILES = manifest_files()


def test_the_manifests_are_where_the_tests_look():
    names = {path.relative_to(DEPLOY).as_posix() for path in FILES}
    assert {"kustomization.yaml", "base/moshi.yaml", "base/secret.example.yaml", "base/coturn.yaml",
            "components/route-by-id/router.yaml"} <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", FILES, ids=lambda path: path.relative_to(DEPLOY).as_posix())
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path, version):
    for obj in api_objects(load(path)):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(part) for part in error.path)
            pytest.fail(f"{path.name}: {obj['kind']} {obj['metadata'].get('name')}: {where}: {error.message}")


def test_every_manifest_is_listed_by_a_kustomization_and_every_listed_path_exists():
    listed: set[Path] = set()
    for path in FILES:
        for doc in load(path):
            if doc.get("kind") not in KUSTOMIZE_KINDS:
                continue
            for entry in doc.get("resources", []) + doc.get("components", []):
                target = (path.parent / entry).resolve()
                assert target.exists(), f"{path.relative_to(DEPLOY)} lists {entry}, which does not exist"
                listed.add(target)
    orphans = [path.relative_to(DEPLOY).as_posix() for path in FILES
               if api_objects(load(path)) and path.resolve() not in listed and path.name != "secret.example.yaml"]
    assert not orphans, f"manifests no kustomization applies: {orphans}"


def test_the_secret_example_is_not_applied():
    """An apply must never overwrite real secrets with the example's placeholders."""
    base = load(BASE / "kustomization.yaml")[0]
    assert "secret.example.yaml" not in base["resources"]
    assert "api-token" in secret_keys()["moshi-webrtc"] and "turn-secret" in secret_keys()["moshi-webrtc"]


# -- structure: the base files as they are, and every rendered combination ---------------------------------


def base_objects() -> list[dict]:
    return [obj for path in sorted(BASE.glob("*.yaml")) if path.name != "secret.example.yaml"
            for obj in api_objects(load(path))]


COMBINATIONS = [combo for size in range(len(COMPONENTS) + 1) for combo in itertools.combinations(COMPONENTS, size)]


@pytest.fixture(scope="module", params=[None, *COMBINATIONS],
                ids=lambda combo: "files" if combo is None else "+".join(("base", *combo)))
def deployment(request, tmp_path_factory) -> tuple[tuple[str, ...] | None, list[dict]]:
    """(components, objects): the base files as they are, or kustomize's rendering of base + components."""
    if request.param is None:
        return None, base_objects()
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: only the files themselves are checked")
    return request.param, render(request.param, tmp_path_factory.mktemp("kustomize"))


def test_rendered_objects_are_valid_against_the_kubernetes_schemas(deployment):
    _, objects = deployment
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_probes_drain_and_gpu(deployment):
    _, objects = deployment
    statefulset, container = server_container(objects)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container.get("startupProbe", {}).get("httpGet", {}).get("path", "/healthz") == "/healthz"
    # /readyz may spend up to 2 s timing an operation on the GPU.
    assert container["readinessProbe"]["timeoutSeconds"] > 2
    drain = flag(container["args"], "--drain-seconds")
    assert drain is not None and drain.isdigit(), "the server must be told how long to drain"
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(drain) + 15, f"grace period {grace} s leaves no margin over a {drain} s drain"
    resources = container["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert str(resources["requests"].get("nvidia.com/gpu", "1")) == "1"
    assert "cpu" not in resources["limits"], "a CPU limit throttles the media loop"


def test_replica_ids_are_the_stable_pod_names(deployment):
    _, objects = deployment
    statefulset, container = server_container(objects)
    env = {item["name"]: item for item in container["env"]}
    replica_id = flag(container["args"], "--replica-id")
    assert replica_id is not None
    variable = re.fullmatch(r"\$\((\w+)\)", replica_id).group(1)
    assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = one(objects, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # full and draining pods keep their names
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"


def test_every_variable_the_args_use_is_defined(deployment):
    _, objects = deployment
    for workload in (obj for obj in objects if obj["kind"] in ("StatefulSet", "Deployment")):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            defined = {item["name"] for item in container.get("env", [])}
            used = {name for arg in container.get("args", []) for name in re.findall(r"\$\((\w+)\)", arg)}
            assert used <= defined, f"{workload['metadata']['name']}: undefined {sorted(used - defined)}"


def test_secret_and_config_references_resolve(deployment):
    _, objects = deployment
    secrets = secret_keys()
    configs = {obj["metadata"]["name"]: set(obj.get("data", {})) for obj in objects if obj["kind"] == "ConfigMap"}
    checked = 0
    for workload in (obj for obj in objects if obj["kind"] in ("StatefulSet", "Deployment")):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for item in container.get("env", []):
                source = item.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{item['name']}: no secret {ref}"
                    checked += 1
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in configs.get(ref["name"], set()), f"{item['name']}: no config {ref}"
                    checked += 1
    assert checked > 0


def test_the_server_and_coturn_share_the_turn_secret_and_the_server_gets_its_token(deployment):
    _, objects = deployment
    _, container = server_container(objects)
    env = {item["name"]: item.get("valueFrom", {}) for item in container["env"]}
    turn_env = cli_env_name("server/media/turn.py", "TURN_SECRET_ENV")
    token_env = cli_env_name("server/cli.py", "API_TOKEN_ENV")
    assert "secretKeyRef" in env[turn_env] and "secretKeyRef" in env[token_env]
    coturn = one(objects, "Deployment", "coturn")["spec"]["template"]["spec"]
    assert coturn["hostNetwork"] is True
    turn = coturn["containers"][0]
    variable = re.fullmatch(r"\$\((\w+)\)", flag(turn["args"], "--static-auth-secret")).group(1)
    coturn_ref = next(item for item in turn["env"] if item["name"] == variable)["valueFrom"]["secretKeyRef"]
    assert coturn_ref == env[turn_env]["secretKeyRef"]
    assert "--use-auth-secret" in turn["args"]


def test_services_pdbs_and_ingresses_select_what_exists(deployment):
    _, objects = deployment
    statefulset, _ = server_container(objects)
    names = set(pod_names(statefulset))
    workloads = [obj for obj in objects if obj["kind"] in ("StatefulSet", "Deployment")]

    def ports_of(workload: dict) -> set[str]:
        return {port["name"] for c in workload["spec"]["template"]["spec"]["containers"]
                for port in c.get("ports", []) if "name" in port}

    def selected(selector: dict) -> list[dict]:
        plain = {key: value for key, value in selector.items() if key != POD_NAME_LABEL}
        if POD_NAME_LABEL in selector:
            assert selector[POD_NAME_LABEL] in names, f"no pod {selector[POD_NAME_LABEL]}"
        return [w for w in workloads if plain.items() <= w["spec"]["template"]["metadata"]["labels"].items()]

    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    for name, service in services.items():
        matches = selected(service["spec"]["selector"])
        assert matches, f"Service {name} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert isinstance(target, int) or all(target in ports_of(w) for w in matches), f"{name}: {target}"
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    for pdb in (obj for obj in objects if obj["kind"] == "PodDisruptionBudget"):
        assert selected(pdb["spec"]["selector"]["matchLabels"]), f"PDB {pdb['metadata']['name']} selects nothing"
    server_pdb = next(obj for obj in objects if obj["kind"] == "PodDisruptionBudget"
                      and selected(obj["spec"]["selector"]["matchLabels"]) == [statefulset])
    assert server_pdb["spec"]["maxUnavailable"] == 1
    for ingress in (obj for obj in objects if obj["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"Ingress {ingress['metadata']['name']}: no {backend['name']}"
                port_names = {port.get("name") for port in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"].get("name") in port_names


def test_media_mode(deployment):
    """Relay-only through TURN by default; host networking with the node's address as the component says."""
    components, objects = deployment
    statefulset, container = server_container(objects)
    pod = statefulset["spec"]["template"]["spec"]
    env = {item["name"]: item.get("valueFrom", {}) for item in container["env"]}
    config = one(objects, "ConfigMap", "moshi-webrtc")["data"]
    assert flag(container["args"], "--ice-transport-policy") == "$(MOSHI_ICE_TRANSPORT_POLICY)"
    assert flag(container["args"], "--turn-url") == "$(MOSHI_TURN_URL)"
    host_address = re.fullmatch(r"\$\((\w+)\)", flag(container["args"], "--ice-host-address")).group(1)
    field = env[host_address]["fieldRef"]["fieldPath"]
    if components is not None and "host-network" in components:
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert field == "status.hostIP"
        assert config["MOSHI_ICE_TRANSPORT_POLICY"] == "all"
        anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # one pod per node: port 8080 is the node's
    else:
        assert not pod.get("hostNetwork")
        assert field == "status.podIP"
        assert config["MOSHI_ICE_TRANSPORT_POLICY"] == "relay"


def test_replica_urls(deployment):
    components, objects = deployment
    statefulset, container = server_container(objects)
    public_url = flag(container["args"], "--public-url")
    if components is None or "replica-urls" not in components:
        assert public_url is None
        return
    assert public_url == "https://$(POD_NAME).$(MOSHI_PUBLIC_DOMAIN)"
    domain = one(objects, "ConfigMap", "moshi-webrtc")["data"]["MOSHI_PUBLIC_DOMAIN"]
    ingress = one(objects, "Ingress", "moshi-webrtc-replicas")
    routes = {rule["host"]: rule["http"]["paths"][0]["backend"]["service"]["name"] for rule in ingress["spec"]["rules"]}
    assert routes == {f"{name}.{domain}": name for name in pod_names(statefulset)}
    for name in pod_names(statefulset):
        service = one(objects, "Service", name)
        assert service["spec"]["selector"][POD_NAME_LABEL] == name
        assert service["spec"]["publishNotReadyAddresses"] is True


# -- the router (components/route-by-id) ------------------------------------------------------------------


def router_config(objects: list[dict]) -> str:
    return one(objects, "ConfigMap", "moshi-router")["data"]["haproxy.cfg"]


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """'backend new_calls' -> its lines, stripped; whole-line comments and blank lines left out."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            current = raw.strip()
            found[current] = []
        elif current is not None:
            found[current].append(raw.strip())
    return found


def router_objects() -> list[dict]:
    return api_objects(load(DEPLOY / "components" / "route-by-id" / "router.yaml"))


def test_the_router_knows_every_replica_by_its_pod_name():
    statefulset, _ = server_container(base_objects())
    namespace = load(BASE / "kustomization.yaml")[0]["namespace"]
    config = router_config(router_objects())
    backends = {name.split()[1]: body for name, body in haproxy_sections(config).items() if name.startswith("backend ")}
    assert set(backends) == {"new_calls", "replicas"}
    for name, body in backends.items():
        servers = [line.split()[1:3] for line in body if line.startswith("server ")]
        assert [server for server, _ in servers] == pod_names(statefulset), name
        for server, address in servers:
            assert address == f"{server}.{statefulset['spec']['serviceName']}.{namespace}.svc.cluster.local:8080"
    assert "http-check send meth GET uri /readyz" in backends["new_calls"]
    assert "http-check send meth GET uri /healthz" in backends["replicas"]
    for name in pod_names(statefulset):
        assert f"acl to_{name} path_beg /whip/{name}. /sessions/{name}." in backends["replicas"]
        assert f"use-server {name} if to_{name}" in backends["replicas"]
    assert "force-persist if " + " || ".join(f"to_{name}" for name in pod_names(statefulset)) in config
    assert "hdr Retry-After" in config


def test_with_route_by_id_the_ingress_goes_through_the_router(deployment):
    components, objects = deployment
    routed = components is not None and "route-by-id" in components
    ingress = one(objects, "Ingress", "moshi-webrtc")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    assert backend == ("moshi-router" if routed else "moshi")  # without the router: the ready pods' Service


@pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed (./run test installs it)")
def test_haproxy_accepts_the_routers_config(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(router_config(router_objects()))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The router reads the pod's resolv.conf; where this machine's nameserver cannot be reached (the
    # suite's loopback-only namespace) haproxy warns about that, which says nothing about the config.
    warnings = [line for line in (checked.stdout + checked.stderr).splitlines()
                if "[WARNING]" in line and "can't connect socket for nameserver" not in line]
    assert not warnings, checked.stdout + checked.stderr
