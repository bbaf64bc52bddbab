"""k8s/training/: the cluster training job renders, validates against the Kubernetes schemas
offline, and agrees with itself and with `offramp train` (the pods can find pod 0's
rendezvous; the command is one the real parser accepts; the resumable state is on the shared
volume that the resume check reads)."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from tests.deploy.manifests import K8S, kubectl, load_files, one, render

TRAINING = K8S / "training"
needs_kubectl = pytest.mark.skipif(kubectl() is None, reason="kubectl not installed (.ci/run installs it)")


def _as_written() -> list[dict]:
    import yaml

    kustomization = yaml.safe_load((TRAINING / "kustomization.yaml").read_text())
    return load_files(*(TRAINING / r for r in kustomization["resources"]))


SOURCES = ["as-written", pytest.param("rendered", marks=needs_kubectl)]


def _docs(source: str) -> list[dict]:
    return _as_written() if source == "as-written" else list(render("training"))


@pytest.mark.parametrize("source", SOURCES)
def test_the_training_job_matches_kubernetes_schemas(source):
    from tests.deploy.test_k8s_manifests import _validate

    docs = _docs(source)
    assert {d["kind"] for d in docs} == {"Job", "Service", "PersistentVolumeClaim"}
    _validate(docs)


def _script(job: dict) -> tuple[dict, str, dict]:
    spec = job["spec"]["template"]["spec"]
    (train,) = spec["containers"]
    assert train["command"] == ["bash", "-c"]
    env = {e["name"]: e["value"] for e in train.get("env", [])}
    return train, train["args"][0], env


def _offramp_args(script: str, env: dict) -> list[str]:
    """The `offramp train ...` arguments of the torchrun line, with the script's variables."""
    state = re.search(r'state="([^"]+)"', script).group(1).replace("$RUN", env["RUN"])
    command = script.split('"$(command -v offramp)"', 1)[1].replace("\\\n", " ")
    command = command.replace('"${resume[@]}"', "").replace('"$state"', state).replace("$RUN", env["RUN"])
    return shlex.split(command)


@pytest.mark.parametrize("source", SOURCES)
def test_every_pod_finds_pod_zeros_rendezvous(source):
    docs = _docs(source)
    job, service = one(docs, "Job"), one(docs, "Service")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    train, script, env = _script(job)
    assert int(env["NNODES"]) == spec["completions"]
    assert int(env["GPUS_PER_NODE"]) == int(train["resources"]["limits"]["nvidia.com/gpu"])
    # The headless Service names pod i `<job>-i.<service>` for the pods of this Job.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    endpoint = re.search(r"--rdzv_endpoint (\S+)", script).group(1)
    host, port = endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) == service["spec"]["ports"][0]["port"] == train["ports"][0]["containerPort"]
    assert '--node_rank "$JOB_COMPLETION_INDEX"' in script and '--nnodes "$NNODES"' in script


@pytest.mark.parametrize("source", SOURCES)
def test_the_command_is_one_offramp_accepts_and_it_resumes_from_the_shared_volume(source):
    from training.cli import register

    docs = _docs(source)
    job, claim = one(docs, "Job"), one(docs, "PersistentVolumeClaim")
    train, script, env = _script(job)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(_offramp_args(script, env))  # exits (fails the test) on an unknown flag
    assert args.command == "train" and args.save_every > 0
    # The state the resume check looks for is the one --save-every writes, on the shared volume.
    state = re.search(r'state="([^"]+)"', script).group(1).replace("$RUN", env["RUN"])
    assert str(args.state_dir) == state and '-f "$state/offramp_state.json"' in script
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    work = volumes[mounts[train["workingDir"]]]
    assert work["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for path in (args.out, args.checkpoint, args.train, args.dev, args.state_dir):
        assert not str(path).startswith("/"), f"{path} is outside the working directory on the shared volume"
