"""The HTTP API's request and response models, as OpenAI's completions API defines them.

FastAPI reads these into /openapi.json (so /docs and schema-driven clients see every field) and
validates bodies against them. Requests are strict ("5" is not an int, 1 is not a bool, NaN and
Infinity are not numbers) and forbid unknown fields: a misspelt `logprob` is a 400 naming it,
never silently dropped. Errors a client causes are OpenAI's error JSON (`ErrorResponse`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

TokenId = Annotated[int, Field(ge=0)]
Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]
SEED_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    """send a last chunk with `usage` (and `choices: []`) before [DONE]"""


class CompletionRequest(_Strict):
    """POST /v1/completions: OpenAI's legacy completions body."""

    model: str | None = None
    """the served model's id (GET /v1/models); optional, as the server has one"""
    prompt: Prompt
    """a string, a list of strings, a list of token ids, or a list of token-id lists"""
    suffix: str | None = None
    """not supported (GPT-2 has no fill-in-the-middle): any value is a 400"""
    max_tokens: int = Field(16, ge=0)
    """tokens to generate per choice; 0 only with echo (scoring the prompt)"""
    temperature: float = Field(1.0, ge=0)
    """0 = greedy"""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling: the smallest set of tokens whose probability reaches top_p"""
    n: int = Field(1, ge=1, le=16)
    """choices per prompt"""
    best_of: int | None = Field(None, ge=1, le=16)
    """candidates per prompt (>= n); the n with the highest cumulative logprob are returned"""
    stream: bool = False
    """Server-Sent Events, one chunk per piece of text, then `data: [DONE]`"""
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    """each token's logprob and the `logprobs` likeliest tokens at its position"""
    echo: bool = False
    """prepend the prompt to the text (and its tokens to logprobs)"""
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    """up to 4 strings; the text ends before the first of them"""
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """subtracted from the logit of every token already generated"""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    """subtracted from a token's logit once per time it was generated"""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    """token id (as a string) -> bias added to its logit"""
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    """the same seed and parameters give the same text; choice i uses seed + i"""
    user: str | None = None
    """accepted and ignored"""


class GenerateRequest(_Strict):
    """POST /generate: one prompt, plain JSON; nucleus_prob is top_p by the original name."""

    prompt: str
    max_tokens: int = Field(64, ge=1)
    top_p: float = Field(0.9, gt=0, le=1, validation_alias=AliasChoices("nucleus_prob", "top_p"))
    temperature: float = Field(1.0, ge=0)
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    """completion tokens"""
    finish_reason: Literal["stop", "length"]


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    """None for the first prompt token (nothing before it)"""
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]
    """each token's character offset in the prompt + completion text"""


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A completion, or (streaming) one `data:` chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error the client caused (or a server-side one): OpenAI's error JSON, this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in [
    (400, "invalid request: the message names the field and the fix"),
    (404, "no such model"),
    (413, "request body over the server's limit"),
    (503, "over capacity (Retry-After)")]}
