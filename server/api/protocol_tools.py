"""What chat and Responses share about tools and structured outputs: function definitions, the
tools a request offers the model, the choice of tool, and the engine's `StructuredOutput` they
turn into.

`tool_choice` is kept as one string here: "none", "auto", "required", or `named(tool)` for the one
tool that must be called (with a prefix no tool name can have, so that a function called "auto"
stays a function). The grammar then follows OpenAI's rules:
- a forced call ("required" or a named tool) is the tool grammar alone: Qwen3's `<tool_call>`
  blocks (one, or several when `parallel_tool_calls` allows), so a forced call always parses and
  its arguments match the tool's schema; a response format is accepted and governs a later turn;
- "auto" with a response format: the reply is JSON in the format, or one or more tool calls;
- "auto" without one: nothing is constrained, the model decides;
- "none", or no tools: the response format alone, if any.
"""

import json
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from server.api.errors import invalid_request
from server.api.protocol import RequestModel
from server.api.strict_schema import strict_schema
from server.engine.request import CustomToolSchema, FunctionSchema, StructuredOutput

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# OpenAI: a function without `parameters` takes an empty parameter list, and nothing else.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class OfferedTool:
    """A tool the model may call: under `name` (the one the client expects back), with the grammar
    of its arguments (`schema`) and its entry in the chat template's tool list (`template`);
    `param` is the request field that defines it, `namespace` the Responses namespace it is in."""

    name: str
    schema: FunctionSchema | CustomToolSchema
    template: dict
    param: str
    namespace: str | None = None

    @property
    def custom(self) -> bool:
        return isinstance(self.schema, CustomToolSchema)


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # OpenAI's strict mode (see server.api.strict_schema)

    def offered(self, param: str, namespace: str | None = None, description: str | None = None) -> OfferedTool:
        """This function as a tool on offer; `param` is the field that holds it (`tools[2]`)."""
        parameters = NO_PARAMETERS if self.parameters is None else self.parameters
        if self.strict:
            parameters = strict_schema(parameters, f"function '{self.name}'", f"{param}.parameters",
                                       code="invalid_function_parameters")
        listed = self.model_dump(exclude_none=True, exclude={"type"})  # as the client wrote it
        if description is not None:
            listed["description"] = description
        return OfferedTool(self.name, FunctionSchema(self.name, json.dumps(parameters)),
                           {"type": "function", "function": listed}, param, namespace)


def check_unique_names(tools: list[OfferedTool]) -> None:
    seen = set()
    for tool in tools:
        if tool.name in seen:
            raise invalid_request(f"Invalid '{tool.param}.name': a tool named '{tool.name}' is offered twice "
                                  "(the model calls tools by name alone).", param=f"{tool.param}.name")
        seen.add(tool.name)


def named(tool: str) -> str:
    """The tool choice that forces a call of `tool`."""
    return "tool:" + tool


def forces(choice: str, tool: OfferedTool) -> bool:
    return choice in ("required", named(tool.name))


def check_tool_choice(choice: str, tools: list[OfferedTool], param: str = "tool_choice") -> None:
    if choice in ("none", "auto"):
        return
    if not tools:
        raise invalid_request(f"'{param}' is only allowed when 'tools' are specified.", param=param)
    if not any(forces(choice, tool) for tool in tools):
        name = choice.removeprefix(named(""))
        raise invalid_request(f"Invalid '{param}': no tool named '{name}' in 'tools'.", param=param)


def tool_grammar(tools: list[OfferedTool], choice: str, parallel: bool,
                 reply: StructuredOutput | None) -> StructuredOutput | None:
    """The grammar of a request's reply (see the module's docstring), None when it is free."""
    if choice == "none" or not tools:
        return reply
    if choice == "auto":
        if reply is None:
            return None
        return StructuredOutput("tool_calls", functions=tuple(tool.schema for tool in tools), parallel=parallel,
                                or_reply=reply)
    forced = tuple(tool.schema for tool in tools if forces(choice, tool))
    return StructuredOutput("tool_calls", functions=forced, parallel=parallel)


def grammar_params(tools: list[OfferedTool], constraint: StructuredOutput) -> list[str]:
    """The request field behind each tool of `constraint`, in its order (to name a failing schema)."""
    by_name = {tool.name: tool for tool in tools}
    return [f"{by_name[schema.name].param}.{'format' if by_name[schema.name].custom else 'parameters'}"
            for schema in constraint.functions]


def json_output(kind: str, schema: dict | None, strict: bool | None, name: str | None,
                param: str) -> StructuredOutput | None:
    """The structured output of a response format: "text" (none), "json_object" or "json_schema"
    (in strict mode when `strict`; `param` is the field that holds the schema)."""
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        if strict:
            schema = strict_schema(schema, f"response_format '{name}'", param)
        return StructuredOutput("json_schema", json_schema=json.dumps(schema))
    return None


def template_tool_call(call_id: str, name: str, arguments: str, raw: bool = False) -> dict:
    """An earlier call as chat templates take it: arguments that are a JSON object go as the object,
    which Qwen3's template writes back in its own style (as vLLM passes them); others, and a custom
    tool's raw input (`raw`), as written."""
    try:
        parsed = None if raw else json.loads(arguments)
    except ValueError:
        parsed = None
    value = parsed if isinstance(parsed, dict) else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": value}}
