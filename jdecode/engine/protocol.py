"""OpenAI API request bodies (pydantic), their errors, and their mapping onto SamplingParams.

Types are strict where OpenAI's are (`"stream": "yes"`, `"seed": "42"` and `"max_tokens": true`
are errors, not coerced), and every number is range-checked here, so the engine only ever sees
values it can represent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from jdecode.decoding.sampling import MAX_SEED, MAX_TOP_K, SamplingParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32


class APIError(Exception):
    """An error returned to the client as an OpenAI-style body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (
            message, status, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 from pydantic's errors for a request body, naming the first bad field.

    A value that matches no member of a union (`prompt: 42`) yields one error per member, each
    with the member's name inserted in its location; the field is their common prefix, and the
    message comes from the member that got deepest into the value (the one the client meant).
    """
    if not errors:
        return APIError("invalid request body")
    locs = [[x for x in e.get("loc", ()) if x != "body"] for e in errors]
    first = locs[0][:1]
    group = [(loc, e) for loc, e in zip(locs, errors) if loc[:1] == first]
    prefix = group[0][0]
    for loc, _ in group[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, loc)) if a != b),
                 min(len(prefix), len(loc)))
        prefix = prefix[:n]
    loc, err = max(group, key=lambda g: len(g[0]))
    # Past the prefix, a union's errors carry the member's name first: leave it out.
    where = prefix + (loc[len(prefix) + 1:] if len(group) > 1 else [])
    param = ".".join(str(x) for x in prefix) or None
    if err.get("type") == "json_invalid":
        return APIError(f"request body is not valid JSON: {err.get('msg')}")
    path = ".".join(str(x) for x in where) or "body"
    return APIError(f"{path}: {err.get('msg', 'invalid value')}", param=param)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate {text[e.start]!r} at index {e.start}: "
                         "send valid UTF-8 (surrogates only in escaped pairs)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _Strict(BaseModel):
    # Unknown fields (presence_penalty, user, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K)  # vLLM extension: 0 or -1 = off
    min_p: float = Field(0.0, ge=0, le=1)  # vLLM extension
    repetition_penalty: float = Field(1.0, gt=0)  # vLLM extension
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[TokenId] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Common):
    prompt: (Text | Annotated[list[Text], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1)])
    max_tokens: int | None = Field(COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    @field_validator("max_tokens")
    @classmethod
    def _default_max_tokens(cls, v: int | None) -> int:
        return COMPLETION_MAX_TOKENS if v is None else v  # OpenAI: null means the default

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported (the prompt is not returned): drop "
                             "echo and prepend the prompt yourself")
        return v

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a batch: one string or token list per prompt."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for the next one
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def completion_limit(self) -> int | None:
        """The output cap; None = up to the context length (OpenAI's chat default)."""
        return self.max_tokens if self.max_completion_tokens is None else \
            self.max_completion_tokens


def sampling_params(req: _Common, max_tokens: int) -> SamplingParams:
    """SamplingParams for a validated request, capped at `max_tokens` new tokens."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0), min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, seed=req.seed, max_new_tokens=max_tokens,
        stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        n=req.n)
