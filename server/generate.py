"""`nanoserve generate`: one prompt through the paged-cache forward pass, text to stdout."""

import argparse
import sys

import torch

from model.batch import SequenceStep, make_batch
from model.load import load_model, model_dir_or_demo
from model.tokenizer import Tokenizer

BLOCK_SIZE = 16


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_main(args: argparse.Namespace) -> int:
    model_dir = model_dir_or_demo(args.model)
    model = load_model(model_dir, args.device, args.dtype)
    tokenizer = Tokenizer(model_dir)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    prompt_ids = tokenizer.encode(prompt)
    num_blocks = (len(prompt_ids) + args.max_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE
    kv_cache = model.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    gen = torch.Generator().manual_seed(args.seed if args.seed is not None else torch.seed())
    generated: list[int] = []
    step = SequenceStep(new_token_ids=prompt_ids, num_cached=0, block_table=range(num_blocks))
    for _ in range(args.max_tokens):
        logits = model.forward(make_batch([step], BLOCK_SIZE, model.device), kv_cache)[0].cpu()
        token = _sample(logits, args.temperature, args.top_p, gen)
        if token in tokenizer.eos_token_ids and not args.ignore_eos:
            break
        generated.append(token)
        step = SequenceStep([token], step.num_cached + len(step.new_token_ids), step.block_table)
    sys.stdout.write(tokenizer.decode(generated) + "\n")
    return 0
