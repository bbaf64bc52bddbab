"""The HTTP API's types: these pydantic models are the API (and its OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

Text = Annotated[str, StringConstraints(min_length=1)]


def _whole_number(value):
    """2.0 is an integer (as JSON Schema says); 2.5, "2" and true are not (strict otherwise)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


LayerCount = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
TextPair = Annotated[list[Text], Field(min_length=2, max_length=2)]


class PredictRequest(BaseModel):
    # Strict: a threshold is a number and a flag a boolean ("0.5", true or "yes" are refused),
    # as on /v2.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"inputs": ["a gripping, beautifully acted film"], "threshold": 0.3}]})

    inputs: list[Union[Text, TextPair]] = Field(
        min_length=1, description="texts, or [text, text_pair] pairs for pair models")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="uncertainty below which a row exits: 0 = full depth, 1 = first exit; "
                    "default: the model's recommended threshold")
    min_layers: LayerCount | None = Field(default=None, description="no exit before this layer")
    max_layers: LayerCount | None = Field(default=None, description="always exit at this layer")
    task: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        default=None, description="multi-task models: the task the inputs are for (required when the model "
                                  "serves several; GET /v1/models lists them)")
    policy: Literal["entropy", "max_prob", "patience"] | None = Field(
        default=None, description="exit rule (docs/serving.md): entropy (FastBERT), max_prob (calibrated "
                                  "top probability), patience (PABEE; with a threshold, PCEE-BERT); default: "
                                  "entropy (a regression task's one rule: patience, PABEE's for regression)")
    patience: LayerCount | None = Field(
        default=None, description="policy patience: consecutive exits that must agree (or, with a threshold, "
                                  "be confident) before a row leaves")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0.0, le=100.0,
        description="a budget instead of a threshold: the fastest setting of the policy whose calibrated "
                    "accuracy is at most this many points below full depth (the response says which)")
    return_probabilities: bool = False
    timeout_ms: float | None = Field(default=None, gt=0, description="deadline: 504 instead of a late answer")


TokenCount = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
NgramSize = Annotated[int, Field(ge=0), BeforeValidator(_whole_number)]


class GenerateRequest(BaseModel):
    """Text generation (a generation model's `POST /v1/models/{model}/generate`). The bounds
    that depend on the model or the server (max_new_tokens below the decoder's positions,
    num_beams up to OFFRAMP_MAX_BEAMS) are checked by the service, each a 422 naming its field."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"inputs": ["the committee met on tuesday and approved the budget"], "threshold": 0.3}]})

    inputs: list[Text] = Field(min_length=1, description="source texts, one output each")
    max_new_tokens: TokenCount | None = Field(
        default=None, description="tokens to generate at most (1 .. the decoder's positions - 1); default: the "
                                  "model's (GET /v1/models lists it)")
    num_beams: TokenCount | None = Field(
        default=None, description="beam search width, 1 = greedy (at most the server's max_beams); default: "
                                  "the model's")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="per-token exit: a token leaves the decoder after the first layer whose uncertainty is "
                    "below it; 0 = every token at full depth; default: the model's recommended threshold")
    no_repeat_ngram_size: NgramSize | None = Field(
        default=None, description="no n-gram of this size is generated twice (0: off); default: the model's")
    timeout_ms: float | None = Field(default=None, gt=0, description="deadline: 504 instead of a late answer")


class GeneratedText(BaseModel):
    text: str
    tokens: list[str] = Field(description="the generated tokens (wordpieces), in order, eos not included")
    exit_layers: list[int] = Field(description="1-based decoder layer each decoding step left at: one per token, "
                                               "and one more for the final eos when the text ended by itself")
    mean_exit_layer: float = Field(description="mean of exit_layers")
    truncated: bool = Field(default=False, description="the source was cut to max_seq_length tokens")


class Prediction(BaseModel):
    label: str | None = Field(default=None, description="the predicted label; none for a regression task")
    label_id: int | None = None
    score: float = Field(description="probability of the predicted label; a regression task's predicted score")
    probabilities: dict[str, float] | None = None
    exit_layer: int = Field(description="1-based layer whose exit answered (a cascade numbers its layers "
                                        "on through its stages)")
    stage: str | None = Field(default=None, description="cascades: the stage that answered")
    stage_layer: int | None = Field(default=None, description="cascades: the exit_layer counted inside its stage")
    uncertainty: float = Field(description="normalised entropy at the exit layer; a regression task: how far "
                                           "the score moved at that exit, as a fraction of its score range")
    truncated: bool = Field(default=False, description="the input was cut to max_seq_length tokens")


class Timing(BaseModel):
    tokenize: float
    queue: float
    inference: float
    total: float


class PredictResponse(BaseModel):
    model: str
    task: str | None = Field(default=None, description="multi-task models: the task that answered")
    threshold: float | None = Field(default=None, description="the threshold used; none for patience alone")
    policy: str = "entropy"
    patience: int | None = None
    predictions: list[Prediction]
    layers_executed: int = Field(description="layers run, summed over rows")
    layers_full: int = Field(description="layers a full-depth run would take: rows x layers")
    warnings: list[str] = Field(default_factory=list)
    timing_ms: Timing


class GenerateResponse(BaseModel):
    model: str
    threshold: float = Field(description="the threshold used")
    max_new_tokens: int
    num_beams: int
    no_repeat_ngram_size: int
    outputs: list[GeneratedText]
    layers_executed: int = Field(description="decoder layers run, summed over every output's exit_layers")
    layers_full: int = Field(description="the decoder's layers: a token's exit layer at full depth")
    warnings: list[str] = Field(default_factory=list)
    timing_ms: Timing


class GenerationInfo(BaseModel):
    """A generation model's decoder and the defaults of a generate request."""

    decoder_layers: int
    encoder_layers: int
    max_target_length: int = Field(description="decoder positions: max_new_tokens is at most this - 1")
    max_new_tokens: int = Field(description="default")
    num_beams: int = Field(description="default")
    max_beams: int = Field(description="the most num_beams this server takes")
    no_repeat_ngram_size: int = Field(description="default")
    vocab_size: int


class StageInfo(BaseModel):
    name: str
    layers: int
    first_layer: int = Field(description="the cascade's number of the stage's first layer")
    exit_head: str
    max_seq_length: int


class TaskInfo(BaseModel):
    name: str
    kind: Literal["classification", "regression"]
    labels: list[str] = Field(description="none for a regression task")
    text_pair: bool
    metric: str = Field(description="what its calibration table counts (and budgets read): accuracy, matthews, "
                                    "f1 or pearson")
    score_range: list[float] | None = Field(default=None, description="regression: [low, high] of its scores")
    recommended_threshold: float
    recommended_patience: int | None = None


class ModelInfo(BaseModel):
    name: str
    task: Literal["classification", "multitask", "generation"] = Field(
        default="classification", description="what it serves: predict (classification, multitask) or generate")
    version: int = Field(description="the version served by default (the latest)")
    versions: list[int]
    labels: list[str]
    layers: int
    text_pair: bool
    max_seq_length: int
    recommended_threshold: float
    exit_head: str
    default: bool
    stages: list[StageInfo] | None = Field(default=None, description="cascades: the bundles run in order")
    tasks: list[TaskInfo] | None = Field(default=None, description="multi-task models: one encoder, these "
                                                                   "tasks (a request names its task)")
    generation: GenerationInfo | None = Field(default=None, description="generation models: the decoder and "
                                                                        "the defaults of a generate request")


class PolicyTable(BaseModel):
    points: list[dict] = Field(description="threshold (or patience), accuracy, mean_exit_layer, ideal_speedup, "
                                           "measured_speedup, agreement")
    recommended_threshold: float | None = None
    recommended_patience: int | None = None


class CalibrationInfo(BaseModel):
    model: str
    task: str | None = Field(default=None, description="multi-task models: the task the tables are of")
    metric: str | None = Field(default=None, description="multi-task models: the task's metric (the points' "
                                                         "`metric`; `accuracy` too where they have it)")
    layers: int
    calibration_data: dict | None = Field(default=None, description="the rows the tables were fitted on")
    policies: dict[str, PolicyTable] = Field(description="entropy (the default), max_prob, patience")


class ModelList(BaseModel):
    models: list[ModelInfo]
    failed: dict[str, str] = Field(default_factory=dict, description="bundles that did not load")


class ReloadResponse(BaseModel):
    model: str
    loaded: list[str] = Field(description="name/version loaded (new or changed)")
    unchanged: list[str]
    failed: dict[str, str] = Field(description="name/version -> why; the version already serving stays")
    removed: list[str]
    serving: list[int] = Field(description="versions serving after the reload")


class ErrorResponse(BaseModel):
    error: str
    error_type: str
    field: str | None = None
