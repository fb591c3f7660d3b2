"""The HTTP app (Quart, served by hypercorn): routes, the API-key check, request ids, per-route
counters, and `nanoserve serve`, which loads the model, serves it and shuts down cleanly on
SIGINT/SIGTERM."""

import argparse
import asyncio
import hmac
import importlib.metadata
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, Response, request

from model.demo import cache_dir
from server.api.errors import APIError, model_not_found, register_error_handlers
from server.api.metrics import CONTENT_TYPE, ServerMetrics
from server.api.protocol import parse_request, random_id
from server.api.protocol_tokenize import DetokenizeRequest, TokenizeRequest
from server.api.response_store import ResponseStore, SQLiteResponseStore
from server.api.response_store_postgres import PostgresResponseStore, is_postgres_url
from server.api.sealed_reasoning import ReasoningSeal, load_or_create_key
from server.api.serving import ServingContext, json_response
from server.api.serving_chat import create_chat_completion
from server.api.serving_completions import create_completion
from server.api.serving_render import render_chat_completion, render_completion
from server.api.serving_responses import ResponsesAPI

if TYPE_CHECKING:  # the app never imports the engine's torch side at run time
    from server.engine.async_engine import AsyncEngine

DEMO_MODEL_NAME = "nanoserve-demo"
# Routes that answer without an API key: probes for load balancers and monitoring, which do no work.
OPEN_ROUTES = frozenset({"/health", "/metrics", "/version"})
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# A client's own x-request-id is echoed when it is a plain token of at most this many characters.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(f"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")
# The key of reasoning items' `encrypted_content` (server.api.sealed_reasoning), in the cache directory.
REASONING_KEY_FILE = "reasoning.key"
# Hypercorn's wait for open connections after shutdown starts; streams end at once by then.
GRACEFUL_TIMEOUT_SECONDS = 5.0


def nanoserve_version() -> str:
    """The installed distribution's version, or the source tree's when run from a checkout."""
    try:
        return importlib.metadata.version("nanoserve")
    except importlib.metadata.PackageNotFoundError:
        pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)


def create_app(engine: "AsyncEngine", model_name: str, store: ResponseStore, api_key: str | None,
               max_body_bytes: int, seal: ReasoningSeal) -> Quart:
    app = Quart("nanoserve")
    # No overall response deadline: a stream lasts as long as its generation.
    app.config.update(MAX_CONTENT_LENGTH=max_body_bytes, RESPONSE_TIMEOUT=None)
    metrics = ServerMetrics(engine.stats, model_name)
    ctx = ServingContext(engine, model_name, metrics)
    responses = ResponsesAPI(ctx, store, seal)
    created = int(time.time())
    version = nanoserve_version()
    register_error_handlers(app)

    @app.after_serving
    async def stop_tokenizer_thread() -> None:
        ctx.close()

    @app.before_request
    async def check_api_key() -> None:
        if api_key is None or request.path in OPEN_ROUTES:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.after_request
    async def count_request(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.http_requests.labels(route, str(response.status_code)).inc()
        response.headers["x-request-id"] = request_id(request.headers.get("x-request-id"))
        return response

    async def body() -> bytes:
        return await request.get_data(as_text=False)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoserve",
                "max_model_len": engine.max_model_len}

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            raise APIError(503, "The inference engine is not running.", type="server_error", code="engine_unavailable")
        return json_response({"status": "ok"})

    @app.get("/version")
    async def get_version() -> Response:
        return json_response({"version": version})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        if model_id != model_name:
            raise model_not_found(model_id)
        return json_response(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await create_chat_completion(ctx, await body())

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await create_completion(ctx, await body())

    @app.post("/v1/responses")
    async def create_response() -> Response:
        return await responses.create(await body())

    @app.post("/v1/responses/input_tokens")
    async def count_input_tokens() -> Response:
        return await responses.count_input_tokens(await body())

    @app.get("/v1/responses/<response_id>")
    async def get_response(response_id: str) -> Response:
        return await responses.retrieve(response_id)

    @app.delete("/v1/responses/<response_id>")
    async def delete_response(response_id: str) -> Response:
        return await responses.delete(response_id)

    @app.get("/v1/responses/<response_id>/input_items")
    async def get_input_items(response_id: str) -> Response:
        return await responses.input_items(response_id, request.args.to_dict())

    @app.post("/v1/responses/<response_id>/cancel")
    async def cancel_response(response_id: str) -> Response:
        return await responses.cancel(response_id)

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's older name, which routers still probe
    async def get_model_info() -> Response:
        # SGLang's shape, read by sglang-router and vllm-router.
        return json_response({
            "model_path": str(engine.model_dir), "tokenizer_path": str(engine.model_dir), "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        })

    @app.post("/v1/chat/completions/render")
    async def chat_completions_render() -> Response:
        return await render_chat_completion(ctx, await body())

    @app.post("/v1/completions/render")
    async def completions_render() -> Response:
        return await render_completion(ctx, await body())

    @app.post("/v1/responses/render")
    async def responses_render() -> Response:
        return await responses.render(await body())

    @app.post("/tokenize")
    async def tokenize() -> Response:
        req = parse_request(TokenizeRequest, await body())
        if req.model is not None:
            ctx.check_model(req.model)
        if req.messages is not None:
            tokens = await ctx.chat_prompt_ids([m.template_message() for m in req.messages], req.enable_thinking,
                                               "messages", add_generation_prompt=req.add_generation_prompt is not False)
        else:
            tokens = await ctx.encode(req.prompt, param="prompt")
        return json_response({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    async def detokenize() -> Response:
        req = parse_request(DetokenizeRequest, await body())
        if req.model is not None:
            ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, param="tokens")
        return json_response({"prompt": await ctx.decode(req.tokens, skip_special_tokens=False)})

    return app


def request_id(client_id: str | None) -> str:
    """The client's x-request-id when it is a plain token, else a new one (as OpenAI's `req_…`)."""
    return client_id if client_id and _REQUEST_ID.fullmatch(client_id) else random_id("req_")


def open_response_store(target: str | None, max_responses: int) -> ResponseStore:
    """--response-store: a PostgreSQL URL (replicas share it), else a SQLite file (default: in the cache)."""
    if target is not None and is_postgres_url(target):
        return PostgresResponseStore(target, max_responses)
    return SQLiteResponseStore(target or cache_dir() / "responses.sqlite3", max_responses)


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else $NANOSERVE_API_KEY; an empty or unsendable key is refused (ValueError)."""
    source, key = ("--api-key", flag) if flag is not None else ("$NANOSERVE_API_KEY", os.environ.get("NANOSERVE_API_KEY"))
    if key is None:
        return None
    if not key:
        raise ValueError(f"{source} is empty: give a key, or leave it unset to serve without one")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"{source} must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def _announce_auth(api_key: str | None, host: str) -> None:
    if api_key is not None:
        _say(f"API key required on every route except {', '.join(sorted(OPEN_ROUTES))}")
        return
    _say("no API key: every route is open (--api-key or $NANOSERVE_API_KEY sets one)")
    if host not in LOCAL_HOSTS:
        _say(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model")


def _say(message: str) -> None:
    print(f"nanoserve: {message}", file=sys.stderr, flush=True)


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return DEMO_MODEL_NAME if args.model is None else Path(args.model).resolve().name


async def _serve(app: Quart, config: Config, engine: "AsyncEngine") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        _say("shutting down")
        # Stopping the engine first ends every in-flight stream with an error event, so that
        # hypercorn's graceful shutdown then finds only finished connections.
        await asyncio.to_thread(engine.shutdown)

    await serve(app, config, shutdown_trigger=shutdown_trigger)


def serve_main(args: argparse.Namespace) -> int:
    from server.engine.async_engine import create_engine  # the app itself never imports torch

    api_key = resolve_api_key(args.api_key)
    store = open_response_store(args.response_store, args.response_store_max)
    seal = ReasoningSeal(load_or_create_key(cache_dir() / REASONING_KEY_FILE))
    name = served_model_name(args)
    _say(f"loading {args.model or 'the demo checkpoint'} (--device {args.device}, --dtype {args.dtype})")
    started = time.monotonic()
    engine = create_engine(args)
    _say(f"loaded {engine.model_dir} as '{name}' in {time.monotonic() - started:.1f} s: "
         f"max_model_len {engine.max_model_len}, {engine.stats().kv_blocks_total} KV blocks; {engine.decode_mode}")
    try:
        _announce_auth(api_key, args.host)
        app = create_app(engine, name, store, api_key, args.max_body_bytes, seal)
        config = Config()
        host = f"[{args.host}]" if ":" in args.host else args.host
        config.bind = [f"{host}:{args.port}"]
        config.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
        try:
            asyncio.run(_serve(app, config, engine))
        except OSError as err:
            raise RuntimeError(f"cannot serve on {host}:{args.port}: {err}") from None
    finally:
        engine.shutdown()
        store.close()
    _say("stopped")
    return 0
