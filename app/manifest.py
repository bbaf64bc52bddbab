"""The bundle manifest: the one schema the exporter writes and the server reads and verifies.

A bundle is a folder:
    manifest.json     this schema
    tokenizer.json    a `tokenizers` tokenizer
    embeddings.onnx   (input_ids, attention_mask, token_type_ids) -> hidden
    layer_01.onnx ... (hidden, attention_mask) -> (hidden_out, logits of that layer's exit)

A cascade (`offramp cascade`) is a folder of whole bundles under `stages/`, run in order as one
network whose layers are numbered on through the stages; its manifest lists every stage file.

A generation bundle (`offramp train cmlm`) is an encoder-decoder with an exit after every decoder
layer; `generation` (GenerationSpec) lists its graphs and how they are called.

A multi-task bundle (`offramp train multitask`) has one encoder for several tasks: its
layer_NN.onnx are the shared layers alone, (hidden, attention_mask) -> hidden_out, and every task
has its own exit after every layer, heads/TASK/exit_NN.onnx: (hidden, attention_mask) -> logits
([rows, classes], or [rows, 1] for a regression task's score). `tasks` lists them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, Field, model_validator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A bundle that cannot be served: missing file, bad checksum, bad manifest."""


class BundleFile(BaseModel):
    path: str
    sha256: str
    bytes: int


class Graphs(BaseModel):
    embeddings: str
    layers: list[str] = Field(min_length=1)


class Stage(BaseModel):
    """One bundle inside a cascade: its layers are the cascade's first_layer .. last_layer."""

    name: str
    path: str  # its folder inside the cascade bundle
    num_layers: int = Field(ge=1)
    first_layer: int = Field(ge=1)
    exit_head: str
    max_seq_length: int
    # Its exits' logits are divided by it, fitted at `offramp cascade` so that one threshold
    # means one confidence in every stage (a BiLSTM is far more sure of itself than it should be).
    temperature: float = Field(default=1.0, gt=0.0)

    @property
    def last_layer(self) -> int:
        return self.first_layer + self.num_layers - 1


class DataFileRecord(BaseModel):
    path: str
    sha256: str
    rows: int
    # These rows are the part of the file held out of training (training/labels.py
    # CALIBRATION_SEED), this fraction of it; none: the whole file.
    held_out_fraction: float | None = None


class Provenance(BaseModel):
    teacher: str
    train: DataFileRecord | None = None
    dev: DataFileRecord | None = None
    unlabeled: DataFileRecord | None = None
    command: str = ""
    seed: int | None = None
    git_commit: str | None = None
    created: str = ""
    recipe: dict = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    wall_time_s: float | None = None
    checkpoint: str | None = None  # where training left the PyTorch checkpoint (not part of the bundle)
    # How it was trained: {world_size, backend, mixed_precision, device, ...} (training/runtime.py)
    distributed: dict | None = None


class LayerResult(BaseModel):
    layer: int
    accuracy: float


class Verification(BaseModel):
    """Result of comparing every layer's ONNX outputs with PyTorch at export time."""

    passed: bool
    tolerance: float
    max_abs_logit_diff: list[float]
    inputs: list[str]


class CalibrationPoint(BaseModel):
    threshold: float | None  # None: patience alone reads no threshold
    patience: int | None = None
    accuracy: float | None  # None: a regression task (its `metric` is the score)
    mean_exit_layer: float
    ideal_speedup: float
    measured_speedup: float | None = None
    agreement: float | None = None  # rows whose answer is full depth's (what the audit monitor expects)
    # A multi-task bundle's task: the value of its metric (TaskHead.metric) at this setting.
    metric: float | None = None


class PolicyCalibration(BaseModel):
    """The calibration table of one exit policy other than the default (entropy, whose table is
    the manifest's `calibration`) and the setting requests of that policy get by default."""

    points: list[CalibrationPoint]
    recommended_threshold: float | None = None
    recommended_patience: int | None = None


TASK_METRICS = ("accuracy", "matthews", "f1", "pearson")


class TaskLayerResult(BaseModel):
    layer: int
    metrics: dict[str, float]  # every GLUE metric of the task at this exit (training/glue_metrics.py)


class TaskHead(BaseModel):
    """One task of a multi-task bundle: its exit heads over the shared layers, its labels (or a
    regression score), and its own calibration.

    Classification rows leave by the request's policy, as in a single-task bundle. Regression
    rows leave by PABEE's rule for regression: after `patience` consecutive exits whose score
    moved less than threshold x (score_range[1] - score_range[0]) from the exit before (so the
    threshold means the same 0 = full depth, 1 = as early as patience allows)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["classification", "regression"] = "classification"
    labels: list[str] = Field(default_factory=list)  # served names; none for regression
    source_labels: list[str] | None = None
    text_pair: bool = False
    metric: Literal["accuracy", "matthews", "f1", "pearson"] = "accuracy"  # what calibration keeps
    exits: list[str] = Field(min_length=1)  # heads/TASK/exit_NN.onnx, one per shared layer
    score_range: tuple[float, float] | None = None  # regression: the training labels' min and max
    exit_temperatures: list[float] | None = None  # max_prob's, per exit (classification)
    recommended_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    recommended_patience: int | None = None  # regression: its rule's patience
    # how the recommended setting was chosen (training/export_multitask.py CalibrationRule)
    calibration_rule: dict[str, str | float | int] | None = None
    calibration: list[CalibrationPoint] = Field(default_factory=list)
    policies: dict[str, PolicyCalibration] = Field(default_factory=dict)
    dev_results: list[TaskLayerResult] = Field(default_factory=list)
    # Dev metrics with exits at the recommended setting, and the wall-time speed-up against full
    # depth measured on dev at export (calibration rows are held out of training, not dev).
    dev_at_recommended: dict[str, float] = Field(default_factory=dict)
    calibration_data: DataFileRecord | None = None
    train: DataFileRecord | None = None
    dev: DataFileRecord | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskHead:
        if self.kind == "classification" and len(self.labels) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least two labels")
        if self.kind == "regression":
            if self.labels:
                raise ValueError(f"task {self.name!r}: a regression task has no labels")
            if self.score_range is None or not self.score_range[1] > self.score_range[0]:
                raise ValueError(f"task {self.name!r}: a regression task needs score_range [low, high]")
            if self.metric != "pearson":
                raise ValueError(f"task {self.name!r}: a regression task is scored by pearson")
        return self

    @property
    def width(self) -> int:
        """Columns of its heads' logits."""
        return 1 if self.kind == "regression" else len(self.labels)


class GenerationPoint(BaseModel):
    """Dev ROUGE and depth of greedy decoding at one per-token exit threshold."""

    threshold: float
    rouge1: float
    rouge2: float
    rougeL: float
    mean_exit_layer: float  # decoder layers per generated token
    ideal_speedup: float  # decoder layers at full depth / mean_exit_layer
    measured_speedup: float | None = None  # whole generate call's wall time, full depth / this threshold
    decoder_speedup: float | None = None  # the same of the time in decoder layers and cache fills


class GenerationSpec(BaseModel):
    """The graphs of a generation bundle and how the engine (app/generation.py) calls them.

    encoder:    (input_ids, attention_mask) [rows, S] int64 -> memory [rows, S, d]
    cross_kv:   (memory) -> cross_key, cross_value [layers, rows, heads, S, head_dim]
    embed:      (token_ids, positions) [rows] int64 -> hidden [rows, d]
    layers[i]:  (hidden [rows, d], past_key, past_value [rows, heads, t, head_dim],
                 cross_key, cross_value [rows, heads, S, head_dim], attention_mask [rows, S])
                -> hidden_out [rows, d], present_key, present_value [rows, heads, t+1, head_dim],
                   exit_hidden [rows, d] (the exit's normalised state), exit_uncertainty [rows]
    kv_fill[i]: (hidden [rows, d]) -> key, value [rows, heads, 1, head_dim]: layer i's self-attention
                entries computed from a state that left before layer i (CALM state propagation)
    kv_fill_from[j]: (hidden [rows, d]) -> key, value [layers - j, rows, heads, 1, head_dim]: the
                entries of layers j, j+1, ... at once, kv_fill[j:] in one graph (one call for all
                the layers a token skips); bundles made before it have none (kv_fill per layer)
    projection: (exit_hidden [rows, d], k [1] int64) -> log_probs [rows, vocab] (shared by every exit),
                top_log_probs, top_ids [rows, k] (each row's k best, best first, ties by lower id);
                bundles made before the TopK have exit_hidden in and log_probs out only
    A token leaves after layer i < layers when exit_uncertainty < the request's threshold.
    """

    encoder: str
    cross_kv: str
    embed: str
    layers: list[str] = Field(min_length=1)
    kv_fill: list[str] = Field(min_length=1)
    kv_fill_from: list[str] | None = None
    projection: str
    num_encoder_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=4)
    max_target_length: int = Field(ge=2)  # positions the decoder has (max_new_tokens' bound)
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    # Defaults of a request that sets none (the dev calibration decodes with them).
    max_new_tokens: int = Field(ge=1)
    num_beams: int = Field(default=1, ge=1)
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    length_penalty: float = 1.0
    calibration: list[GenerationPoint] = Field(default_factory=list)
    full_depth: GenerationPoint | None = None  # dev ROUGE at threshold 0

    def files(self) -> set[str]:
        return {self.encoder, self.cross_kv, self.embed, *self.layers, *self.kv_fill, *(self.kv_fill_from or ()),
                self.projection}


class QuantizationReport(BaseModel):
    method: str
    source_bytes: int
    fp32_dev_accuracy: list[float]  # per layer, full depth last
    int8_dev_accuracy: list[float]
    batch_dependence: float | None = None  # max |prob diff| of a row between two batchings


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str
    task: Literal["classification", "multitask", "generation"] = "classification"
    # Served names, the index is the class id; a multi-task bundle has none (its tasks have).
    labels: list[str] = Field(default_factory=list)
    # The labels as written in the training file, in class-id order ("0", "1" for SST-2 served
    # as "negative", "positive"); data files are mapped to class ids through this.
    source_labels: list[str] | None = None
    text_pair: bool = False
    max_seq_length: int = Field(gt=2)
    num_layers: int = Field(ge=1)
    hidden_size: int
    exit_head: str
    teacher_head: str | None = None
    uncertainty: Literal["normalized_entropy"] = "normalized_entropy"
    # Per exit, the temperature that calibrates its probabilities for the max_prob policy
    # (app/policies.py); none: 1 for every exit.
    exit_temperatures: list[float] | None = None
    recommended_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    tokenizer: str = "tokenizer.json"
    graphs: Graphs | None = None  # a single bundle's graphs; a cascade has stages instead
    stages: list[Stage] | None = None
    tasks: list[TaskHead] | None = None  # a multi-task bundle's tasks (task == "multitask")
    generation: GenerationSpec | None = None  # a generation bundle's graphs (task == "generation")
    files: list[BundleFile]
    quantization: QuantizationReport | None = None
    provenance: Provenance
    dev_results: list[LayerResult] = Field(default_factory=list)
    verification: Verification | None = None
    calibration: list[CalibrationPoint] = Field(default_factory=list)
    # max_prob and patience (app/policies.py), fitted on the same rows as `calibration`
    policies: dict[str, PolicyCalibration] = Field(default_factory=dict)
    # The rows the calibration was fitted on: evaluation on other rows is out of sample.
    calibration_data: DataFileRecord | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )
        if (self.task == "generation") != (self.generation is not None):
            raise ValueError("a generation manifest has its generation graphs, and only it has")
        if self.generation is not None:
            return self._check_generation()
        if (self.graphs is None) == (self.stages is None):
            raise ValueError("a manifest has either graphs (one bundle) or stages (a cascade)")
        if (self.task == "multitask") != (self.tasks is not None):
            raise ValueError("a multitask manifest lists its tasks, and only it does")
        if self.tasks is None and len(self.labels) < 2:
            raise ValueError("labels: at least two are needed")
        if self.stages is not None:
            needed = self._check_stages()
        elif self.tasks is not None:
            needed = self._check_tasks()
        else:
            if len(self.graphs.layers) != self.num_layers:
                raise ValueError(
                    f"num_layers is {self.num_layers} but graphs.layers lists {len(self.graphs.layers)}"
                )
            needed = {self.tokenizer, self.graphs.embeddings, *self.graphs.layers}
        listed = {f.path for f in self.files}
        missing = sorted(needed - listed)
        if missing:
            raise ValueError(f"files does not list {missing}")
        return self

    def _check_generation(self) -> Manifest:
        g = self.generation
        if self.graphs is not None or self.stages is not None or self.tasks is not None:
            raise ValueError("a generation bundle has generation graphs only (no graphs, stages or tasks)")
        if not (len(g.layers) == len(g.kv_fill) == self.num_layers):
            raise ValueError(f"num_layers is {self.num_layers} but generation lists {len(g.layers)} layers "
                             f"and {len(g.kv_fill)} kv_fill graphs")
        if g.kv_fill_from is not None and len(g.kv_fill_from) != self.num_layers:
            raise ValueError(f"num_layers is {self.num_layers} but generation lists {len(g.kv_fill_from)} "
                             "kv_fill_from graphs")
        missing = sorted((g.files() | {self.tokenizer}) - {f.path for f in self.files})
        if missing:
            raise ValueError(f"files does not list {missing}")
        return self

    @property
    def is_generation(self) -> bool:
        return self.generation is not None

    def _check_stages(self) -> set[str]:
        if len(self.stages) < 2:
            raise ValueError("a cascade has at least two stages")
        first = 1
        for stage in self.stages:
            if stage.first_layer != first:
                raise ValueError(f"stage {stage.name!r} starts at layer {stage.first_layer}, expected {first}")
            first += stage.num_layers
        if first - 1 != self.num_layers:
            raise ValueError(f"num_layers is {self.num_layers} but the stages have {first - 1}")
        return {f"{stage.path}/{MANIFEST_NAME}" for stage in self.stages}

    def _check_tasks(self) -> set[str]:
        if self.stages is not None or self.graphs is None:
            raise ValueError("a multi-task bundle has graphs (its shared layers), not stages")
        if not self.tasks:
            raise ValueError("tasks: at least one is needed")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        needed = {self.tokenizer, self.graphs.embeddings, *self.graphs.layers}
        for t in self.tasks:
            if len(t.exits) != self.num_layers:
                raise ValueError(f"task {t.name!r} has {len(t.exits)} exits for {self.num_layers} layers")
            needed.update(t.exits)
        return needed

    def task_index(self, name: str) -> int | None:
        """The position of task `name` in `tasks`; None when it has none of that name."""
        return next((i for i, t in enumerate(self.tasks or []) if t.name == name), None)

    def stage_of(self, layer: int) -> tuple[Stage, int] | None:
        """The stage a cascade layer (1-based) belongs to, and its number inside that stage."""
        for stage in self.stages or []:
            if layer <= stage.last_layer:
                return stage, layer - stage.first_layer + 1
        return None

    def label_ids(self, raw_labels: Iterable[str]) -> list[int]:
        """Class ids of labels as a data file writes them (or as the model serves them)."""
        index = {name: i for i, name in enumerate(self.labels)}
        index.update({raw: i for i, raw in enumerate(self.source_labels or [])})
        ids, unknown = [], set()
        for label in raw_labels:
            if label in index:
                ids.append(index[label])
            else:
                unknown.add(label)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not among the model's labels "
                             f"{self.source_labels or self.labels}")
        return ids


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(bundle_dir: Path, relative: str) -> BundleFile:
    path = bundle_dir / relative
    return BundleFile(path=relative, sha256=sha256_of(path), bytes=path.stat().st_size)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(bundle_dir: Path, verify_files: bool = True) -> Manifest:
    """Parse and check a bundle's manifest; with verify_files, every file's size and sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no {MANIFEST_NAME}")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ManifestError(f"{path}: invalid manifest: {exc}") from exc
    if verify_files:
        for entry in manifest.files:
            file = bundle_dir / entry.path
            if not file.is_file():
                raise ManifestError(f"{bundle_dir}: missing file {entry.path}")
            if file.stat().st_size != entry.bytes or sha256_of(file) != entry.sha256:
                raise ManifestError(f"{bundle_dir}: {entry.path} does not match its sha256")
    return manifest
