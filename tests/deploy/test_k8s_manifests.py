"""k8s/: every kustomization renders, validates against the Kubernetes schemas offline, and
agrees with the server it deploys (routes, port, OFFRAMP_* settings, shutdown timing).

Rendering needs `kubectl` (skipped without it: .ci/run's deployment step installs one) and the
schema check `kubernetes-validate` (PyPI; installed by that step). The checks against the
server also run on the base as written, so they need neither."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import (
    K8S,
    KUSTOMIZATIONS,
    PENDING_SETTINGS,
    base_without_kustomize,
    config_data,
    container,
    drain_seconds,
    kubectl,
    load_files,
    one,
    parse_dockerfile,
    render,
    routes,
    setting_names,
    settings_from,
)

needs_kubectl = pytest.mark.skipif(kubectl() is None, reason="kubectl not installed (.ci/run installs it)")

# Kubernetes versions the manifests must be valid for: the oldest we claim (autoscaling/v2 and
# policy/v1 are GA there) and the newest kubernetes-validate knows.
OLDEST_K8S = "1.25"


def _documents(source: str) -> list[dict]:
    return base_without_kustomize() if source == "base" else list(render(source))


SOURCES = ["base"] + [pytest.param(k, marks=needs_kubectl) for k in KUSTOMIZATIONS]


# --- rendering and schemas -------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_every_kind(kustomization):
    kinds = sorted(d["kind"] for d in render(kustomization))
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                     "PodDisruptionBudget", "Service"]


def _validator():
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed "
                        "(.ci/run's deployment step installs it)")
    from kubernetes_validate import utils

    versions = utils.all_versions()  # the schema sets it ships, e.g. 1.25.0

    def key(v):
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    oldest = [v for v in versions if v.startswith(OLDEST_K8S + ".")]
    assert oldest, f"kubernetes-validate has no schemas for Kubernetes {OLDEST_K8S}"
    return utils, sorted({min(oldest, key=key), max(versions, key=key)}, key=key)


def _validate(docs: list[dict]) -> None:
    utils, versions = _validator()
    for version in versions:
        for doc in docs:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:  # jsonschema's, with the path to the bad field
                pytest.fail(f"{name} is not valid for Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
            except Exception as exc:  # unknown kind or version: a failure too
                pytest.fail(f"{name} could not be validated for Kubernetes {version}: "
                            f"{getattr(exc, 'message', exc)}")


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_manifests_match_kubernetes_schemas(kustomization):
    _validate(list(render(kustomization)))


def test_base_resources_match_kubernetes_schemas():
    """Without kubectl too: the base's resource files as written."""
    _validate(base_without_kustomize())


# --- agreement with the server ---------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_probes_use_the_servers_health_routes_and_port(source):
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    c = container(deployment)
    get_routes = {path for path, methods in routes().items() if "GET" in methods}
    port = int(config_data(docs, deployment)["OFFRAMP_PORT"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in ports.values(), f"OFFRAMP_PORT {port} is not a containerPort {ports}"

    expected = {"startupProbe": "/health/live", "readinessProbe": "/health/ready",
                "livenessProbe": "/health/live"}
    for probe, path in expected.items():
        http = c[probe]["httpGet"]
        assert http["path"] == path, f"{probe} should check {path}"
        assert http["path"] in get_routes, f"{probe} path {http['path']} is no GET route of the server"
        probe_port = ports.get(http["port"], http["port"])
        assert probe_port == port, f"{probe} probes port {http['port']}, the server listens on {port}"


@pytest.mark.parametrize("source", SOURCES)
def test_service_and_policies_select_the_pods(source):
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(deployment)["ports"]}
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in port_names, f"Service targets {p['targetPort']}, not a container port"

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("source", SOURCES)
def test_environment_names_are_server_settings(source):
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    c = container(deployment)
    data = config_data(docs, deployment)
    env = {e["name"]: e for e in c.get("env", [])}
    known = setting_names()

    for name in [*data, *env]:
        if name.startswith("OFFRAMP_"):
            assert name in known | PENDING_SETTINGS, f"{name} is not a server setting ({sorted(known)})"

    # The values parse as the server's settings (types, provider cpu|cuda, ...).
    settings = settings_from(data)
    assert settings.host == "0.0.0.0", "in a pod the server must listen on every interface"
    assert str(settings.model_dir) == "/models"

    threads = env["OFFRAMP_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu"
    assert threads.get("containerName", c["name"]) == c["name"]
    assert "cpu" in c["resources"]["limits"], "threads come from the CPU limit, which must be set"


@pytest.mark.parametrize("source", SOURCES)
def test_api_key_secret_is_required_and_nothing_allows_anonymous(source):
    """A pod without the Secret must not start (CreateContainerConfigError) rather than serve
    predict and reload to anyone; the server itself refuses 0.0.0.0 without a key."""
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    c = container(deployment)
    data = config_data(docs, deployment)
    env = {e["name"]: e for e in c.get("env", [])}

    key = env["OFFRAMP_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key.get("optional", False) is False, "the API-key Secret must not be optional"
    assert key["name"] and key["key"]
    for src in c.get("envFrom", []):
        assert not src.get("secretRef", {}).get("optional"), "an optional Secret in envFrom"

    # No variant serves anonymously: OFFRAMP_ALLOW_ANONYMOUS is set nowhere (a demo overlay
    # would have to set it true on purpose, and this test would have to name it).
    assert "OFFRAMP_ALLOW_ANONYMOUS" not in data and "OFFRAMP_ALLOW_ANONYMOUS" not in env
    from app.auth import anonymous_exposure

    assert anonymous_exposure(settings_from(data)) is not None, \
        "without the key these settings would serve openly: the server must refuse them"
    assert anonymous_exposure(settings_from({**data, "OFFRAMP_API_KEY": "from-the-secret"})) is None


def _allowed_ports(deployment: dict) -> tuple[set, dict]:
    ports = container(deployment)["ports"]
    return {p["name"] for p in ports} | {p["containerPort"] for p in ports}, \
        {p["name"]: p["containerPort"] for p in ports}


@pytest.mark.parametrize("source", SOURCES)
def test_network_policy_admits_only_the_http_port_from_chosen_peers(source):
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    policy = one(docs, "NetworkPolicy")
    spec = policy["spec"]

    # It selects exactly the server's pods: the Deployment's pod labels, nothing else.
    assert spec["podSelector"] == {"matchLabels": pod_labels}
    assert {"Ingress", "Egress"} <= set(spec["policyTypes"])

    known, by_name = _allowed_ports(deployment)
    server_port = int(config_data(docs, deployment)["OFFRAMP_PORT"])
    rules = spec.get("ingress", [])
    assert rules, "no ingress rule: nothing could reach the server"
    for rule in rules:
        # A rule without ports admits every port; without `from`, every source.
        assert rule.get("ports"), "an ingress rule without ports admits every port"
        for p in rule["ports"]:
            assert p["port"] in known and by_name.get(p["port"], p["port"]) == server_port, \
                f"ingress to port {p['port']}, the server listens on {server_port}"
            assert p.get("protocol", "TCP") == "TCP" and "endPort" not in p
        peers = rule.get("from")
        assert peers, "an ingress rule without `from` admits every source"
        for peer in peers:
            assert "ipBlock" not in peer, "no address ranges: callers are chosen by label"
            assert peer.get("podSelector") or peer.get("namespaceSelector"), \
                f"an empty selector admits every pod or namespace: {peer}"

    # Egress: the server opens no connection (models come from the image or a volume).
    assert spec.get("egress", []) == [], "the server needs no egress; allow only what an overlay adds"
    assert not deployment["spec"]["template"]["spec"].get("initContainers"), \
        "an init container may need egress (a model download): allow it in the NetworkPolicy"


@needs_kubectl
def test_queue_time_variant_prometheus_may_scrape_through_the_network_policy():
    """prometheus-adapter reads Prometheus, which must reach /metrics on the annotated port."""
    docs = render("variants/hpa-queue-time")
    deployment = one(docs, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    values = load_files(K8S / "variants" / "hpa-queue-time" / "prometheus-adapter-values.yaml")[0]
    # http://prometheus-server.NAMESPACE.svc
    prometheus_namespace = values["prometheus"]["url"].split("//", 1)[1].split(".")[1]

    _, by_name = _allowed_ports(deployment)
    admitted = False
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        ports = {by_name.get(p["port"], p["port"]) for p in rule["ports"]}
        for peer in rule["from"]:
            namespaces = peer.get("namespaceSelector", {}).get("matchLabels", {})
            if (namespaces.get("kubernetes.io/metadata.name") == prometheus_namespace
                    and "podSelector" not in peer and int(annotations["prometheus.io/port"]) in ports):
                admitted = True
    assert admitted, f"the NetworkPolicy does not admit namespace {prometheus_namespace} " \
                     f"to port {annotations['prometheus.io/port']} for scrapes"


@pytest.mark.parametrize("source", SOURCES)
def test_security_resources_and_shutdown(source):
    docs = _documents(source)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)

    assert pod["securityContext"]["runAsNonRoot"] is True
    user = parse_dockerfile().stage("runtime").last("USER").split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(user), "runAsUser differs from the image's USER"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"}
    assert tmp and any(v["name"] in tmp and "emptyDir" in v for v in pod["volumes"]), \
        "/tmp must be a writable emptyDir"

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"cpu and memory {kind} must be set"

    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = int(pre_stop[1])
    grace = pod["terminationGracePeriodSeconds"]
    drain = drain_seconds(config_data(docs, deployment))
    assert grace > pause + drain, \
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pause} s + drain {drain} s"


@needs_kubectl
def test_gpu_overlay_asks_for_a_gpu():
    docs = list(render("overlays/gpu"))
    deployment = one(docs, "Deployment")
    c = container(deployment)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert deployment["spec"]["template"]["spec"]["nodeSelector"]
    assert config_data(docs, deployment)["OFFRAMP_PROVIDER"] == "cuda"
    assert c["image"].endswith(":gpu"), "the GPU overlay runs the Dockerfile's gpu target"
    cpu = container(one(render("overlays/cpu"), "Deployment"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


@needs_kubectl
def test_queue_time_variant_scales_on_the_servers_queue_histogram():
    docs = render("variants/hpa-queue-time")
    hpa = one(docs, "HorizontalPodAutoscaler")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == ["offramp_queue_duration_seconds_p95"]
    rules = load_files(K8S / "variants" / "hpa-queue-time" / "prometheus-adapter-values.yaml")[0]
    rule, = rules["rules"]["custom"]
    assert rule["name"]["as"] in pods

    # The series the adapter reads is a histogram the server really exports, on a real route.
    from app.metrics import Metrics

    histograms = {m.name for m in Metrics().registry.collect() if m.type == "histogram"}
    series = rule["name"]["matches"].strip("^$")
    assert series.removesuffix("_bucket") in histograms, f"the server exports no {series}"
    deployment = one(docs, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes()
    assert annotations["prometheus.io/port"] == config_data(docs, deployment)["OFFRAMP_PORT"]
