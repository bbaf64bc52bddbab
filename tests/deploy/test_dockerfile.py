"""The Dockerfile, read without building it (tests/deploy/container_test.sh builds and runs it):
non-root USER, HEALTHCHECK on the readiness route, exec-form CMD, ARG BASE_IMAGE, a serving-only
runtime stage and a GPU target."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import (
    ROOT,
    exec_form,
    parse_dockerfile,
    routes,
    setting_names,
    settings_from,
)

DOCKERFILE = parse_dockerfile()
RUNTIME_STAGES = ["runtime", "gpu"]


def test_base_image_is_an_argument_defaulting_to_official_slim_python():
    default = DOCKERFILE.global_args.get("BASE_IMAGE")
    assert default and re.fullmatch(r"python:3\.\d+-slim(-\w+)?", default), default
    for name in ("builder", "runtime"):
        assert DOCKERFILE.stage(name).base == "${BASE_IMAGE}", \
            f"{name} must start from BASE_IMAGE (the venv's interpreter path is the base's)"


def test_default_target_is_the_cpu_runtime():
    assert DOCKERFILE.stages[-1].name == "runtime"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runs_as_non_root(stage):
    user = DOCKERFILE.stage(stage).last("USER")
    assert user, f"{stage}: no USER"
    uid = user.split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, f"{stage}: USER {user} is root or not numeric"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_healthcheck_asks_the_readiness_route(stage):
    health = DOCKERFILE.stage(stage).last("HEALTHCHECK")
    assert health, f"{stage}: no HEALTHCHECK"
    assert "/health/ready" in health
    assert "/health/ready" in routes() and "GET" in routes()["/health/ready"]
    command = health[health.index("CMD") + 3:].strip()
    assert exec_form(command), f"{stage}: HEALTHCHECK CMD is not exec form: {command}"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_cmd_is_exec_form_and_serves(stage):
    s = DOCKERFILE.stage(stage)
    cmd = exec_form(s.last("CMD") or "")
    assert cmd, f"{stage}: CMD must be exec form (JSON array) so that SIGTERM reaches the server"
    assert cmd[0].endswith("offramp") and cmd[1:] == ["serve"], cmd
    assert s.last("ENTRYPOINT") is None or exec_form(s.last("ENTRYPOINT"))


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_environment_is_server_settings(stage):
    s = DOCKERFILE.stage(stage)
    env = s.env()
    for name in env:
        if name.startswith("OFFRAMP_"):
            assert name in setting_names(), f"{stage}: {name} is not a server setting"
    assert env["OFFRAMP_HOST"] == "0.0.0.0"
    assert env["OFFRAMP_MODEL_DIR"] == "/models"
    assert s.last("EXPOSE").split("/")[0] == env["OFFRAMP_PORT"]
    assert any(args.endswith(" /models") and "bundles " in args for args in s.all("COPY")), \
        f"{stage}: the bundles of models/ must be copied to /models"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_stage_installs_nothing_to_build_with(stage):
    s = DOCKERFILE.stage(stage)
    runs = " ".join(s.all("RUN")).lower()
    for word in ("pip install", "apt-get install", "gcc", "build-essential", "torch", "transformers"):
        assert word not in runs, f"{stage} runs {word!r}: the runtime holds the serving install only"
    venv_from = [a for a in s.all("COPY") if "/opt/venv" in a]
    assert venv_from and all("--from=" in a for a in venv_from)


def test_builder_installs_the_serving_package_without_extras():
    runs = " ".join(DOCKERFILE.stage("builder").all("RUN"))
    assert "python3 -m venv /opt/venv" in runs
    assert re.search(r"pip install [^&]*/src(\s|$)", runs), "pip install /src (no -e, no extras)"
    assert "/src[" not in runs and " -e " not in runs


def test_gpu_target_uses_cuda_and_onnxruntime_gpu():
    cuda = DOCKERFILE.global_args.get("CUDA_IMAGE") or ""
    assert "cuda" in cuda and "runtime" in cuda, cuda
    assert DOCKERFILE.stage("gpu-base").base == "${CUDA_IMAGE}"
    assert "onnxruntime-gpu" in " ".join(DOCKERFILE.stage("gpu-builder").all("RUN"))
    assert DOCKERFILE.stage("gpu").env()["OFFRAMP_PROVIDER"] == "cuda"


def test_dockerignore_keeps_the_context_to_what_the_image_needs():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    for needed in ("pyproject.toml", "README.md", "app", "training", "bench", "models"):
        assert f"!{needed}" in lines, f".dockerignore must let {needed} through"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_image_without_a_key_refuses_to_serve(stage):
    """The image binds 0.0.0.0 and sets neither OFFRAMP_API_KEY nor OFFRAMP_ALLOW_ANONYMOUS:
    a plain `docker run` without `-e OFFRAMP_API_KEY=...` exits 2 rather than serving openly."""
    from app.auth import anonymous_exposure

    env = DOCKERFILE.stage(stage).env()
    assert "OFFRAMP_ALLOW_ANONYMOUS" not in env, f"{stage}: the image must not allow anonymous serving"
    assert "OFFRAMP_API_KEY" not in env, f"{stage}: no key may be baked into the image"
    offramp = {k: v for k, v in env.items() if k.startswith("OFFRAMP_")}
    assert anonymous_exposure(settings_from(offramp)) is not None
    assert anonymous_exposure(settings_from({**offramp, "OFFRAMP_API_KEY": "k"})) is None


def test_container_test_serves_on_loopback_so_it_needs_no_key():
    """tests/deploy/container_test.sh runs the image's CMD without a key, so it must bind loopback
    (OFFRAMP_HOST=127.0.0.1 through `buildah config --env`), which the server allows."""
    from app.auth import anonymous_exposure

    script = (ROOT / "tests" / "deploy" / "container_test.sh").read_text()
    overrides = dict(re.findall(r"--env (OFFRAMP_\w+)=([^\s\"$]+)(?=\s)", script))
    assert overrides.get("OFFRAMP_HOST"), "container_test.sh no longer sets OFFRAMP_HOST"
    env = {k: v for k, v in DOCKERFILE.stage("runtime").env().items() if k.startswith("OFFRAMP_")}
    assert anonymous_exposure(settings_from({**env, **overrides})) is None, \
        f"container_test.sh serves {overrides['OFFRAMP_HOST']} without a key: the server will refuse"
