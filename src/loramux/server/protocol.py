"""OpenAI-compatible request schemas, their translation into engine requests, and error shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loramux.engine.requests import SLO
from loramux.engine.sampling import SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
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
    model_config = ConfigDict(extra="ignore")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class LoraOptions(BaseModel):
    """loramux's extra field `lora` on fine-tuning jobs."""

    r: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False


class TrainingOptions(BaseModel):
    """loramux's extra field `training` on fine-tuning jobs (beside OpenAI's hyperparameters)."""

    max_steps: int | None = Field(default=None, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    eval_every: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=0, ge=0)


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = None
    lora: LoraOptions = Field(default_factory=LoraOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    pinned: bool = False


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
