"""The HTTP API's bodies: requests with one server's limits, responses, and what /openapi.json declares.

`bounded_requests` builds the request models of one server (its max_tokens,
rows per request and vocabulary), so the schema a client or a fuzzer reads is
the one the server enforces; `describe_validation_errors` turns pydantic's
errors into one readable line; `declare_errors` makes the schema state the
400 / 404 / 429 / 500 answers and the server-sent events of a streamed completion.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gptj.inference.adapters import NAME_PATTERN
from gptj.inference.runner import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4


def _whole(value):
    """JSON has one kind of number: 6.0 is the integer 6 (as JSON Schema says); 6.5 stays a float and is refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


StrictInt = Annotated[int, BeforeValidator(_whole), Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
Text = Annotated[str, Field(strict=True, min_length=1)]
StrictBool = Annotated[bool, Field(strict=True)]
Temperature = Annotated[float, Field(strict=True, ge=0.0, le=100.0)]
TopP = Annotated[float, Field(strict=True, gt=0.0, le=1.0)]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`: `include_usage` adds a last event with `usage` and no choices (the other
    events carry `"usage": null`); `continuous_usage_stats` (vLLM's) puts the usage so far in every event."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class SamplingFields(BaseModel):
    """What completions and chat completions share: sampling, stopping, streaming and vLLM's extensions.

    `ignore_eos` (vLLM): generate max_tokens tokens whatever is sampled (the
    end-of-text token never appears in the text); `min_tokens` (vLLM): no
    end-of-text token and no stop string before that many tokens.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: Annotated[StrictInt, Field(ge=0)] | None = 0
    n: Annotated[StrictInt, Field(ge=1)] | None = 1
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)], None] = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = 0


class CompletionRequest(SamplingFields):
    """The OpenAI completions request body (fields gptj does not use are ignored).

    Limits that depend on the server (max_tokens, n, token ids) are added per
    server by `bounded_requests`, so /openapi.json states that server's limits.
    """

    prompt: Union[Text, list[Text], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: StrictBool | None = False


class TextPart(BaseModel):
    """One part of a message's content given as a list (only text parts: the models read text)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message of a conversation; `content` is a string or a list of text parts (joined by newlines)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingFields):
    """The OpenAI chat completions request body (fields gptj does not use are ignored).

    `max_completion_tokens` (OpenAI's current name) wins over `max_tokens`;
    without either, a reply may fill the context (up to the server's limit).
    `logprobs` true adds each token's log-probability, `top_logprobs` that
    many alternatives. `add_generation_prompt` (vLLM's) is passed to the template.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool | None = True


class CompleteRequest(BaseModel):
    """mesh-transformer-jax's /complete body; `max_tokens` is a gptj extension (default 512)."""

    model_config = ConfigDict(extra="ignore")

    context: Text
    top_p: TopP = 0.9
    temp: Temperature = 1.0
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    add_special_tokens: StrictBool | None = False  # accepted for vLLM's clients; GPT-2 BPE adds none


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[StrictInt]


AdapterName = Annotated[str, Field(strict=True, pattern=f"^{NAME_PATTERN.pattern}$")]


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter: a name for requests' `model`, and a PEFT directory or gptj LoRA workdir
    on the server's disk."""

    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_path: Text


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter (its `lora_int_id` is accepted and ignored: names identify adapters)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_int_id: StrictInt | None = None


def bounded_requests(max_new_tokens: int, max_rows: int, vocab_size: int) -> dict[str, type[BaseModel]]:
    """The request bodies with one server's limits: tokens per completion, rows per request, token ids.

    A prompt's length against the context is still checked per request (it
    depends on the tokenizer and on max_tokens).
    """
    from pydantic import create_model

    token = Annotated[StrictInt, Field(ge=0, lt=vocab_size)]
    rows = lambda item: Annotated[list[item], Field(min_length=1, max_length=max_rows)]  # noqa: E731
    max_tokens = Annotated[StrictInt, Field(ge=0, le=max_new_tokens)] | None
    n = (Annotated[StrictInt, Field(ge=1, le=max_rows)] | None, 1)
    return {
        "completion": create_model(
            "CompletionRequest", __base__=CompletionRequest,
            prompt=(Union[Text, rows(Text), Annotated[list[token], Field(min_length=1)],
                          rows(Annotated[list[token], Field(min_length=1)])], ...),
            max_tokens=(max_tokens, min(16, max_new_tokens)), min_tokens=(max_tokens, 0), n=n),
        "chat": create_model(
            "ChatCompletionRequest", __base__=ChatCompletionRequest, max_tokens=(max_tokens, None),
            max_completion_tokens=(max_tokens, None), min_tokens=(max_tokens, 0), n=n),
        "complete": create_model("CompleteRequest", __base__=CompleteRequest, max_tokens=(max_tokens, None)),
        "detokenize": create_model("DetokenizeRequest", __base__=DetokenizeRequest, tokens=(list[token], ...)),
    }


# -- response bodies (declared so the OpenAPI schema says what each endpoint returns) ---------


class LogprobsBlock(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: LogprobsBlock | None
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A completion, or (with stream) each server-sent event's body (the usage event has no choices)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: str
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """A chat completion (`object` "chat.completion")."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`object` "chat.completion.chunk"): the role,
    then one token's content per event, then the finish reason; the usage event has no choices."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompleteResponse(BaseModel):
    completion: str


class ModelCard(BaseModel):
    """A served model: the base (`parent` None), or a LoRA adapter over it (`root`: where it was read from)."""

    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class HealthResponse(BaseModel):
    """Engine state: slots in use, rows waiting, and the engine's counters."""

    model_config = ConfigDict(extra="allow")

    status: str
    model: str
    slots: int
    running_slots: int
    waiting_rows: int
    tokens_generated: int


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str
    bos_token: str
    pad_token: str | None
    model_max_length: int


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# Errors that only say "this alternative of a union has another type": noise when another alternative
# of the same field explains what is wrong with the value.
_TYPE_MISMATCHES = {"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type", "none_required",
                    "int_from_float", "model_type"}


def describe_validation_errors(errors: list[dict], limit: int = 5) -> str:
    """pydantic's errors as one line: `field.path: message`, one per field, the union branch that
    explains the problem rather than those of another type ("prompt: Input should be less than 50257")."""
    by_field: dict[tuple, list[dict]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})"
        loc = tuple(err.get("loc", ()))
        by_field.setdefault(loc[1:2], []).append(err)
    problems = []
    for group in by_field.values():
        telling = [e for e in group if e.get("type") not in _TYPE_MISMATCHES] or group
        err = telling[0]
        # Keep field names and list indices; drop pydantic's union branch tags ("list[constrained-str]").
        where = ".".join(str(p) for p in err.get("loc", ())[1:] if isinstance(p, int) or str(p).isidentifier())
        problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(problems[:limit])


def declare_errors(app) -> None:
    """Makes /openapi.json declare what the server answers: 400 (not FastAPI's 422) for invalid bodies,
    404 for a model it does not serve, 429 and 500 as ErrorResponse, and server-sent events for streamed
    completions."""
    from fastapi.openapi.utils import get_openapi

    def schema():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            error = {"description": "error", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path in spec["paths"].values():
                for operation in path.values():
                    responses = operation["responses"]
                    responses.pop("422", None)
                    if "requestBody" in operation:
                        responses["400"] = dict(error, description="invalid request")
                    responses["500"] = dict(error, description="server fault")
            schemas = spec["components"]["schemas"]
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs", {}), ErrorResponse=error_schema)
            chunk_schema = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(chunk_schema.pop("$defs", {}), ChatCompletionChunk=chunk_schema)
            for path, event in (("/v1/completions", "CompletionResponse"), ("/v1/chat/completions",
                                                                           "ChatCompletionChunk")):
                responses = spec["paths"][path]["post"]["responses"]
                responses["404"] = dict(error, description="the request's model (base or adapter) is not served")
                responses["429"] = dict(error, description="more rows waiting than the server queues")
                responses["200"]["content"]["text/event-stream"] = {"schema": {
                    "type": "object", "required": ["data"],
                    "description": f"with stream: each event's data is a {event} (one choice's next token), "
                                   "an ErrorResponse if generation fails mid-stream, or [DONE]",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}
            spec["paths"]["/complete"]["post"]["responses"]["429"] = dict(error, description="server busy")
            for path, answers in (("/v1/load_lora_adapter", {}),
                                  ("/v1/unload_lora_adapter", {"404": "no adapter of that name is loaded"})):
                responses = spec["paths"][path]["post"]["responses"]
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
                responses.update({code: dict(error, description=text) for code, text in answers.items()})
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = schema
