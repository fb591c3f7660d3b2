"""Grammar engines compared for structured outputs: mask time per token at batch 16, and validity.

    python -m bench.grammar_engines [--steps 200]

Needs both engines installed (`pip install llguidance xgrammar`; nanoserve itself depends on
llguidance only). For each engine and test grammar (any JSON object; a nested schema with bounded
strings, numbers, an enum array and a nested object; Qwen3 tool-call blocks for two functions),
16 matchers walk their grammar at once: every step fills all 16 token masks (timed, one after the
other, as the engine does), then each row samples from random logits (N(0, 2.4^2), the demo
checkpoint's spread) restricted to its mask and advances; a finished reply is checked with
Python's strict JSON parser and its matcher starts again. Last, each engine is asked whether a
string with `maxLength` may hold a raw TAB (strict JSON says no) and an escaped quote (yes). The same llguidance grammars as the
server's (`server.engine.structured.grammar_source`); xgrammar's are built from the same schemas
with the same JSON style.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from model.demo import demo_checkpoint
from model.tokenizer import Tokenizer
from server.engine.request import FunctionSchema, StructuredOutput
from server.engine.structured import JSON_STYLE, TOOL_CALL_ARGUMENTS, TOOL_CALL_HEAD, TOOL_CALL_TAIL, grammar_source

BATCH, VOCAB = 16, 151936
NESTED = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "score", "tags", "address", "active"], "properties": {
              "name": {"type": "string", "maxLength": 12},
              "age": {"type": "integer", "minimum": 0, "maximum": 150},
              "score": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.5},
              "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
              "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"], "properties": {
                  "city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
              "active": {"type": "boolean"}}}
FUNCTIONS = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}},
    "search": {"type": "object", "additionalProperties": False, "required": ["query", "limit"], "properties": {
        "query": {"type": "string", "maxLength": 24}, "limit": {"type": "integer", "minimum": 1, "maximum": 10}}},
}
CONSTRAINTS = {
    "json_object": StructuredOutput("json_object"),
    "nested schema": StructuredOutput("json_schema", json_schema=json.dumps(NESTED)),
    "tool calls": StructuredOutput("tool_calls", functions=tuple(
        FunctionSchema(name, json.dumps(schema)) for name, schema in FUNCTIONS.items())),
}


class Llguidance:
    def __init__(self, tokenizer: Tokenizer):
        import llguidance

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=VOCAB,
                                                eos_token=list(tokenizer.eos_token_ids))

    def matchers(self, constraint: StructuredOutput) -> list:
        compiled = self.lib.LLMatcher(self.tokenizer, grammar_source(constraint), log_level=0)
        return [compiled.deep_copy() for _ in range(BATCH)]

    @staticmethod
    def fill(matcher, row: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    def __init__(self, tokenizer: Tokenizer):
        import xgrammar
        from transformers import AutoTokenizer

        self.lib = xgrammar
        hf = AutoTokenizer.from_pretrained(str(demo_checkpoint()))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=list(tokenizer.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def _json(self, schema: str):
        style = (JSON_STYLE["item_separator"], JSON_STYLE["key_separator"])
        return self.lib.Grammar.from_json_schema(schema, any_whitespace=False, separators=style)

    def matchers(self, constraint: StructuredOutput) -> list:
        g = self.lib.Grammar
        if constraint.kind == "tool_calls":
            def literal(text: str):
                return g.from_ebnf("root ::= " + json.dumps(text))

            grammar = g.union(*(g.concat(literal("<tool_call>" + TOOL_CALL_HEAD + f.name + TOOL_CALL_ARGUMENTS),
                                         self._json(f.parameters), literal(TOOL_CALL_TAIL + "</tool_call>"))
                                for f in constraint.functions))
        else:
            grammar = self._json(constraint.json_schema or '{"type": "object"}')
        compiled = self.compiler.compile_grammar(grammar)
        return [self.lib.GrammarMatcher(compiled) for _ in range(BATCH)]

    @staticmethod
    def fill(matcher, row: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(row.view(1, -1), 0)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)


def allowed(bitmask: torch.Tensor) -> torch.Tensor:
    return (((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)[:, :VOCAB]).bool()


def run(engine, constraint: StructuredOutput, steps: int, tokenizer: Tokenizer, eos: set[int]) -> dict:
    matchers = engine.matchers(constraint)
    bitmask = torch.zeros(BATCH, -(-VOCAB // 32), dtype=torch.int32)
    replies: list[list[int]] = [[] for _ in range(BATCH)]
    times, finished, invalid = [], 0, []
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        started = time.perf_counter()
        for row, matcher in enumerate(matchers):
            engine.fill(matcher, bitmask[row])
        times.append(time.perf_counter() - started)
        logits = (torch.randn(BATCH, VOCAB, generator=generator) * 2.4).masked_fill(~allowed(bitmask), float("-inf"))
        tokens = logits.softmax(-1).multinomial(1, generator=generator)[:, 0].tolist()
        for row, token in enumerate(tokens):
            if token in eos:
                text = tokenizer.decode(replies[row])
                if constraint.kind != "tool_calls":
                    try:
                        json.loads(text)  # strict: no raw control characters in strings
                    except ValueError:
                        invalid.append(text)
                finished += 1
                replies[row] = []
                matchers[row] = engine.matchers(constraint)[0]
                continue
            assert engine.accept(matchers[row], token)
            replies[row].append(token)
    median = statistics.median(times)
    return {"ms_per_step": median * 1e3, "us_per_token": median / BATCH * 1e6,
            "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3, "finished": finished, "invalid": invalid}


# Strict JSON for the nested schema's "name" (a string with maxLength): a raw TAB is invalid, an escape valid.
PROBES = {"raw TAB": '{"name": "a\tb', "escaped quote": '{"name": "a\\"b'}


def probe(engine, tokenizer: Tokenizer, text: str) -> str:
    matcher = engine.matchers(CONSTRAINTS["nested schema"])[0]
    return "accepted" if all(engine.accept(matcher, t) for t in tokenizer.encode(text)) else "refused"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps per engine and grammar (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = Tokenizer(demo_checkpoint())
    eos = set(tokenizer.eos_token_ids)
    print(f"{'engine':11} {'grammar':14} {'ms/step (16)':>12} {'p90 ms':>8} {'us/token':>9} {'replies':>8} {'invalid':>8}")
    for engine_class in (Llguidance, Xgrammar):
        try:
            engine = engine_class(tokenizer)
        except ImportError as err:
            print(f"{engine_class.__name__.lower()}: not installed ({err})", file=sys.stderr)
            continue
        for name, constraint in CONSTRAINTS.items():
            r = run(engine, constraint, args.steps, tokenizer, eos)
            print(f"{engine_class.__name__.lower():11} {name:14} {r['ms_per_step']:12.2f} {r['p90_ms']:8.2f} "
                  f"{r['us_per_token']:9.1f} {r['finished']:8} {len(r['invalid']):8}")
            for text in r["invalid"][:2]:
                print(f"    invalid JSON: {text[:120]!r}")
        name = engine_class.__name__.lower()
        print(f"{name}: in a maxLength string, " + ", ".join(f"{what} {probe(engine, tokenizer, text)}"
                                                           for what, text in PROBES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
