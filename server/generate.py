"""`nanoserve generate`: one prompt through the engine, its generated text streamed to stdout."""

import argparse
import asyncio
import sys

from server.engine.async_engine import AsyncEngine, create_engine
from server.engine.request import GenerationRequest, SamplingParams


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
    )


async def _stream(engine: AsyncEngine, request: GenerationRequest) -> None:
    async for output in engine.generate(request):
        for choice in output.choices:
            sys.stdout.write(choice.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def generate_main(args: argparse.Namespace) -> int:
    engine = create_engine(args)
    try:
        tokenizer = engine.tokenizer
        if args.chat:  # as the server does: special-token text in PROMPT stays text
            prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = tokenizer.encode(args.prompt)
        request = GenerationRequest("generate", prompt_ids, sampling_params(args))
        asyncio.run(_stream(engine, request))
    finally:
        engine.shutdown()
    return 0
