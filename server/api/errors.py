"""Every failure as OpenAI reports it: `{"error": {"message", "type", "param", "code"}}` with the
status code the official client maps to its exception classes, including the failures that the
framework itself raises (unknown route, wrong method, body too large, unparsable body)."""

import json
import logging

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from server.engine.request import EngineDead, EngineOverloaded, RequestFailed, RequestRejected

log = logging.getLogger("nanoserve")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_supported(param: str) -> APIError:
    return invalid_request(f"'{param}' is not supported yet by this server.", param=param)


def prediction_not_here(endpoint: str) -> APIError:
    """`prediction` outside chat completions, where OpenAI has no such field either."""
    return invalid_request(f"'prediction' (Predicted Outputs) is not a parameter of {endpoint}; "
                           "it is supported on /v1/chat/completions.", param="prediction")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    return APIError(500, message, type="server_error", code="server_error")


def as_api_error(error: Exception) -> APIError:
    """The client's view of a failure: engine errors by kind; anything unexpected is a logged 500."""
    if isinstance(error, RequestRejected):
        return invalid_request(str(error), param=error.param, code=error.code)
    if isinstance(error, EngineOverloaded):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return APIError(429, f"The server is overloaded: {error}", "rate_limit_error", None, "rate_limit_exceeded", headers)
    if isinstance(error, RequestFailed):  # the engine has logged it; other requests go on
        return server_error(f"The server had an error while processing your request: {error}")
    if isinstance(error, EngineDead):
        return APIError(503, f"The inference engine is not running: {error}", "server_error", None, "engine_unavailable")
    if isinstance(error, APIError):
        return error
    log.error("request failed", exc_info=error)
    return server_error()


def error_response(error: APIError) -> Response:
    return Response(json.dumps(error.body()), status=error.status, headers=error.headers, mimetype="application/json")


def _http_exception(error: HTTPException) -> APIError:
    # OpenAI answers a method a /v1/ route does not take as it answers an unknown route.
    if error.code == 404 or (error.code == 405 and request.path.startswith("/v1/")):
        return APIError(404, f"Invalid URL ({request.method} {request.path})")
    if error.code == 405:
        return APIError(405, f"Method {request.method} is not allowed for {request.path}")
    if error.code == 413:
        limit = request.max_content_length
        return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).")
    return APIError(error.code or 500, error.description or error.name)


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def _api_error(error: APIError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def _framework_error(error: HTTPException) -> Response:
        return error_response(_http_exception(error))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        return error_response(as_api_error(error))
