"""Model bundles found in the model directory, each verified, loaded and warmed up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import MANIFEST_NAME, ManifestError, Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    manifest: Manifest
    encoder: TextEncoder
    engine: Engine

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def load_model(path: Path, provider: str = "cpu", intra_op_threads: int | None = None) -> LoadedModel:
    """Verify every file against the manifest, open the sessions and warm every layer up."""
    manifest = read_manifest(path, verify_files=True)
    encoder = TextEncoder.from_file(path / manifest.tokenizer, manifest.max_seq_length)
    engine = Engine(path, manifest, provider=provider, intra_op_threads=intra_op_threads)
    warm = encoder.encode([("warm up", "warm up")] if manifest.text_pair else ["warm up"] * 2)
    engine.run(warm, threshold=np.float32(0.0))
    # Served under its folder name, so models/NAME is /v1/models/NAME whatever it was trained as.
    return LoadedModel(Path(path).name, Path(path), manifest, encoder, engine)


def find_bundles(model_dir: Path) -> list[Path]:
    """The bundle itself when model_dir is one, else each sub-folder holding a manifest."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST_NAME).is_file():
        return [model_dir]
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if (p / MANIFEST_NAME).is_file())


class Registry:
    def __init__(self, model_dir: Path, default: str | None = None, provider: str = "cpu",
                 intra_op_threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        self.requested_default = default
        self.models: dict[str, LoadedModel] = {}
        self.errors: dict[str, str] = {}

    def load_all(self) -> None:
        for path in find_bundles(self.model_dir):
            try:
                model = load_model(path, self.provider, self.intra_op_threads)
            except (ManifestError, OSError, ValueError, RuntimeError) as exc:
                # One bad bundle is reported and skipped; the others still serve.
                self.errors[path.name] = str(exc)
                log.error("bundle %s not loaded: %s", path, exc)
                continue
            self.models[model.name] = model
            log.info("loaded %s from %s (%d layers, labels %s, provider %s, %d threads)",
                     model.name, path, model.manifest.num_layers, model.labels,
                     model.engine.active_provider, model.engine.intra_op_threads)

    @property
    def default_name(self) -> str | None:
        if self.requested_default:
            return self.requested_default if self.requested_default in self.models else None
        return next(iter(self.models), None)

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)
