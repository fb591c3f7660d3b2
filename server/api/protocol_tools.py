"""What chat and Responses share about tools and structured outputs: function definitions, the
choice of tool, and the engine's `StructuredOutput` they turn into.

`tool_choice` is kept as one string here: "none", "auto", "required", or `named(function)` for
the one function that must be called (with a prefix no function name can have, so that a function
called "auto" stays a function). Under "required" or a named function the engine's grammar forces
Qwen3's `<tool_call>` blocks (one, or several when `parallel_tool_calls` allows), so a forced call
always parses and its arguments match the function's parameters schema. Under "auto" the model
decides, and nothing is constrained.
"""

import json
from typing import Any

from pydantic import Field

from server.api.errors import invalid_request
from server.api.protocol import RequestModel
from server.engine.request import FunctionSchema, StructuredOutput

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# OpenAI: a function without `parameters` takes an empty parameter list.
NO_PARAMETERS = {"type": "object", "properties": {}}


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # forced calls always follow the schema; "auto" ones never are constrained

    def function_schema(self) -> FunctionSchema:
        return FunctionSchema(self.name, json.dumps(NO_PARAMETERS if self.parameters is None else self.parameters))

    def template_tool(self) -> dict:
        """The tool as chat templates take it (OpenAI's chat shape)."""
        return {"type": "function", "function": self.model_dump(exclude_none=True, exclude={"type"})}


def named(function: str) -> str:
    """The tool choice that forces a call of `function`."""
    return "function:" + function


def forces(choice: str, function: FunctionDefinition) -> bool:
    return choice in ("required", named(function.name))


def check_tool_choice(choice: str, functions: list[FunctionDefinition], param: str = "tool_choice") -> None:
    if choice in ("none", "auto"):
        return
    if not functions:
        raise invalid_request(f"'{param}' is only allowed when 'tools' are specified.", param=param)
    if not any(forces(choice, f) for f in functions):
        name = choice.removeprefix(named(""))
        raise invalid_request(f"Invalid '{param}': no function named '{name}' in 'tools'.", param=param)


def forced_tool_calls(functions: list[FunctionDefinition], choice: str, parallel: bool) -> StructuredOutput | None:
    """The grammar of the calls `choice` forces, or None when the model may answer freely."""
    if choice in ("none", "auto"):
        return None
    forced = [f for f in functions if forces(choice, f)]
    return StructuredOutput("tool_calls", functions=tuple(f.function_schema() for f in forced), parallel=parallel)


def json_output(kind: str, schema: dict | None) -> StructuredOutput | None:
    """The structured output of a response format: "text" (none), "json_object" or "json_schema"."""
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        return StructuredOutput("json_schema", json_schema=json.dumps(schema))
    return None


def template_tool_call(call_id: str, name: str, arguments: str) -> dict:
    """An earlier call as chat templates take it: arguments that are a JSON object go as the object,
    which Qwen3's template writes back in its own style (as vLLM passes them); others as written."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    value = parsed if isinstance(parsed, dict) else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": value}}
