"""The HTTP APIs' request bodies: OpenAI's (chat completions, completions, responses) and
Anthropic's (messages), as typed models.

Validated strictly (no "1" for 1, no "yes" for true); fields these APIs define that
llmws does not use are accepted and ignored, as the other servers of the field do, and
those it cannot honour are refused by the frontend (llmwsd.frontends.http) by name.
Ranges are the APIs' own; what a generation may ask for is then checked once more by
GenerationSettings.merge, the one table of settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(Body):
    """A part of a message's content: text (``text``, ``input_text``, ``output_text``), or
    an image or file, which llmws refuses."""

    type: str
    text: str | None = None


Content = str | list[ContentPart]

# A tool's name, as both APIs allow it.
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"

# -- OpenAI ------------------------------------------------------------------------------


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What chat completions and completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, which its clients (and llmws's benchmark) send
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)


class JsonSchemaSpec(Body):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """Chat completions' ``response_format``: text, any JSON object, or JSON by a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionSpec(Body):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; None: no arguments
    strict: bool | None = None


class ChatTool(Body):
    """A chat completion's tool: a function the model may call."""

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(Body):
    name: str
    arguments: str  # JSON text, as OpenAI gives it


class ChatToolCall(Body):
    """A call an assistant message made, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # one call per answer, whatever it says
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class InputMessage(Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Content


class TextFormat(Body):
    """The Responses API's ``text.format``: text, JSON, or JSON by a schema (flattened)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(Body):
    format: TextFormat | None = None


class ResponseRequest(Body):
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    text: TextOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


# -- Anthropic ---------------------------------------------------------------------------


class AnthropicBlock(ContentPart):
    """A content block: text, or a tool_use (an assistant's) or tool_result (a user's)."""

    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentPart] | None = None  # tool_result
    is_error: bool | None = None  # tool_result


class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(Body):
    """A client tool; the server tools (web search and the like) have a ``type``."""

    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None


class AnthropicToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None  # one call per answer, whatever it says


class MessagesRequest(Body):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Content | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
