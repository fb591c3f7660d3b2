"""Predicted Outputs and speculative decoding on a live server, through the official `openai` client:
a chat `prediction` changes nothing in the reply but its speed, usage reports its accepted and
rejected tokens as OpenAI does, the endpoints without the field refuse it by name, and a server
started with `--speculative-config` answers exactly as one without."""

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Rewrite the list: alpha, beta, gamma, delta."}]



@pytest.fixture(scope="module")
def plain(client, server):
    return client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=40)


def test_a_prediction_equal_to_the_reply_is_accepted(client, server, plain):
    reply = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=40,
                                           prediction={"type": "content", "content": plain.choices[0].message.content})
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert reply.choices[0].finish_reason == plain.choices[0].finish_reason
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0.5 * plain.usage.completion_tokens
    assert details.rejected_prediction_tokens >= 0
    assert reply.usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.completion_tokens_details is None  # no prediction: usage keeps its shape


def test_a_wrong_prediction_in_text_parts_streams_the_same_reply(client, server, plain):
    content = plain.choices[0].message.content
    wrong = content[: len(content) // 3] + " something else entirely " + content[len(content) // 2 :]
    stream = client.chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
        prediction={"type": "content", "content": [{"type": "text", "text": wrong[:7]}, {"type": "text", "text": wrong[7:]}]})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    details = chunks[-1].usage.completion_tokens_details
    assert details.rejected_prediction_tokens > 0


@pytest.mark.parametrize("body, param", [
    ({"prediction": {"type": "text", "content": "x"}}, "prediction.type"),
    ({"prediction": {"type": "content"}}, "prediction.content"),
    ({"prediction": "x"}, "prediction"),
])
def test_a_malformed_prediction_is_a_400_naming_it(http, server, body, param):
    answer = http.post("/v1/chat/completions", json={"model": server.model, "messages": MESSAGES} | body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_completions_and_responses_refuse_prediction_by_name(client, server):
    prediction = {"type": "content", "content": "hello"}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt="hi", extra_body={"prediction": prediction})
    assert err.value.body["param"] == "prediction" and "/v1/chat/completions" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input="hi", extra_body={"prediction": prediction})
    assert err.value.body["param"] == "prediction"


@pytest.mark.slow  # a server of its own; the flag's fast tests are in tests/server/engine
def test_an_ngram_server_answers_as_a_plain_one(start_server, server, plain):
    spec = start_server("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                        '"prompt_lookup_min": 1, "prompt_lookup_max": 3}')
    assert "speculative decoding: ngram, 3 draft tokens, prompt lookup 1..3" in spec.log()
    repeated = [{"role": "user", "content": "one two three one two three one two three one two"}]
    replies = [s.client().chat.completions.create(model=s.model, messages=repeated, temperature=0, max_tokens=40)
               for s in (server, spec)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    # this checkpoint's replies never repeat a token (no n-gram draft); a prediction drafts on any server
    assert spec.metric("nanoserve_spec_decode_draft_tokens_total") == 0
    predicted = spec.client().chat.completions.create(
        model=spec.model, messages=MESSAGES, temperature=0, max_tokens=40,
        prediction={"type": "content", "content": plain.choices[0].message.content})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    accepted = predicted.usage.completion_tokens_details.accepted_prediction_tokens
    assert spec.metric("nanoserve_spec_decode_accepted_tokens_total") == accepted > 0
    assert spec.metric("nanoserve_spec_decode_draft_tokens_total") == (
        accepted + predicted.usage.completion_tokens_details.rejected_prediction_tokens)
    assert spec.metric('nanoserve_spec_decode_accepted_tokens_per_position_total{position="0"}') > 0
