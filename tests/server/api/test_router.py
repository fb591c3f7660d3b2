"""Two `nanoserve serve` replicas sharing a PostgreSQL response store, behind an existing router (the
pip packages vllm-router and sglang-router, Rust binaries), driven by the official `openai` client
through the router: a Responses conversation chained by previous_response_id across replicas, a
cancel that reaches the replica generating the response, chat and completions streaming, and the
cache-aware policy sending a repeated long prefix back to the replica that cached it.

Two servers and a router take a minute or more to start on two cores: these tests carry the
`router` marker, deselected by default; CI runs them after the default tier (`pytest -m router`)."""

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import free_port, wait_for_health

pytestmark = pytest.mark.router

STARTUP_TIMEOUT_SECONDS = 60
BLOCK_SIZE = 16
ROUTERS = {"vllm-router": "vllm_router", "sglang-router": "sglang_router"}  # pip name: Python package



class Router:
    """A router (`vllm-router` or `sglang-router`) in front of `workers` with `policy`; ready once
    it answers /health (both wait for their workers' health first)."""

    def __init__(self, name: str, workers: list, policy: str, log_path: Path):
        package = ROUTERS[name]
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]' on Linux x86-64)")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", f"{package}.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
                   "--prometheus-port", str(free_port()), "--policy", policy,
                   "--worker-urls", *(worker.base_url for worker in workers)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        problem = wait_for_health(self.process, self.base_url, STARTUP_TIMEOUT_SECONDS)
        if problem is not None:
            self.stop()
            raise RuntimeError(f"{name} {problem}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def replicas(start_server, postgres):
    store = postgres.new_database()
    return [start_server("--response-store", store) for _ in range(2)]


@pytest.fixture(scope="module")
def router_for(replicas, tmp_path_factory):
    """A router with a given policy in front of both replicas (one of each, stopped at the end)."""
    routers: dict[tuple[str, str], Router] = {}

    def router_for(name: str, policy: str) -> Router:
        if (name, policy) not in routers:
            log = tmp_path_factory.mktemp("router") / f"{name}-{policy}.log"
            routers[name, policy] = Router(name, replicas, policy, log)
        return routers[name, policy]

    yield router_for
    for router in routers.values():
        router.stop()


def _served(replicas, route: str) -> list[float]:
    """How many requests to `route` each replica has answered with 200."""
    return [replica.metric(f'nanoserve_http_requests_total{{route="{route}",status="200"}}', 0) for replica in replicas]


def _which(replicas, route: str, before: list[float]) -> int:
    """The one replica that answered `route` since `before`."""
    grown = [i for i, (now, then) in enumerate(zip(_served(replicas, route), before)) if now > then]
    assert len(grown) == 1, grown
    return grown[0]


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["harbour", "station", "bridge", "market", "tower", "river", "square"])
                    for _ in range(count))


@pytest.mark.parametrize("name", ROUTERS)
def test_a_responses_conversation_alternates_replicas_behind_round_robin(replicas, router_for, name):
    client = router_for(name, "round_robin").client()
    model = replicas[0].model
    served, previous, input_tokens = [], None, []
    for turn in ("Where is the harbour?", "And the station?", "Which is closer?"):
        before = _served(replicas, "/v1/responses")
        response = client.responses.create(model=model, input=turn, previous_response_id=previous,
                                           max_output_tokens=8, temperature=0)
        served.append(_which(replicas, "/v1/responses", before))
        assert response.status == "incomplete" and response.usage.output_tokens == 8
        previous = response.id
        input_tokens.append(response.usage.input_tokens)
    assert served in ([0, 1, 0], [1, 0, 1])  # each turn on the other replica than the turn before
    # Each turn's prompt held the earlier turns, which only the shared store could give the other replica.
    assert input_tokens[0] + 8 < input_tokens[1] and input_tokens[1] + 8 < input_tokens[2]
    assert client.responses.retrieve(previous).model_dump() == response.model_dump()
    assert [r.client().responses.retrieve(previous).model_dump() for r in replicas] == [response.model_dump()] * 2
    if name == "vllm-router":  # sglang-router answers input_items with 501 itself
        assert [item.content[0].text for item in client.responses.input_items.list(previous).data] == [turn]
    # Both routers answer DELETE with 501 themselves: it goes to a replica, and the other one agrees.
    replicas[served[-1]].client().responses.delete(previous)
    with pytest.raises(openai.NotFoundError):
        replicas[1 - served[-1]].client().responses.retrieve(previous)


def test_a_cancel_reaches_the_replica_generating_the_response(replicas, router_for):
    client = router_for("vllm-router", "round_robin").client()

    def start() -> tuple[str, int, object]:
        """A long response streaming through the router: its id, the replica generating it, its events."""
        before = _served(replicas, "/v1/responses")
        events = iter(client.responses.create(model=replicas[0].model, input=words(seed=9, count=5),
                                              max_output_tokens=2000, temperature=0, stream=True))
        return next(events).response.id, _which(replicas, "/v1/responses", before), events

    # Asked of the replica that is not generating it, which asks the other through the store.
    response_id, generating, events = start()
    cancelled = replicas[1 - generating].client().responses.cancel(response_id)
    *_, terminal = list(events)
    assert cancelled.status == "cancelled" and terminal.response.status == "cancelled"
    assert terminal.response.usage.output_tokens == cancelled.usage.output_tokens < 2000
    # Through the router, to whichever replica it picks.
    response_id, _, events = start()
    assert client.responses.cancel(response_id).status == "cancelled"
    assert list(events)[-1].response.status == "cancelled"


@pytest.mark.parametrize("name", ROUTERS)
def test_chat_and_completions_stream_through_the_router(replicas, router_for, name):
    client, direct = router_for(name, "round_robin").client(), replicas[0].client()
    model = replicas[0].model
    messages = [{"role": "user", "content": words(seed=5, count=12)}]
    expected = direct.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    before = _served(replicas, "/v1/chat/completions")
    for _ in range(2):  # round robin: once on each replica
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        *chunks, last = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            expected.choices[0].message.content
        assert last.usage.completion_tokens == expected.usage.completion_tokens == 12
    assert [now - then for now, then in zip(_served(replicas, "/v1/chat/completions"), before)] == [1, 1]
    prompt = words(seed=6, count=10)
    expected = direct.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    for _ in range(2):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected.choices[0].text


def test_cache_aware_routing_sends_a_repeated_prefix_back_to_its_replica(replicas, router_for):
    model = replicas[0].model

    def ask(client, system: str, question: str) -> tuple[int, int]:
        """(the replica that answered, its cached prompt tokens)"""
        before = _served(replicas, "/v1/chat/completions")
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=2, temperature=0)
        return _which(replicas, "/v1/chat/completions", before), reply.usage.prompt_tokens_details.cached_tokens

    # Round robin, the control: a repeated prefix lands on the other replica, which has not cached it.
    round_robin = router_for("vllm-router", "round_robin").client()
    system = words(seed=7, count=300)
    (first, _), (second, cached) = ask(round_robin, system, "Which way?"), ask(round_robin, system, "How far?")
    assert first != second and cached == 0

    cache_aware = router_for("vllm-router", "cache_aware").client()
    renders_before = sum(_served(replicas, "/v1/chat/completions/render"))
    system = words(seed=8, count=300)
    answers = [ask(cache_aware, system, question) for question in ("Which way?", "How far?", "When?", "Who?")]
    system_turn = httpx.post(f"{replicas[0].base_url}/tokenize", json={
        "messages": [{"role": "system", "content": system}], "add_generation_prompt": False}).json()["count"]
    home = answers[0][0]
    assert answers == [(home, 0)] + [(home, system_turn // BLOCK_SIZE * BLOCK_SIZE)] * 3
    # The router matched prefixes of our rendering of each request.
    assert sum(_served(replicas, "/v1/chat/completions/render")) - renders_before >= len(answers)
