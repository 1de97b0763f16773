"""OpenAI API request bodies (pydantic) and their mapping onto SamplingParams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jdecode.decoding.sampling import SamplingParams


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


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields (presence_penalty, user, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM extension
    min_p: float = 0.0  # vLLM extension
    repetition_penalty: float = 1.0  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def sampling_params(req: _Common, max_tokens: int) -> SamplingParams:
    """Validates the OpenAI fields (errors name the parameter) and builds SamplingParams."""
    if req.n < 1:
        raise APIError(f"n={req.n}: must be at least 1", param="n")
    if not 0 <= req.temperature <= 2:
        raise APIError(f"temperature={req.temperature} is out of range: it must lie in [0, 2]",
                       param="temperature")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, seed=req.seed, max_new_tokens=max_tokens,
            stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError(str(e), param=str(e).split("=", 1)[0]) from None
