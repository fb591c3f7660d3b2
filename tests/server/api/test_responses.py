"""The Responses API on a live server: objects, the event stream, stored responses, cancel."""

import json
import time

from model.tokenizer import Tokenizer

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def _events(lines) -> list[dict]:
    """Payloads of an `event:`/`data:` stream, checking that each event's name is its payload's type."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            payload = json.loads(line.removeprefix("data: "))
            assert payload["type"] == name
            events.append(payload)
    return events


def _wait_for_idle_engine(server) -> None:
    deadline = time.monotonic() + 10
    while server.metric("nanoserve_kv_blocks_used") or server.metric("nanoserve_requests_running"):
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.05)


def test_response_object(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    response = client.responses.create(model=server.model, input="Say hello.", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0, metadata={"run": "7"})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert (response.instructions, response.max_output_tokens, response.temperature, response.top_p) \
        == ("Be brief.", 8, 0.0, 1.0)
    assert response.store is True and response.metadata == {"run": "7"} and response.error is None
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.status == "incomplete"
    [part] = message.content
    assert part.type == "output_text" and part.text and response.output_text == part.text
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Say hello."}])
    assert response.usage.input_tokens == len(tokenizer.encode(prompt))
    assert response.usage.output_tokens == 8
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    assert client.responses.retrieve(response.id) == response


def test_stream_event_sequence(http, client, server):
    body = {"model": server.model, "input": "Say hello.", "max_output_tokens": 12, "temperature": 0, "stream": True}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = _events(response.text.splitlines())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    for event in events[3:-1]:
        assert event.get("item_id", event.get("item", {}).get("id")) == item_id
        assert event["output_index"] == 0
        if "content_index" in event:
            assert event["content_index"] == 0
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-4]["text"] == text and events[-3]["part"]["text"] == text
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["output"][0]["content"][0]["text"] == text
    assert client.responses.retrieve(final["id"]).model_dump(exclude_unset=True) == final
    whole = client.responses.create(model=server.model, input="Say hello.", max_output_tokens=12, temperature=0)
    assert whole.output_text == text


def test_stream_through_the_client(client, server):
    events = list(client.responses.create(model=server.model, input="Hi", max_output_tokens=5, temperature=0,
                                          stream=True))
    assert [e.type for e in events if e.type in TERMINAL] == ["response.incomplete"]
    assert events[-1].response.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_previous_response_id_continues_the_whole_conversation(client, server, chat_checkpoint):
    first = client.responses.create(model=server.model, input="What is 2+2?", instructions="Be brief.",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model=server.model, input="And 3+3?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    # instructions are not carried over (as in OpenAI); the earlier input and output are
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "And 3+3?"}]
    tokenizer = Tokenizer(chat_checkpoint)
    assert second.usage.input_tokens == len(tokenizer.encode(tokenizer.apply_chat_template(conversation)))
    chat = client.chat.completions.create(model=server.model, messages=conversation, max_tokens=6, temperature=0)
    assert second.output_text == chat.choices[0].message.content


def test_message_list_input_and_input_items(client, http, server):
    response = client.responses.create(model=server.model, max_output_tokens=2, input=[
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
    ])
    items = client.responses.input_items.list(response.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [("developer", "Answer in French."), ("user", "Hello")]
    assert all(i.type == "message" and i.content[0].type == "input_text" for i in items.data)
    page = http.get(f"/v1/responses/{response.id}/input_items", params={"limit": 1}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert page["data"][0]["role"] == "user"  # newest first by default, as in OpenAI
    assert page["first_id"] == page["last_id"] == page["data"][0]["id"]


def test_store_false_and_delete(client, http, server):
    unstored = client.responses.create(model=server.model, input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    assert http.get(f"/v1/responses/{unstored.id}").status_code == 404

    stored = client.responses.create(model=server.model, input="Hi", max_output_tokens=2)
    deleted = http.delete(f"/v1/responses/{stored.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": stored.id, "object": "response.deleted", "deleted": True}
    for response in (http.get(f"/v1/responses/{stored.id}"), http.delete(f"/v1/responses/{stored.id}"),
                     http.get(f"/v1/responses/{stored.id}/input_items")):
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "response_id"


def test_in_progress_then_cancel_aborts_generation(http, server):
    body = {"model": server.model, "input": "Tell me a long story.", "max_output_tokens": 1500, "temperature": 0,
            "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as stream:
        lines = stream.iter_lines()
        seen = []
        for line in lines:
            seen.append(line)
            if line == "event: response.output_text.delta":
                break
        response_id = _events(seen[:2])[0]["response"]["id"]
        assert http.get(f"/v1/responses/{response_id}").json()["status"] == "in_progress"
        cancelled = http.post(f"/v1/responses/{response_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        events = _events([*seen, *lines])
    assert [e["type"] for e in events if e["type"] in TERMINAL] == ["response.incomplete"]
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["usage"]["output_tokens"] < 1500
    assert http.get(f"/v1/responses/{response_id}").json()["status"] == "cancelled"
    assert http.post(f"/v1/responses/{response_id}/cancel").json()["status"] == "cancelled"
    _wait_for_idle_engine(server)


def test_cancel_a_finished_response(client, http, server):
    response = client.responses.create(model=server.model, input="Hi", max_output_tokens=2)
    refused = http.post(f"/v1/responses/{response.id}/cancel")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_id"
    assert http.post("/v1/responses/resp_unknown/cancel").status_code == 404


def test_output_text_logprobs_leave_out_the_stop_token():
    """A reply whose last text (held-back bytes flushed at the end) comes in the same delta as the EOS
    that ends it: the EOS's entry is dropped, so the output_text's logprobs spell out its text; a stop
    string (no stop token) or a length finish keeps every entry."""
    from server.api.serving_responses import text_logprobs
    from server.engine.request import ChoiceDelta, TokenLogprob

    last, eos = TokenLogprob(17, -0.3, [(17, -0.3)]), TokenLogprob(2, -0.1, [(2, -0.1)])
    by_token = ChoiceDelta(0, "\ufffd", [2], [last, eos], finish_reason="stop", stop_reason=2)
    assert text_logprobs(by_token) == [last]
    assert text_logprobs(ChoiceDelta(0, "", [2], [eos], finish_reason="stop", stop_reason=2)) == []
    by_string = ChoiceDelta(0, "ab", [17, 2], [last, eos], finish_reason="stop", stop_reason="\n\n")
    assert text_logprobs(by_string) == [last, eos]
    assert text_logprobs(ChoiceDelta(0, "ab", [17, 2], [last, eos], finish_reason="length")) == [last, eos]
    assert text_logprobs(ChoiceDelta(0, "ab", [17], None)) == []
