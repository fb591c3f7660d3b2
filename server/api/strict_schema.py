"""OpenAI's strict mode for a JSON schema (`strict: true` on a function or a response format): every
object is closed and lists every one of its properties as required, so what the grammar allows is
exactly what the schema names.

An object without `additionalProperties` is closed here (OpenAI refuses such a schema; clients such
as litellm and llm send them, and closing them is what strict asks for). An object that allows
other keys, or leaves a property out of `required`, is a schema strict mode cannot express: a 400,
worded as OpenAI words it, with the path inside the schema as its `context`.
"""

import copy

from server.api.errors import invalid_request

# Keywords whose value is one schema, or a list or a map of schemas, to be made strict as well.
_ONE = ("items", "not", "additionalItems", "contains", "if", "then", "else")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "$defs", "definitions", "patternProperties")


class StrictSchemaError(ValueError):
    pass


def strict_schema(schema: dict, what: str, param: str, code: str | None = None) -> dict:
    """A copy of `schema` in strict mode; `what` names it in the message ("function 'get_weather'",
    "response_format 'Profile'"), `param` is the field that holds it."""
    strict = copy.deepcopy(schema)
    try:
        _close(strict, ())
    except StrictSchemaError as err:
        raise invalid_request(f"Invalid schema for {what}: {err}", param=param, code=code) from None
    return strict


def _close(schema: object, context: tuple) -> None:
    if isinstance(schema, list):  # the old tuple form of `items`
        for i, item in enumerate(schema):
            _close(item, context + (i,))
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.setdefault("properties", {})
        if schema.setdefault("additionalProperties", False) is not False:
            raise StrictSchemaError(f"In context={context}, 'additionalProperties' is required to be supplied and "
                                    "to be false.")
        required = schema.get("required", [])
        missing = [name for name in properties if name not in required] if isinstance(required, list) else []
        if not isinstance(required, list) or missing:
            raise StrictSchemaError(f"In context={context}, 'required' is required to be supplied and to be an "
                                    "array including every key in properties. " +
                                    (f"Missing '{missing[0]}'." if missing else "'required' is not an array."))
    for key in _ONE:
        _close(schema.get(key), context + (key,))
    for key in _LIST:
        for i, item in enumerate(schema.get(key) or []):
            _close(item, context + (key, i))
    for key in _MAP:
        for name, item in (schema.get(key) or {}).items():
            _close(item, context + (key, name))
