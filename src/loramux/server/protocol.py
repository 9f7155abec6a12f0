"""OpenAI-compatible request and response schemas, the translation of requests into engine
requests, and the error shape.

The request models validate what the server accepts (a value outside them is a 400 naming the
field); the response models only describe what the handlers return, for the OpenAPI schema that
clients and the fuzz test (tests/test_fuzz_api.py) read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.config import LORA_TARGETS
from loramux.engine.requests import SLO
from loramux.engine.sampling import SamplingParams
from loramux.training.config import TrainingConfig
from loramux.lora.adapter import MAX_RANK

# an adapter name has no '/', '\\' or NUL (it names a model and a catalog entry; see LoraAdapter)
ADAPTER_NAME_PATTERN = r"^[^/\\\x00]*$"


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class LatencyTargets(BaseModel):
    """loramux's extra field `slo`: per-request targets in seconds."""

    ttft: float | None = Field(default=None, gt=0)
    tpot: float | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both completion routes (OpenAI's, then vLLM-style extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extras, as vLLM names them
    top_k: int = Field(default=0, ge=0)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    slo: LatencyTargets | None = None

    def sampling(self, index: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters for choice `index` (a seed is offset per choice)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                seed=None if self.seed is None else self.seed + index, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                min_tokens=min(self.min_tokens, max_tokens), ignore_eos=self.ignore_eos, logprobs=logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None

    def slo_for(self, default: SLO) -> SLO:
        if self.slo is None:
            return default
        return SLO(ttft=self.slo.ttft or default.ttft, tpot=self.slo.tpot or default.tpot)


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """`prompt`: a text, texts, token ids, or lists of token ids, none empty. Token ids must be
    below the model's vocabulary size, and prompt plus max_tokens within its context (400 if not)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class Hyperparameters(BaseModel):
    """OpenAI's bounds: 1 to 50 epochs, batches of 1 to 256, a positive learning rate multiplier."""

    model_config = ConfigDict(extra="ignore")

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"] = "auto"


class LoraOptions(BaseModel):
    """loramux's extra field `lora` on fine-tuning jobs (the checks of LoraConfig, stated here so
    that a bad value is refused naming its field)."""

    r: int = Field(default=16, ge=1, le=MAX_RANK)
    alpha: float = Field(default=32.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)] = "all-linear"
    use_rslora: bool = False


class TrainingOptions(BaseModel):
    """loramux's extra field `training` on fine-tuning jobs (beside OpenAI's hyperparameters): the
    rest of TrainingConfig, under its names and with its defaults (jobs checkpoint every 10 steps
    or 60 s of training unless told otherwise; 0 turns a trigger off)."""

    max_steps: int | None = Field(default=None, ge=1)
    gradient_accumulation: int = Field(default=TrainingConfig.gradient_accumulation, ge=1)
    micro_batch_tokens: int = Field(default=TrainingConfig.micro_batch_tokens, ge=2)
    lr_schedule: Literal["constant", "linear", "cosine"] = TrainingConfig.lr_schedule
    warmup_steps: int = Field(default=TrainingConfig.warmup_steps, ge=0)
    weight_decay: float = Field(default=TrainingConfig.weight_decay, ge=0, allow_inf_nan=False)
    max_grad_norm: float | None = Field(default=TrainingConfig.max_grad_norm, gt=0, allow_inf_nan=False)
    eval_every: int = Field(default=TrainingConfig.eval_every, ge=0)
    checkpoint_every: int = Field(default=TrainingConfig.checkpoint_every, ge=0)
    checkpoint_interval: float = Field(default=TrainingConfig.checkpoint_interval, ge=0, allow_inf_nan=False)


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(default=None, max_length=64, pattern=ADAPTER_NAME_PATTERN)
    seed: int | None = None
    lora: LoraOptions = Field(default_factory=LoraOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, pattern=ADAPTER_NAME_PATTERN)
    lora_path: str = Field(min_length=1)
    pinned: bool = False


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# --- responses (described for the OpenAPI schema; the handlers return plain dicts) --------------
class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error's body, OpenAI's shape."""

    error: ErrorObject


ERROR_MEANINGS = {400: "invalid request", 401: "missing or wrong API key", 404: "no such model, file, job or route",
                  405: "wrong method for the route", 409: "the adapter is in use", 413: "the body or file is too large",
                  429: "too many requests in the queue, or every resident adapter busy", 500: "the server or the engine failed"}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` entries for these error statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_MEANINGS[s]} for s in statuses}


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    resident: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One event of a streamed completion (the usage event has no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion (the usage event has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def event_stream(chunk: type[BaseModel]) -> dict:
    """OpenAPI content of a stream of `chunk` events that ends with [DONE], after an error event if
    the request failed. The app adds STREAM_CHUNKS to the schema's components."""
    def ref(model: type[BaseModel]) -> dict:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                             "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]}}]}
    return {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class JobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    trained_tokens: int | None
    error: JobError | None
    seed: int
    user_provided_suffix: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    lora: LoraOptions
    training: TrainingOptions
    adapter_name: str


class FineTuningJobList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class JobEventList(BaseModel):
    object: Literal["list"]
    data: list[JobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None
    valid_loss: float | None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    fine_tuning_job_id: str
    metrics: CheckpointMetrics


class JobCheckpointList(BaseModel):
    object: Literal["list"]
    data: list[JobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


class AdapterStatus(BaseModel):
    object: Literal["lora_adapter"]
    lora_name: str
    loaded: bool
