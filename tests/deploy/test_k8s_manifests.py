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
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


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

    key = env["OFFRAMP_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True, "the pod must start without the API-key Secret"


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
