"""Request validation: every bad body is a 400 whose `param` names the field, and good bodies
map onto the engine's SamplingParams. Also the SSE framing the streams rely on."""

import json

import pytest

from server.api import sse
from server.api.errors import APIError
from server.api.protocol import parse_request
from server.api.protocol_chat import ChatCompletionRequest
from server.api.protocol_completions import CompletionRequest
from server.api.protocol_responses import ResponsesRequest
from server.api.protocol_responses_items import chat_messages

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _error(model_class, body: dict | bytes) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as caught:
        parse_request(model_class, raw)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": "yes"}, "stream"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": "42"}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop[1]"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0].type"),
        ({"min_p": 2}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ],
)
def test_bad_chat_request_names_the_field(change, param):
    error = _error(ChatCompletionRequest, CHAT | change)
    assert error.param == param
    assert param.split("[")[0].split(".")[0] in error.message


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
])
def test_unimplemented_chat_features_are_refused_by_name(field, value):
    error = _error(ChatCompletionRequest, CHAT | {field: value})
    assert error.param == field
    assert "not supported yet" in error.message


def test_missing_field_and_malformed_json():
    assert _error(ChatCompletionRequest, {"model": "m"}).message == "Missing required parameter: 'messages'."
    malformed = _error(ChatCompletionRequest, b'{"model": "m", ')
    assert malformed.param is None and "could not parse the JSON body" in malformed.message
    assert _error(ChatCompletionRequest, b"[1, 2]").message == "The request body must be a JSON object."


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"suffix": "end"}, "suffix", "not supported yet"),
        ({"max_tokens": 0}, "max_tokens", "only with 'echo'"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [[1, 2], []]}, "prompt", "must not be empty"),
        ({"prompt": [1, "a"]}, "prompt", "valid"),
        ({"prompt": True}, "prompt", "valid"),
        ({"best_of": 3}, "best_of", "not supported yet"),
    ],
)
def test_bad_completion_request(change, param, words):
    error = _error(CompletionRequest, {"model": "m", "prompt": "hi"} | change)
    assert error.param == param
    assert words in error.message


@pytest.mark.parametrize("prompt, prompts", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt, prompts):
    request = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode())
    assert request.prompts == prompts
    assert request.max_tokens == 16  # OpenAI's default for completions


def test_chat_request_maps_onto_sampling_params():
    body = CHAT | {"temperature": 0, "top_p": 0.5, "n": 3, "stop": "END", "seed": 7, "max_completion_tokens": 9,
                   "max_tokens": 100, "logit_bias": {"42": -100}, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                   "min_tokens": 2, "ignore_eos": True, "logprobs": True, "top_logprobs": 3, "user": "u1"}
    request = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    params = request.sampling_params(request.max_new_tokens, request.logprobs_count)
    assert (params.temperature, params.top_p, params.n, params.stop, params.seed) == (0, 0.5, 3, ["END"], 7)
    assert (params.max_tokens, params.logit_bias, params.top_k, params.min_p) == (9, {42: -100}, 5, 0.1)
    assert (params.repetition_penalty, params.min_tokens, params.ignore_eos, params.logprobs) == (1.2, 2, True, 3)


def test_null_fields_mean_defaults():
    body = CHAT | {"temperature": None, "top_p": None, "n": None, "stop": None, "max_tokens": None}
    request = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    params = request.sampling_params(request.max_new_tokens, request.logprobs_count)
    assert (params.temperature, params.top_p, params.n, params.stop, params.max_tokens) == (1.0, 1.0, 1, [], None)
    assert params.logprobs is None


@pytest.mark.parametrize("change, param", [
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"tools": [{"type": "local_shell"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"background": True}, "background"),
])
def test_bad_responses_request(change, param):
    assert _error(ResponsesRequest, {"model": "m", "input": "hi"} | change).param == param


def test_responses_input_items_become_chat_messages():
    body = {"model": "m", "input": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "2+"}, {"type": "input_text", "text": "2?"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "add"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
    ]}
    request = parse_request(ResponsesRequest, json.dumps(body).encode())
    assert chat_messages(request.items()) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]


def test_sse_framing():
    assert sse.data_event({"a": "x\ny", "b": "é"}) == 'data: {"a":"x\\ny","b":"é"}\n\n'
    assert sse.named_event("response.created", {"n": 1}) == 'event: response.created\ndata: {"n":1}\n\n'
    assert sse.DONE == "data: [DONE]\n\n"
    assert sse.KEEPALIVE.startswith(":") and sse.KEEPALIVE.endswith("\n\n")


def test_function_calls_and_outputs_become_chat_messages():
    body = {"model": "m", "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "look it up"}]},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "not json"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
    ]}
    request = parse_request(ResponsesRequest, json.dumps(body).encode())
    assert chat_messages(request.items()) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "look it up", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
    ]


def test_a_named_tool_choice_forces_that_function_even_one_called_auto():
    tools = [{"type": "function", "function": {"name": name}} for name in ("auto", "required")]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "auto"}}, "parallel_tool_calls": False}
    constraint = parse_request(ChatCompletionRequest, json.dumps(body).encode()).structured_output()
    assert constraint.kind == "tool_calls" and not constraint.parallel
    assert [f.name for f in constraint.functions] == ["auto"]
    assert json.loads(constraint.functions[0].parameters) == {"type": "object", "properties": {}, "additionalProperties": False}
    auto = parse_request(ChatCompletionRequest, json.dumps(body | {"tool_choice": "auto"}).encode())
    assert auto.structured_output() is None
