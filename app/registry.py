"""Model bundles found in the model directory: verified, loaded, warmed up, served by name.

Layout: `MODEL_DIR/NAME/` is a bundle (version 1), or `MODEL_DIR/NAME/1/`, `MODEL_DIR/NAME/2/`
... are its versions; the highest version is served unless a request names another. MODEL_DIR
may itself be a single bundle. Reloading swaps a version in only once it has loaded and
verified; a bundle that fails keeps the version already serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from app.batcher import Batcher
from app.controller import ThresholdController
from app.bundle import open_encoder, open_engine
from app.cascade import CascadeEncoder, CascadeEngine
from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest
from app.multitask import MultiTaskEngine, warm_up_batch

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    manifest: Manifest
    encoder: TextEncoder | CascadeEncoder  # or a generation bundle's GenerationEncoder
    engine: Engine | CascadeEngine | MultiTaskEngine  # or its GenerationEngine
    batcher: Batcher | None = None
    controller: ThresholdController | None = None  # with OFFRAMP_TARGET_P99_MS
    fingerprint: str = ""  # the manifest's file digests: a changed bundle is reloaded

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def is_multitask(self) -> bool:
        return self.manifest.tasks is not None

    @property
    def is_generation(self) -> bool:
        """Served by generate (app/generation_service.py), not by predict or /v2 infer."""
        return self.manifest.is_generation


def _fingerprint(manifest: Manifest) -> str:
    """Changes with any change of the manifest, which lists every file's sha256."""
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()


def load_model(path: Path, provider: str = "cpu", intra_op_threads: int | None = None,
               name: str | None = None, version: int = 1) -> LoadedModel:
    """Verify every file against the manifest, open the sessions and warm every layer up."""
    path = Path(path)
    manifest = read_manifest(path, verify_files=True)
    encoder = open_encoder(path, manifest)
    engine = open_engine(path, manifest, provider=provider, intra_op_threads=intra_op_threads)
    if manifest.is_generation:
        engine.warm_up()  # its own decoding loop knows what every graph needs to see once
    else:
        warm = warm_up_batch(manifest, encoder) if manifest.tasks else \
            encoder.encode([("warm up", "warm up")] if manifest.text_pair else ["warm up"] * 2)
        engine.run(warm, threshold=np.float32(0.0))
    # Served under its folder name, so models/NAME is /v1/models/NAME whatever it was trained as.
    return LoadedModel(name or path.name, version, path, manifest, encoder, engine,
                       fingerprint=_fingerprint(manifest))


def find_versions(model_path: Path) -> dict[int, Path]:
    """{version: bundle folder} of one model folder."""
    if (model_path / MANIFEST_NAME).is_file():
        return {1: model_path}
    versions = {}
    if model_path.is_dir():
        for sub in model_path.iterdir():
            if sub.name.isdigit() and (sub / MANIFEST_NAME).is_file():
                versions[int(sub.name)] = sub
    return versions


def find_models(model_dir: Path) -> dict[str, Path]:
    """{name: model folder}: model_dir itself when it is a bundle, else its sub-folders."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST_NAME).is_file():
        return {model_dir.name: model_dir}
    if not model_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(model_dir.iterdir()) if p.is_dir() and find_versions(p)}


def find_bundles(model_dir: Path) -> list[Path]:
    """Latest version's folder of every model."""
    return [versions[max(versions)] for versions in map(find_versions, find_models(model_dir).values())]


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


class Registry:
    def __init__(self, model_dir: Path, default: str | None = None, provider: str = "cpu",
                 intra_op_threads: int | None = None,
                 make_batcher: Callable[[LoadedModel], Batcher] | None = None):
        self.model_dir = Path(model_dir)
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        self.requested_default = default
        self.make_batcher = make_batcher
        self.versions: dict[str, dict[int, LoadedModel]] = {}
        self.errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # -- lookup ----------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, LoadedModel]:
        """The latest loaded version of every model."""
        return {name: v[max(v)] for name, v in self.versions.items() if v}

    @property
    def default_name(self) -> str | None:
        if self.requested_default:
            return self.requested_default if self.requested_default in self.versions else None
        # /v1/predict classifies: a generation bundle is never the default unless asked for.
        models = self.models
        names = sorted(models, key=lambda n: (models[n].is_generation, n))
        return next(iter(names), None)

    def get(self, name: str, version: int | None = None) -> LoadedModel | None:
        versions = self.versions.get(name) or {}
        if not versions:
            return None
        return versions.get(version if version is not None else max(versions))

    def is_known(self, name: str) -> bool:
        """Loaded, or on disk and failed: a name worth its own metric label (others share one)."""
        return name in self.versions or any(key.split("/")[0] == name for key in self.errors)

    def all_loaded(self) -> list[LoadedModel]:
        return [m for v in self.versions.values() for m in v.values()]

    # -- loading ---------------------------------------------------------------------------
    def _load(self, name: str, version: int, path: Path) -> LoadedModel:
        model = load_model(path, self.provider, self.intra_op_threads, name, version)
        m = model.manifest
        kind = ("generation" if m.is_generation else f"tasks {[t.name for t in m.tasks]}" if m.tasks
                else f"labels {m.labels}")
        log.info("loaded %s version %d from %s (%d layers, %s, provider %s, %s threads)",
                 name, version, path, m.num_layers, kind, getattr(model.engine, "active_provider", self.provider),
                 getattr(model.engine, "intra_op_threads", self.intra_op_threads))
        return model

    def _start(self, model: LoadedModel) -> None:
        if self.make_batcher is not None:
            model.batcher = self.make_batcher(model)
            model.batcher.start()

    async def load_all(self) -> ReloadReport:
        return await self.reload(None)

    def public_error(self, exc: BaseException) -> str:
        """Why a bundle failed, for clients: paths relative to the model folder (the server's
        own layout is nobody's business), the exception type where the message alone is vague."""
        message = str(exc).strip() or type(exc).__name__
        if not isinstance(exc, (ManifestError, OSError)):
            message = f"{type(exc).__name__}: {message}"
        for root in sorted({str(self.model_dir.resolve()), str(self.model_dir)}, key=len, reverse=True):
            message = message.replace(root + "/", "").replace(root, ".")
        return message.splitlines()[0][:500]

    def _scan(self) -> dict[str, Path]:
        try:
            return find_models(self.model_dir)
        except OSError as exc:
            log.error("cannot read the model folder %s: %s", self.model_dir, exc)
            return {}

    async def reload(self, only: str | None = None) -> ReloadReport:
        """Load new or changed versions (of one model, or all), verifying each before it serves;
        the version being replaced drains its queue before it goes. A bundle that fails in any
        way (files, manifest, tokenizer, sessions, warm-up) is reported and skipped."""
        from app.threads import in_worker

        report = ReloadReport()
        async with self._lock:
            found = self._scan()
            failed_names = {key.split('/')[0] for key in self.errors}
            names = [only] if only else sorted(set(found) | set(self.versions) | failed_names)
            for name in names:
                try:
                    on_disk = find_versions(found[name]) if name in found else {}
                except OSError as exc:
                    log.error("cannot read model folder %s: %s", found[name], exc)
                    on_disk = {}
                serving = self.versions.get(name, {})
                for version, path in sorted(on_disk.items()):
                    key = f"{name}/{version}"
                    current = serving.get(version)
                    try:
                        manifest = read_manifest(path, verify_files=False)
                        if current is not None and current.fingerprint == _fingerprint(manifest):
                            report.unchanged.append(key)
                            continue
                        model = await in_worker(self._load, name, version, path)
                    except Exception as exc:  # noqa: BLE001 - any bad bundle is skipped, never fatal
                        report.failed[key] = self.errors[key] = self.public_error(exc)
                        log.error("bundle %s not loaded%s: %s", path,
                                  "; the loaded one keeps serving" if current else "", exc)
                        continue
                    self._start(model)
                    self.versions.setdefault(name, {})[version] = model
                    self.errors.pop(key, None)
                    report.loaded.append(key)
                    if current is not None:
                        await self._retire(current)
                for version in sorted(set(serving) - set(on_disk)):
                    report.removed.append(f"{name}/{version}")
                    await self._retire(self.versions[name].pop(version))
                for key in [k for k in self.errors if k.split("/")[0] == name]:
                    if int(key.split("/")[1]) not in on_disk:  # a failed bundle that is gone
                        del self.errors[key]
                if name in self.versions and not self.versions[name]:
                    del self.versions[name]
        return report

    async def _retire(self, model: LoadedModel) -> None:
        if model.batcher is not None:
            await model.batcher.stop()

    async def stop(self) -> None:
        """Finish every queued request of every model."""
        for model in self.all_loaded():
            await self._retire(model)

    async def watch(self, interval_s: float) -> None:
        """Poll the model directory and reload what changed (the file-watch form of reload)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                report = await self.reload()
            except Exception:  # the watcher must outlive any one bad scan
                log.exception("model directory scan failed")
                continue
            if report.loaded or report.failed or report.removed:
                log.info("model directory changed: %s", report)
