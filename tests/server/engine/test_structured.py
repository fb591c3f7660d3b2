"""Structured outputs in the engine: on the demo model (random weights, so only the grammar can make
its text valid) every constrained reply parses, matches its schema and ends with EOS; preemption
does not disturb a grammar; what cannot be compiled is refused with the grammar engine's reason.

The schemas bound their strings and numbers (maxLength, minimum/maximum, multipleOf), so each test
here holds whatever the weights do; the demo's own guarantee for unbounded schemas (its weights
close what a grammar opens) is counted over seeds in tests/server/api/test_demo_structured.py."""

import asyncio
import json
import re
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.load import load_model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.core import validate_request
from server.engine.request import (
    CustomToolSchema,
    FunctionSchema,
    GenerationRequest,
    GrammarError,
    RequestRejected,
    SamplingParams,
    StructuredOutput,
)
from server.engine.structured import GrammarCompiler, TokenBitmask
from tests.server.engine.test_engine import demo, make_engine  # noqa: F401  (the demo model and engines)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have it


class Address(Strict):
    city: str = Field(max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(Strict):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=130)
    height: float = Field(ge=0, le=250, multiple_of=0.5)
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    address: Address
    nickname: str | None = Field(max_length=8)
    alive: bool


class Order(Strict):
    items: list[Address] = Field(min_length=1, max_length=2)
    total: int = Field(ge=-1000, le=10**6)
    note: str = Field(max_length=20)


class Weather(Strict):
    city: str = Field(max_length=16)
    unit: Literal["c", "f"]


class Search(Strict):
    query: str = Field(max_length=20)
    limit: int = Field(ge=1, le=10)


def schema_of(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema())


TOOLS = (FunctionSchema("get_weather", schema_of(Weather)), FunctionSchema("search", schema_of(Search)))
TOOL_MODELS = {"get_weather": Weather, "search": Search}
CALL = re.compile(r'<tool_call>\n\{"name": "(\w+)", "arguments": (.*?)\}\n</tool_call>', re.DOTALL)


def generate_all(engine: AsyncEngine, requests: list[GenerationRequest]) -> list[tuple[str, list[int], str]]:
    """(text, token ids, finish reason) of choice 0 of each request, run concurrently."""
    async def one(request):
        text, token_ids, finish = "", [], None
        async for output in engine.generate(request):
            for delta in output.choices:
                text, token_ids, finish = text + delta.text, token_ids + delta.token_ids, delta.finish_reason
        return text, token_ids, finish

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(main())


def constrained(prompt_seed: int, constraint: StructuredOutput, seed: int, **params) -> GenerationRequest:
    prompt = torch.randint(0, 151643, (7,), generator=torch.Generator().manual_seed(prompt_seed)).tolist()
    params = dict(temperature=1.0, seed=seed, max_tokens=400) | params
    return GenerationRequest(f"s{prompt_seed}-{seed}", prompt, SamplingParams(structured_output=constraint, **params))


@pytest.mark.parametrize("model", [Person, Order], ids=["person", "order"])
def test_every_reply_matches_its_schema_and_stops(make_engine, model):
    engine = make_engine()
    constraint = StructuredOutput("json_schema", json_schema=schema_of(model))
    results = generate_all(engine, [constrained(seed, constraint, seed) for seed in range(16)])
    for text, _, finish in results:
        assert finish == "stop", text
        model.model_validate_json(text)  # strict JSON (no raw control characters) and the schema
    assert len({text for text, _, _ in results}) == 16  # the seeds differ, so do the replies


def test_json_object_replies_are_json_objects(make_engine):
    """Any object: its strings are unbounded, so on random weights a free reply runs to max_tokens
    inside a string (still the start of an object). Biased toward '"' and '}', replies close each
    string and the object as soon as the grammar allows, and then end: as JSON objects."""
    engine = make_engine()
    json_object = StructuredOutput("json_object")
    free = generate_all(engine, [constrained(seed, json_object, seed, max_tokens=32) for seed in range(4)])
    assert all(text.startswith('{"') for text, _, _ in free)
    closers = {engine.tokenizer.encode(text)[0]: 100.0 for text in ('"', '}')}
    closing = generate_all(engine, [constrained(seed, json_object, seed, max_tokens=96, logit_bias=closers)
                                    for seed in range(4)])
    for text, _, finish in closing:
        assert finish == "stop" and isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "parallel"])
def test_forced_tool_calls_are_qwen3_blocks_with_valid_arguments(make_engine, parallel):
    engine = make_engine()
    constraint = StructuredOutput("tool_calls", functions=TOOLS, parallel=parallel)
    results = generate_all(engine, [constrained(seed, constraint, seed) for seed in range(12)])
    counts = []
    for text, token_ids, finish in results:
        assert finish == "stop", text
        calls = CALL.findall(text)
        assert "\n".join(m.group(0) for m in CALL.finditer(text)) == text  # nothing but calls
        assert token_ids[0] == 151657  # <tool_call> as the model's own token
        for name, arguments in calls:
            TOOL_MODELS[name].model_validate_json(arguments)
        counts.append(len(calls))
    assert set(counts) == {1} if not parallel else max(counts) >= 1


def test_preemption_does_not_replay_tokens_into_the_grammar(make_engine):
    """A tiny cache preempts and recomputes sequences mid-reply; each seeded reply is still the one
    it is alone, and valid (a grammar fed the recomputed tokens again would reject them or drift)."""
    constraint = StructuredOutput("json_schema", json_schema=schema_of(Person))
    requests = [constrained(seed, constraint, seed, max_tokens=160) for seed in range(6)]
    alone = [generate_all(make_engine(), [r])[0] for r in requests]
    engine = make_engine(num_kv_blocks=20, max_num_batched_tokens=64)
    together = generate_all(engine, [constrained(seed, constraint, seed, max_tokens=160) for seed in range(6)])
    assert engine.stats().num_preemptions > 0
    assert [t for _, t, _ in together] == [t for _, t, _ in alone]
    for text, _, finish in together:
        assert finish == "stop"
        Person.model_validate_json(text)


def test_a_grammar_allows_escapes_and_refuses_raw_control_characters(demo):
    _, tokenizer = demo
    compiler = GrammarCompiler(tokenizer, 151936)
    constraint = StructuredOutput("json_schema", json_schema=schema_of(Order))
    bitmask = TokenBitmask(1, 151936, torch.device("cpu"))

    def allowed_after(text: str) -> torch.Tensor:
        matcher = compiler.matcher(constraint)
        for token in tokenizer.encode(text):
            matcher.accept(token)
        bitmask.start_fill([matcher])
        masks, rows = bitmask.finish_fill()
        logits = torch.zeros(1, 151936)
        from nanoserve_kernels import apply_token_bitmask_
        apply_token_bitmask_(logits, masks, rows)
        return torch.isfinite(logits[0])

    prefix = '{"items": [{"city": "a\\"b\\\\c\\n", "zip": "12345"}], "total": 3, "note": "x'
    allowed = allowed_after(prefix)
    assert allowed[tokenizer.encode("\\")[0]] and allowed[tokenizer.encode('"')[0]]
    assert not allowed[tokenizer.encode("\t")[0]] and not allowed[tokenizer.encode("\n")[0]]
    done = allowed_after(prefix + '"}')
    assert done.nonzero().flatten().tolist() == sorted(tokenizer.eos_token_ids)  # complete: only EOS


def test_what_cannot_be_compiled_is_refused_with_the_engines_reason(demo):
    _, tokenizer = demo
    compiler = GrammarCompiler(tokenizer, 151936)
    with pytest.raises(GrammarError, match="Unimplemented keys.*minContains") as err:
        compiler.compile(StructuredOutput("json_schema", json_schema=json.dumps(
            {"type": "array", "contains": {"type": "string"}, "minContains": 2})))
    assert err.value.function_index is None
    bad_tool = FunctionSchema("bad", json.dumps({"type": "nonsense"}))
    with pytest.raises(GrammarError, match="Invalid type: nonsense") as err:
        compiler.compile(StructuredOutput("tool_calls", functions=(TOOLS[0], bad_tool)))
    assert err.value.function_index == 1
    assert compiler.compile(StructuredOutput("json_object")) is compiler.compile(StructuredOutput("json_object"))


COUNT = CustomToolSchema("count", "regex", r"^[0-9]{1,3} (apples|pears)$")
DIFF = CustomToolSchema("diff", "lark", 'start: line (LF line){0,2}\nline: ("+" | "-") /[a-z]{1,8}/\n%import common.LF')
CALL_BLOCK = re.compile(r'<tool_call>\n\{"name": "(\w+)", "arguments": (.*?)\}\n</tool_call>', re.DOTALL)


def test_custom_tool_inputs_follow_their_grammars_and_formats_compose_with_tools(demo):
    """Custom tools write raw input where JSON arguments go (free text, a regex, a Lark grammar);
    under "auto" with a response format the reply is JSON in the format or calls, nothing else."""
    _, tokenizer = demo
    compiler = GrammarCompiler(tokenizer, 151936)
    either = StructuredOutput("tool_calls", functions=(TOOLS[0], COUNT, DIFF, CustomToolSchema("free")), parallel=True,
                              or_reply=StructuredOutput("json_schema", json_schema=schema_of(Search)))

    def accepts(text: str) -> bool:
        matcher = compiler.matcher(either)._matcher
        return all(matcher.consume_token(t) for t in tokenizer.encode(text)) and matcher.is_accepting()

    def call(name: str, arguments: str) -> str:
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'

    assert accepts('{"query": "x", "limit": 3}') and accepts(call("get_weather", '{"city": "P", "unit": "c"}'))
    assert accepts(call("count", "12 pears") + "\n" + call("diff", "+abc\n-de") + "\n" + call("free", "} any {\n"))
    for text in ('{"query": "x"}', "plain text", call("count", "12 plums"), call("diff", "+abc\n"),
                 call("get_weather", '{"city": "P"}'), '{"query": "x", "limit": 3}' + call("count", "1 pears")):
        assert not accepts(text), text
    bad = CustomToolSchema("bad", "lark", "start: undefined_rule")
    with pytest.raises(GrammarError, match="undefined_rule") as err:
        compiler.compile(StructuredOutput("tool_calls", functions=(COUNT, bad)))
    assert err.value.function_index == 1


@pytest.fixture
def random_engine(chat_checkpoint):
    """An engine on random weights: the demo blocks special tokens such as <tool_call> outright,
    so only here can a logit_bias steer a free choice into the call branch."""
    engine = AsyncEngine(load_model(chat_checkpoint, "cpu"), Tokenizer(chat_checkpoint), chat_checkpoint, EngineConfig())
    yield engine
    engine.shutdown()


def test_a_reply_under_auto_with_a_format_is_json_or_calls_as_steered(random_engine):
    engine = random_engine
    either = StructuredOutput("tool_calls", functions=(TOOLS[0], COUNT, DIFF), parallel=False,
                              or_reply=StructuredOutput("json_schema", json_schema=schema_of(Search)))
    call_token = engine.tokenizer.encode("<tool_call>")[0]
    replies = generate_all(engine, [constrained(seed, either, seed, logit_bias={call_token: -100.0}) for seed in range(2)])
    for text, _, finish in replies:
        assert finish == "stop" and Search.model_validate_json(text), text
    calls = generate_all(engine, [constrained(seed, either, seed, logit_bias={call_token: 100.0}) for seed in range(6)])
    names = set()
    for _, token_ids, finish in calls:
        text = engine.tokenizer.decode(token_ids, skip_special_tokens=False)
        match = CALL_BLOCK.fullmatch(text.removesuffix("<|im_end|>").removesuffix("<|endoftext|>"))
        assert finish == "stop" and match, text
        name, arguments = match.groups()
        names.add(name)
        if name == "get_weather":
            Weather.model_validate_json(arguments)
        elif name == "count":
            assert re.fullmatch(r"[0-9]{1,3} (apples|pears)", arguments), arguments
        else:
            assert re.fullmatch(r"[+-][a-z]{1,8}(\n[+-][a-z]{1,8}){0,2}", arguments), arguments
    assert len(names) > 1  # more than one tool was called over the seeds


@pytest.mark.parametrize("params, param", [({"ignore_eos": True}, "ignore_eos"), ({"min_tokens": 3}, "min_tokens")])
def test_structured_output_refuses_what_would_keep_eos_out(params, param):
    request = GenerationRequest("r", [1, 2], SamplingParams(structured_output=StructuredOutput("json_object"), **params))
    with pytest.raises(RequestRejected) as err:
        validate_request(request, 151936, 2048)
    assert err.value.param == param
