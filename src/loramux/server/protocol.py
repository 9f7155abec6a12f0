"""OpenAI-compatible request and response schemas, the translation of requests into engine
requests, and the error shape.

The request models validate what the server accepts (a value outside them is a 400 naming the
field); the response models only describe what the handlers return, for the OpenAPI schema that
clients and the fuzz test (tests/test_fuzz_api.py) read.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from loramux.config import LORA_TARGETS
from loramux.engine.requests import SLO
from loramux.engine.sampling import MAX_LOGPROBS, SamplingParams
from loramux.structured.spec import StructuredSpec
from loramux.training.config import TrainingConfig
from loramux.lora.adapter import MAX_RANK

# an adapter name has no '/', '\\' or NUL (it names a model and a catalog entry; see LoraAdapter)
ADAPTER_NAME_PATTERN = r"^[^/\\\x00]*$"


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# a token id: an integer, never a boolean (JSON's true is not token 1)
TokenId = Annotated[int, Strict(), Field(ge=0)]


class RequestModel(BaseModel):
    """The base of every request body: a field it does not declare is refused (a 400 naming it,
    e.g. `service_tier` or `hyperparameters.foo`), so nothing is silently ignored; and an explicit
    null on an optional field means that field's default, as OpenAI's and vLLM's servers take it
    (`"temperature": null` is temperature 1). A null on a required field is still refused, and
    fields named in NULL_IS_VALUE take null as a value of their own."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema, model: _nullable_optionals(schema))
    NULL_IS_VALUE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {field.alias or name for name, field in cls.model_fields.items()
                    if not field.is_required() and name not in cls.NULL_IS_VALUE}
        return {k: v for k, v in data.items() if v is not None or k not in optional}


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """The JSON schema of a request model says what it accepts: null too, for an optional field."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        if name in required or field.get("type") == "null" or {"type": "null"} in field.get("anyOf", ()):
            continue
        outer = {key: field.pop(key) for key in ("title", "description", "default") if key in field}
        schema["properties"][name] = {"anyOf": [field, {"type": "null"}], **outer}


def refuse(param: str, message: str) -> None:
    """A request whose fields contradict each other: a 400 naming `param` (raised from a model's
    after-validator, it reaches the app's APIError handler as is)."""
    raise APIError(400, f"{param}: {message}", param=param)


class LatencyTargets(RequestModel):
    """loramux's extra field `slo`: per-request targets in seconds."""

    ttft: float | None = Field(default=None, gt=0)
    tpot: float | None = Field(default=None, gt=0)


class StreamOptions(RequestModel):
    include_usage: bool = False


TokenBias = Annotated[str, Field(pattern=r"^[0-9]+$")]  # a token id, as a JSON object key
JsonSchema = dict[str, Any] | bool


class StructuredOutputs(RequestModel):
    """vLLM's extra `structured_outputs`: exactly one of `json` (a JSON schema, or its JSON text),
    `regex`, `choice` (the output is one of these strings) and `grammar` (EBNF `root ::= ...`, or
    Lark `start: ...`)."""

    json_: JsonSchema | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            refuse("structured_outputs", f"give exactly one of json, regex, choice and grammar (got {len(given)})")
        return self

    def spec(self) -> tuple[StructuredSpec, str]:
        """The constraint, and the field to name if it does not compile."""
        if self.json_ is not None:
            try:
                return StructuredSpec.json_schema(self.json_), "structured_outputs.json"
            except ValueError as e:  # JSON text that does not parse
                raise APIError(400, f"structured_outputs.json: not a JSON schema: {e}", param="structured_outputs.json") from None
        if self.regex is not None:
            return StructuredSpec.regex(self.regex), "structured_outputs.regex"
        if self.choice is not None:
            return StructuredSpec.choice(self.choice), "structured_outputs.choice"
        return StructuredSpec.grammar(self.grammar), "structured_outputs.grammar"


class SamplingFields(RequestModel):
    """Fields shared by both completion routes (OpenAI's, then vLLM-style extras)."""

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
    # OpenAI's opaque end-user id, for the caller's own abuse tracking: accepted, and nothing to do
    user: str | None = None
    logit_bias: dict[TokenBias, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # extras, as vLLM names them
    top_k: int = Field(default=0, ge=-1)  # -1 or 0: off
    min_p: float = Field(default=0.0, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    structured_outputs: StructuredOutputs | None = None
    slo: LatencyTargets | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            refuse("stream_options", "only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            refuse("prompt_logprobs", "not available when stream is true")
        return self

    def scored_prompt_logprobs(self) -> int | None:
        """How many alternatives the engine computes for each prompt token (None: no prompt
        log-probabilities); completions' echo asks for them too."""
        return self.prompt_logprobs

    def sampling(self, index: int, max_tokens: int, logprobs: int | None,
                 structured: StructuredSpec | None = None) -> SamplingParams:
        """The engine's parameters for choice `index` (a seed is offset per choice); `structured`:
        the output's constraint (see `output_spec`)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=None if self.seed is None else self.seed + index, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()},
                stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
                min_tokens=min(self.min_tokens, max_tokens), ignore_eos=self.ignore_eos, logprobs=logprobs,
                prompt_logprobs=self.scored_prompt_logprobs(), structured=structured,
            )
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None

    def output_spec(self) -> tuple[StructuredSpec, str] | None:
        """The output's constraint and the field that asked for it, or None (chat adds response_format)."""
        return None if self.structured_outputs is None else self.structured_outputs.spec()

    def slo_for(self, default: SLO) -> SLO:
        if self.slo is None:
            return default
        return SLO(ttft=self.slo.ttft or default.ttft, tpot=self.slo.tpot or default.tpot)


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """`prompt`: a text, texts, token ids, or lists of token ids, none empty. Token ids must be
    below the model's vocabulary size, and prompt plus max_tokens within its context (400 if not)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: scores the prompt, generates nothing
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _scoring_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            refuse("max_tokens", "0 is only allowed with echo (to score the prompt)")
        return self

    def scored_prompt_logprobs(self) -> int | None:
        """With echo and logprobs, the prompt's tokens get `logprobs` alternatives as the generated
        ones do; max_tokens 0 (scoring) always computes the prompt's log-probabilities."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else (0 if self.max_tokens == 0 else None)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text


class ToolCall(RequestModel):
    """An earlier call, in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    """An assistant message may have `tool_calls` (content then may be null); a `tool` message
    answers one, naming it by `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _calls_are_the_assistants(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            refuse("messages.tool_calls", "only assistant messages have tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class JsonSchemaFormat(RequestModel):
    """OpenAI's response_format.json_schema (`strict` is accepted; outputs always follow the schema)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: JsonSchema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's response_format: "text" (no constraint), "json_object" (one JSON object) or
    "json_schema" (JSON valid under `json_schema.schema`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            refuse("response_format.json_schema", 'required with type "json_schema", and only then')
        return self

    def spec(self) -> tuple[StructuredSpec, str]:
        if self.json_schema is None:
            return StructuredSpec.json_object(), "response_format"
        return StructuredSpec.json_schema(self.json_schema.schema_), "response_format.json_schema.schema"


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: any object
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # the chat template's options, as vLLM has them
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            refuse("top_logprobs", "only allowed when logprobs is true")
        return self

    @model_validator(mode="after")
    def _consistent_tools_and_formats(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and not self.tools:
            refuse("tool_choice", "only allowed when tools are given")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            refuse("tools", "function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            refuse("tool_choice", f"no tool is named {self.tool_choice.function.name!r}")
        guided = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.structured_outputs is not None:
            refuse("response_format", "cannot be combined with structured_outputs")
        if guided and (formatted or self.structured_outputs is not None):
            refuse("tool_choice", "a required or named tool choice cannot be combined with response_format or structured_outputs")
        if self.continue_final_message and self.add_generation_prompt:
            refuse("continue_final_message", "cannot be true while add_generation_prompt is true (set it to false)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            refuse("continue_final_message", "the last message must be the assistant's")
        return self

    def output_spec(self) -> tuple[StructuredSpec, str] | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.spec()
        return super().output_spec()


class Hyperparameters(RequestModel):
    """OpenAI's bounds: 1 to 50 epochs, batches of 1 to 256, a positive learning rate multiplier."""

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"] = "auto"


class LoraOptions(RequestModel):
    """loramux's extra field `lora` on fine-tuning jobs (the checks of LoraConfig, stated here so
    that a bad value is refused naming its field)."""

    r: int = Field(default=16, ge=1, le=MAX_RANK)
    alpha: float = Field(default=32.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)] = "all-linear"
    use_rslora: bool = False


class TrainingOptions(RequestModel):
    """loramux's extra field `training` on fine-tuning jobs (beside OpenAI's hyperparameters): the
    rest of TrainingConfig, under its names and with its defaults (jobs checkpoint every 10 steps
    or 60 s of training unless told otherwise; 0 turns a trigger off; max_grad_norm null turns
    clipping off, as `loramux finetune --max-grad-norm 0` sends it)."""

    NULL_IS_VALUE = frozenset({"max_grad_norm"})

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


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: beta > 0 ("auto": TrainingConfig's 0.1) beside the others."""

    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"] = "auto"


class SupervisedMethod(RequestModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(RequestModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


METHOD_TYPES = ("supervised", "dpo")


class Method(RequestModel):
    """OpenAI's `method`: {"type": "supervised" | "dpo", <type>: {"hyperparameters": {...}}}. Another
    type (OpenAI's "reinforcement") is a 400 naming method.type; a block of another type than
    `type` a 400 naming that block."""

    type: str
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None  # OpenAI's; declared so that its type is what gets refused

    @model_validator(mode="after")
    def _one_block_of_its_type(self) -> Method:
        if self.type not in METHOD_TYPES:
            refuse("method.type", f"{self.type!r} is not supported; use one of {', '.join(METHOD_TYPES)}")
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                refuse(f"method.{other}", f"method.type is {self.type!r}: give method.{self.type}, not method.{other}")
        return self

    def hyperparameters(self) -> Hyperparameters:
        block = getattr(self, self.type)
        return block.hyperparameters if block is not None else (DpoHyperparameters() if self.type == "dpo" else Hyperparameters())


MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class FineTuningJobRequest(RequestModel):
    """OpenAI's job request. `method` picks supervised fine-tuning or DPO with its hyperparameters;
    the top-level `hyperparameters` (deprecated by OpenAI in favor of method's) are still taken, and
    a value given in both that differs is refused (400 naming `hyperparameters`). `model` is the
    base model or a fine-tuned model ("ft:...", any adapter of the catalog), which the job starts
    from (then the `lora` extra is refused: the adapter brings its config). `metadata`: up to 16
    string pairs, echoed on the job. `integrations` (OpenAI's W&B) are not implemented: a non-empty
    list is refused naming it."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=ADAPTER_NAME_PATTERN)
    seed: int | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    integrations: list[dict[str, Any]] | None = None
    lora: LoraOptions = Field(default_factory=LoraOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)

    @model_validator(mode="after")
    def _no_integrations(self) -> FineTuningJobRequest:
        if self.integrations:
            refuse("integrations", "integrations (e.g. wandb) are not supported; give none, or an empty list")
        return self

    def resolved_method(self) -> dict:
        """OpenAI's `method` with every "auto" resolved, as the job echoes it:
        {"type": t, t: {"hyperparameters": {...}}}; the top-level hyperparameters fill what method
        leaves "auto", and a value both give differently is refused."""
        kind = self.method.type if self.method is not None else "supervised"
        hp = self.method.hyperparameters() if self.method is not None else self.hyperparameters
        values = hp.model_dump()
        if self.method is not None and "hyperparameters" in self.model_fields_set:
            for name, legacy in self.hyperparameters.model_dump().items():
                if legacy == "auto":
                    continue
                if values[name] == "auto":
                    values[name] = legacy
                elif values[name] != legacy:
                    refuse("hyperparameters", f"hyperparameters.{name} is {legacy!r} but method.{kind}.hyperparameters.{name} "
                                              f"is {values[name]!r}; give hyperparameters under method only (OpenAI deprecated "
                                              "the top-level hyperparameters in favor of method)")
        defaults = {"n_epochs": TrainingConfig.epochs, "batch_size": TrainingConfig.batch_size,
                    "learning_rate_multiplier": 1.0, "beta": TrainingConfig.beta}
        return {"type": kind, kind: {"hyperparameters": {k: defaults[k] if v == "auto" else v for k, v in values.items()}}}


class LoadAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, pattern=ADAPTER_NAME_PATTERN)
    lora_path: str = Field(min_length=1)
    pinned: bool = False

    @model_validator(mode="after")
    def _path_is_a_path(self) -> LoadAdapterRequest:
        """A path the file system can take: no NUL, no lone UTF-16 surrogates (JSON can carry them)."""
        try:
            if b"\0" in os.fsencode(self.lora_path):
                refuse("lora_path", "must not contain a NUL character")
        except UnicodeEncodeError as e:
            refuse("lora_path", f"is not a valid file system path: {e.reason} at position {e.start}")
        return self


class UnloadAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1)


class TokenizePromptRequest(RequestModel):
    """vLLM's /tokenize of a text. `model`, if given, must name a served model (they share the
    base model's tokenizer)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    """vLLM's /tokenize of a conversation: the token ids /v1/chat/completions would prefill for
    the same messages, tools and template options."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def chat(self, model: str) -> ChatCompletionRequest:
        """The chat request whose prompt this is (its checks of the template options apply)."""
        return ChatCompletionRequest(model=model, messages=self.messages, tools=self.tools, chat_template_kwargs=self.chat_template_kwargs,
                                     add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message)


class DetokenizeRequest(RequestModel):
    """vLLM's /detokenize: token ids below the vocabulary size, decoded with special tokens kept."""

    model: str | None = None
    tokens: list[TokenId]


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


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs: the tokenizer's own token strings


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"]


class AdapterShape(BaseModel):
    r: int | None
    alpha: float | None
    target_modules: list[str] | None


class ModelCard(BaseModel):
    """vLLM's card: the base model's (and each alias's) has root = its weights' directory and
    max_model_len = its context; an adapter's has root = its directory (None while its job trains it)
    and parent = the base model's id."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None
    parent: str | None
    max_model_len: int | None
    resident: bool
    # loramux's, on adapter cards only: pinned (never evicted), the LoRA shape, the weights' size
    pinned: bool | None = None
    lora: AdapterShape | None = None
    size_bytes: int | None = None


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: the reply is calls


class CompletionLogprobs(BaseModel):
    """One entry per token (with echo, the prompt's first: its logprob and alternatives are null);
    top_logprobs holds the `logprobs` most probable tokens and the token itself; text_offset is
    where each token's text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's entry for one token of `prompt_logprobs` (rank 1 is the most probable)."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, null for the first, then token id -> PromptLogprob for
# the prompt's token and the `prompt_logprobs` most probable ones
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    prompt_logprobs: PromptLogprobs | None = None


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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """content is null when the reply is tool calls only."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletion(BaseModel):
    """prompt_logprobs: vLLM's, for the one rendered prompt (with the request's prompt_logprobs)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A call's first delta has its index, id, type and name (arguments ""); later ones, the
    same index and pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None


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


class JobDpoHyperparameters(JobHyperparameters):
    beta: float


class JobSupervisedMethod(BaseModel):
    hyperparameters: JobHyperparameters


class JobDpoMethod(BaseModel):
    hyperparameters: JobDpoHyperparameters


class JobMethod(BaseModel):
    """OpenAI's `method` of a job, with its hyperparameters resolved ("auto" replaced)."""

    type: Literal["supervised", "dpo"]
    supervised: JobSupervisedMethod | None = None
    dpo: JobDpoMethod | None = None


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
    method: JobMethod
    metadata: dict[str, str] | None
    lora: LoraOptions | None  # None: started from a fine-tuned model (`model`), whose config it takes
    training: TrainingOptions
    init_from: str | None = None  # the fine-tuned model it starts from (a DPO job's reference), if any
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
