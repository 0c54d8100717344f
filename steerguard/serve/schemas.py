"""Request bodies of the OpenAI endpoints the server answers, checked strictly (a string where a number
belongs is an error, not a conversion). Fields the API defines but this server does not implement are
accepted at their neutral values and refused otherwise; fields the API does not define are ignored."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import APIError

MAX_STOP_STRINGS = 4
Finite = Annotated[float, Field(allow_inf_nan=False)]
# an extension: the guard's threshold for this request, a name of the bundle's operating points or a tau in [0, 1]
# (the runtime checks the name and the range, and says what is available)
OperatingPointField = Annotated[str, Field(max_length=64)] | Finite | None


def _operating_point_type(v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
        raise ValueError("must be the name of an operating point (strict, balanced, permissive) or a tau "
                         "between 0 and 1")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What chat and text completions share: the model, sampling settings, limits, streaming."""
    model: str
    temperature: Annotated[Finite, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False     # an extension (as vLLM's and llama.cpp's servers have): benchmarks ask for exact lengths
    operating_point: OperatingPointField = None   # an extension: "strict", "balanced", "permissive" or a tau
    _point_type = field_validator("operating_point", mode="before")(_operating_point_type)
    # accepted at their neutral values only
    presence_penalty: Annotated[Finite, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[Finite, Field(ge=0, le=0)] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None
    tools: Annotated[list, Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return v

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one")
        return self

    def token_limit(self) -> tuple[int | None, str]:
        """The requested answer length and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | TokenIds \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    max_tokens: int | None = 16   # the API's default for completions
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=0)] | None = None

    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], (str, list)) else p


class ModerationRequest(_Body):
    input: str | Annotated[list[str], Field(min_length=1, max_length=32)] \
        | Annotated[list[Part], Field(min_length=1, max_length=8)]
    model: str | None = None
    operating_point: OperatingPointField = None
    _point_type = field_validator("operating_point", mode="before")(_operating_point_type)


def parse(schema: type[_Body], body: object) -> _Body:
    """`body` (decoded JSON) as `schema`; the first problem as a 400 in OpenAI's shape, naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        # drop the union-branch labels pydantic adds (e.g. 'str', 'list[...]') from the location
        loc = [p for p in err["loc"] if isinstance(p, int) or p in _FIELD_NAMES]
        param = ".".join(str(p) for p in loc) or None
        message = err["msg"] if err["type"] != "value_error" else err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_value") from None


_FIELD_NAMES = {name for schema in (ChatCompletionRequest, CompletionRequest, ModerationRequest, ChatMessage,
                                    TextPart, ImagePart, ImageURL, StreamOptions)
                for name in schema.model_fields}
