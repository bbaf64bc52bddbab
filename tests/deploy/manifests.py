"""Helpers for the deployment tests: the Dockerfile parsed, the k8s kustomizations rendered,
and the server's real routes and settings to check them against."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# Every folder of k8s/ that `kubectl apply -k` is meant for (the base is rendered through them).
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "variants/hpa-queue-time"]

# OFFRAMP_* names the manifests may set before the server has the setting (none now: the API
# key, OFFRAMP_API_KEY, is a setting and its Secret is required).
PENDING_SETTINGS: set[str] = set()


# ---------------------------------------------------------------------------------------------
# The server: its settings and routes, read from the code itself.

def setting_names() -> set[str]:
    from app.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {(prefix + name).upper() for name in Settings.model_fields}


@lru_cache(maxsize=1)
def routes() -> dict[str, set[str]]:
    """path -> HTTP methods, from the app that `offramp serve` runs (no model is loaded: the
    lifespan does not run)."""
    from fastapi.routing import APIRoute

    from app.server import create_app
    from app.settings import Settings

    app = create_app(Settings(model_dir=ROOT / "does-not-exist"))
    return {r.path: set(r.methods) for r in app.routes if isinstance(r, APIRoute)}


def drain_seconds(config: dict[str, str]) -> float:
    """How long the server may take to drain on SIGTERM under these OFFRAMP_* values: its
    drain-timeout setting where it has one, else the literal app/cli.py passes to uvicorn."""
    from app.settings import Settings

    if "drain_timeout_s" in Settings.model_fields:
        return float(settings_from(config).drain_timeout_s)
    match = re.search(r"timeout_graceful_shutdown\s*=\s*(\d+)", (ROOT / "app" / "cli.py").read_text())
    assert match, "app/cli.py no longer passes timeout_graceful_shutdown to uvicorn"
    return float(match.group(1))


def settings_from(config: dict[str, str]):
    """The server's Settings as these OFFRAMP_* variables (and nothing else) make them."""
    import os
    from unittest import mock

    from app.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
    with mock.patch.dict(os.environ, {**env, **config}, clear=True):
        return Settings()


# ---------------------------------------------------------------------------------------------
# The Dockerfile, parsed into stages of (instruction, arguments).

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            tokens = shlex.split(args)
            if len(tokens) >= 2 and "=" not in tokens[0]:  # legacy `ENV KEY value`
                env[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                env[key] = value
        return env


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in the Dockerfile")


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--")]  # --platform=...
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, eq, value = args.partition("=")
            global_args[key] = value if eq else None
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None (shell form)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# ---------------------------------------------------------------------------------------------
# Kubernetes: kustomizations rendered with `kubectl kustomize`.

def kubectl() -> str | None:
    return shutil.which("kubectl")


@lru_cache(maxsize=None)
def render(kustomization: str) -> tuple[dict, ...]:
    """The documents `kubectl kustomize k8s/<kustomization>` prints."""
    result = subprocess.run([kubectl() or "kubectl", "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def load_files(*paths: Path) -> list[dict]:
    docs = []
    for p in paths:
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def base_without_kustomize() -> list[dict]:
    """The base's resources as written, plus the ConfigMap its generator would make (no hash
    suffix), for the checks that need no kubectl."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = load_files(*(K8S / "base" / r for r in kustomization["resources"]))
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(lit.split("=", 1) for lit in generator.get("literals", []))
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})
    return docs


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str = "offramp") -> dict:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in deployment {deployment['metadata']['name']}")


def config_data(docs, deployment: dict) -> dict[str, str]:
    """The data of the ConfigMaps the container takes its environment from (envFrom)."""
    names = {src["configMapRef"]["name"] for src in container(deployment).get("envFrom", [])
             if "configMapRef" in src}
    data: dict[str, str] = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] in names:
            data.update(d.get("data", {}))
    assert data, f"no ConfigMap data for envFrom {sorted(names)}"
    return data
