"""Open a bundle folder for running: its encoder and its engine, a single bundle, a cascade, a
multi-task bundle or a generation bundle (app/generation.py, imported only for one)."""

from __future__ import annotations

from pathlib import Path

from app.cascade import CascadeEncoder, CascadeEngine
from app.encoding import TextEncoder
from app.engine import GROUP_CALL_COST_TOKENS, Engine
from app.manifest import Manifest, read_manifest
from app.multitask import MultiTaskEngine


def open_encoder(bundle_dir: Path, manifest: Manifest):
    """A multi-task bundle's is the plain TextEncoder: its rows get their task afterwards
    (app/multitask.py TaskBatch, done by the service). A generation bundle's: its source encoder."""
    bundle_dir = Path(bundle_dir)
    if manifest.is_generation:
        from app.generation import GenerationEncoder

        return GenerationEncoder.from_file(bundle_dir / manifest.tokenizer, manifest.max_seq_length)
    if manifest.stages:
        return CascadeEncoder([open_encoder(bundle_dir / s.path, read_manifest(bundle_dir / s.path, verify_files=False))
                               for s in manifest.stages])
    return TextEncoder.from_file(bundle_dir / manifest.tokenizer, manifest.max_seq_length)


def open_engine(bundle_dir: Path, manifest: Manifest | None = None, provider: str = "cpu",
                intra_op_threads: int | None = None, io_binding: bool | None = None,
                group_call_cost_tokens: float | None = GROUP_CALL_COST_TOKENS):
    """A generation bundle's engine takes neither io_binding nor group costs (it has its own
    decoding loop)."""
    manifest = manifest or read_manifest(Path(bundle_dir))
    if manifest.is_generation:
        from app.generation import GenerationEngine

        return GenerationEngine(bundle_dir, manifest, provider=provider, intra_op_threads=intra_op_threads)
    kind = CascadeEngine if manifest.stages else MultiTaskEngine if manifest.tasks else Engine
    return kind(bundle_dir, manifest, provider, intra_op_threads, io_binding, group_call_cost_tokens)
