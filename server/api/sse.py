"""Server-sent events as OpenAI streams them: `data:` lines for chat and completions, named
`event:` + `data:` pairs for the Responses API, and comment lines that keep idle connections open."""

import json

DONE = "data: [DONE]\n\n"
# A comment line: clients ignore it, but proxies and client read timeouts see bytes flowing.
KEEPALIVE = ": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def to_json(payload: dict) -> str:
    # json.dumps escapes newlines inside strings, so one payload is always one `data:` line.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def data_event(payload: dict) -> str:
    return f"data: {to_json(payload)}\n\n"


def named_event(event_type: str, payload: dict) -> str:
    return f"event: {event_type}\ndata: {to_json(payload)}\n\n"
