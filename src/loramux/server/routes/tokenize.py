"""POST /tokenize and /detokenize, vLLM's routes (beside /v1, with the same API key): the served
model's tokenizer, shared by the base model and every adapter, as the completion routes use it."""

from __future__ import annotations

from fastapi import APIRouter

from loramux.server.protocol import (
    APIError, DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizePromptRequest, TokenizeResponse,
)
from loramux.server.routes.completions import chat_prompt
from loramux.server.routes.context import Context, Ctx

router = APIRouter()


@router.post("/tokenize", response_model=None, responses={200: {"model": TokenizeResponse}})
async def tokenize(body: TokenizePromptRequest | TokenizeChatRequest, ctx: Ctx) -> dict:
    """A prompt's token ids as /v1/completions computes them (add_special_tokens as given), or a
    conversation's as /v1/chat/completions renders it (`chat_prompt`)."""
    check_model(ctx, body.model)
    engine = ctx.engine
    if isinstance(body, TokenizeChatRequest):
        ids, _ = chat_prompt(ctx, body.chat(body.model or ctx.base_id))
    else:
        ids = list(engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
    out = {"count": len(ids), "max_model_len": engine.model.config.max_position_embeddings, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize", response_model=None, responses={200: {"model": DetokenizeResponse}})
async def detokenize(body: DetokenizeRequest, ctx: Ctx) -> dict:
    """The text of token ids, special tokens included (vLLM's /detokenize)."""
    check_model(ctx, body.model)
    vocab = ctx.engine.model.config.vocab_size
    outside = [t for t in body.tokens if t >= vocab]
    if outside:
        raise APIError(400, f"tokens: ids outside the vocabulary [0, {vocab}): {outside[:8]}", param="tokens")
    return {"prompt": ctx.engine.tokenizer.decode(body.tokens)}


def check_model(ctx: Context, model: str | None) -> None:
    """A named model must be served: the base model (by its id or an alias) or a known adapter."""
    if model is not None and model not in ctx.model_names and not ctx.resident.known(model):
        raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
