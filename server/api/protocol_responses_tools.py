"""The tools a Responses request may list, as OpenAI takes them, and what is offered to the model.

- `function` tools, as in chat;
- `custom` tools: raw text input, free or in a Lark or regex grammar (OpenAI's `format`), offered
  to the model with their format and constrained by it whenever a grammar applies (see
  server.engine.structured);
- `namespace` tools: a named group of function and custom tools; each is offered under its own
  name, and a call of it comes back with `name` and `namespace`, as OpenAI returns it;
- hosted tools (web search, file search, code interpreter, image generation, computer use, remote
  MCP servers): OpenAI runs them itself; this server cannot, so they are not offered to the
  model, they stay in the response's `tools` as sent, the log says so once per type, and a
  `tool_choice` that forces one is a 400 naming it.
"""

import logging
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from server.api.errors import invalid_request
from server.api.protocol import RequestModel
from server.api.protocol_tools import NAME_PATTERN, FunctionDefinition, OfferedTool, named
from server.engine.request import CustomToolSchema

log = logging.getLogger("nanoserve")

HOSTED_TOOL_TYPES = frozenset({
    "web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11", "file_search",
    "code_interpreter", "image_generation", "computer", "computer_use", "computer_use_preview", "mcp",
})
_TOOL_TYPES = frozenset({"function", "custom", "namespace"}) | HOSTED_TOOL_TYPES
_hosted_types_logged: set[str] = set()


class FunctionTool(FunctionDefinition):
    type: Literal["function"]

    def echo(self) -> dict:
        return self.model_dump()


class CustomToolFormat(RequestModel):
    type: Literal["text", "grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: str | None = None


class CustomTool(RequestModel):
    type: Literal["custom"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    format: CustomToolFormat | None = None

    def echo(self) -> dict:
        return self.model_dump(exclude_none=True) | {"format": self._format().model_dump(exclude_none=True)}

    def _format(self) -> CustomToolFormat:
        return self.format or CustomToolFormat(type="text")

    def offered(self, param: str, namespace: str | None = None, description: str | None = None) -> OfferedTool:
        text_format = self._format()
        schema = CustomToolSchema(self.name) if text_format.type == "text" else \
            CustomToolSchema(self.name, text_format.syntax, text_format.definition)
        listed = {"name": self.name, "description": self.description if description is None else description,
                  "format": text_format.model_dump(exclude_none=True)}
        return OfferedTool(self.name, schema, {"type": "custom", "custom": {k: v for k, v in listed.items() if v}},
                           param, namespace)


def _tool_kind(value: Any) -> str:
    # Tags start upper-case, so that a 400's `param` leaves them out (`tools[0].name`, as OpenAI names it).
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"function": "Function", "custom": "Custom", "namespace": "Namespace"}.get(kind, "Hosted")


class NamespaceTool(RequestModel):
    type: Literal["namespace"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    tools: list[Annotated[Annotated[FunctionTool, Tag("Function")] | Annotated[CustomTool, Tag("Custom")],
                          Discriminator(_tool_kind)]]

    def echo(self) -> dict:
        return self.model_dump(exclude={"tools"}) | {"tools": [tool.echo() for tool in self.tools]}


class HostedTool(RequestModel):
    """A tool OpenAI runs itself; kept as sent (every field), never offered to the model."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str

    def echo(self) -> dict:
        return self.model_dump()


ResponsesTool = Annotated[
    Annotated[FunctionTool, Tag("Function")] | Annotated[CustomTool, Tag("Custom")]
    | Annotated[NamespaceTool, Tag("Namespace")] | Annotated[HostedTool, Tag("Hosted")],
    Discriminator(_tool_kind),
]


class ToolChoiceByName(RequestModel):
    type: Literal["function", "custom"]
    name: str = Field(pattern=NAME_PATTERN)


class HostedToolChoice(RequestModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal[tuple(sorted(HOSTED_TOOL_TYPES))]  # type: ignore[valid-type]


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceByName | HostedToolChoice


def check_tool_types(raw: Any) -> None:
    """Unknown tool types are refused by name, before the tools are validated."""
    for i, tool in enumerate(raw if isinstance(raw, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and kind not in _TOOL_TYPES:
            raise invalid_request(f"Tools of type {kind!r} are not supported by this server; 'function', 'custom' "
                                  "and 'namespace' tools are (hosted tools are listed but not run).",
                                  param=f"tools[{i}].type")


def offered_tools(tools: list[ResponsesTool]) -> list[OfferedTool]:
    """Every tool the model may call, namespaces flattened; hosted tools are left out (logged once a type)."""
    offered = []
    for i, tool in enumerate(tools):
        if isinstance(tool, NamespaceTool):
            for j, member in enumerate(tool.tools):
                described = f"{member.description or ''} (in {tool.name}: {tool.description or tool.name})".lstrip()
                offered.append(member.offered(f"tools[{i}].tools[{j}]", tool.name, described))
        elif isinstance(tool, HostedTool):
            if tool.type not in _hosted_types_logged:
                _hosted_types_logged.add(tool.type)
                log.warning("hosted tool '%s' is listed in a request; this server cannot run it, so the model "
                            "is not offered it", tool.type)
        else:
            offered.append(tool.offered(f"tools[{i}]"))
    return offered


def chosen_tool(choice: ToolChoice | None, offered: list[OfferedTool], any_tools: bool) -> str:
    """The choice as protocol_tools keeps it; a hosted tool forced, or a name of the wrong kind, is a 400."""
    if isinstance(choice, HostedToolChoice):
        raise invalid_request(f"Invalid 'tool_choice': '{choice.type}' is a hosted tool, which this server cannot "
                              "run; it is not offered to the model.", param="tool_choice")
    if isinstance(choice, ToolChoiceByName):
        tool = next((t for t in offered if t.name == choice.name), None)
        if tool is not None and tool.custom != (choice.type == "custom"):
            raise invalid_request(f"Invalid 'tool_choice': '{choice.name}' is not a {choice.type} tool.",
                                  param="tool_choice")
        return named(choice.name)
    return choice or ("auto" if any_tools else "none")
