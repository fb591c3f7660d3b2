"""`nanoserve` command line: `generate` (one prompt, printed), `serve` (the OpenAI server) and
`check` (nanoserve against transformers, layer by layer: `server.check`).

Flags are checked before the model loads, each bad one reported in one line that names it.
"""

import argparse
import logging
import math
import os
import sys
from pathlib import Path

DESCRIPTION = "A small, readable LLM inference server: generate one completion, or serve the OpenAI API."
# Ordinary chat requests fit in a few KiB; a smaller limit would refuse them.
MIN_BODY_BYTES = 4096
# Engine and server sizes that must be at least 1 when given.
POSITIVE_FLAGS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "block_size",
                  "max_queue", "max_tokens", "response_store_max", "tensor_parallel_size")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Qwen3 checkpoint directory (HF layout); default: the embedded demo")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights and activations; auto = the checkpoint's (float16 runs as float32 on CPU)",
    )
    g.add_argument(
        "--kernels",
        default="auto",
        metavar="auto|triton|torch[,OP=BACKEND|OP=MODULE:FUNCTION...]",
        help="auto: Triton on CUDA, torch ops on CPU; triton on CPU runs the Triton interpreter (slow); "
        "per-op overrides, e.g. triton,decode_attention=torch (ops: attention_frontend, decode_attention, "
        "prefill_attention, rms_norm, rope, store_kv, token_bitmask); a plug-in of your own: "
        "OP=MODULE:FUNCTION or OP=FILE.py:FUNCTION, checked against the op's torch reference at load",
    )
    g.add_argument(
        "--quantization", default=None, choices=["int8"],
        help="int8: the linear layers' weights rounded to int8 with a scale per output row, half of bf16's "
        "bytes to read per token (CPU only; default: none, the weights as loaded)",
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Scheduler and KV-cache flags shared by `generate` and `serve` (the engine's own)."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--max-model-len", type=int, default=None,
        help="prompt + completion tokens per sequence at most (default: the model's context, "
        "never more than the KV cache holds)",
    )
    g.add_argument(
        "--max-num-seqs", type=int, default=None, help="sequences in one batch at most (default 256 on CUDA, 8 on CPU)"
    )
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="tokens in one step at most: a decode token for each running sequence, then prompt chunks; "
        "longer prompts go in chunks (default 8192 on CUDA, 2048 on CPU)",
    )
    g.add_argument(
        "--num-kv-blocks", type=int, default=None,
        help="KV-cache size in blocks (default: on CUDA what free memory holds after the weights and the largest "
        "step; on CPU enough for max-model-len x max-num-seqs tokens, at most a quarter of the available memory)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    g.add_argument(
        "--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
        help="run every step eagerly, without CUDA graphs for decode (default: graphs on CUDA, eager on CPU; "
        "--no-enforce-eager replays the recorded decode step on CPU too)",
    )
    g.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="schedule and prepare each step while the device still runs the one before, reading its tokens "
        "back one step late (default: on for CUDA; off on CPU, where the host runs the model itself)",
    )
    g.add_argument(
        "--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
        help="compute every prompt in full instead of reusing the KV blocks of prefixes computed before "
        "(default: prefix caching on)",
    )
    g.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
        help="shard the model over N ranks, one process each (N GPUs on CUDA; gloo between processes on CPU); "
        "N must divide the attention heads and the MLP size (default 1)",
    )
    g.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help='speculative decoding for every request, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\' (optional "disable_by_batch_size": N); chat requests\' '
        "prediction speculates without it (default: off); or '{\"method\": \"draft_model\", \"model\": DIR, "
        "\"num_speculative_tokens\": 4}'",
    )
    g.add_argument(
        "--max-queue", type=int, default=1024,
        help="requests waiting for their first token at most; beyond it new ones are refused (default 1024)",
    )


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x p(most likely) (default 0: off)")
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalise prompt and generated tokens (default 1.0: off)"
    )
    g.add_argument(
        "--stop", action="append", default=[], metavar="STRING",
        help="stop before this string (repeatable; default none)",
    )
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message in the chat template")


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """HTTP server flags (the OpenAI app's own)."""
    g = p.add_argument_group("server")
    g.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id that clients send and /v1/models lists "
        "(default: nanoserve-demo for the demo, else the checkpoint directory's name)",
    )
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSERVE_API_KEY; unset: no key needed)",
    )
    g.add_argument(
        "--response-store",
        default=None,
        metavar="PATH|URL",
        help="where stored Responses API objects are kept: a SQLite file (survives restarts; default: "
        "responses.sqlite3 in $NANOSERVE_CACHE, else ~/.cache/nanoserve), or a PostgreSQL URL "
        "(postgresql://user:password@host/db) that replicas behind a router share (pip install 'nanoserve[postgres]')",
    )
    g.add_argument(
        "--response-store-max",
        type=int,
        default=10_000,
        metavar="N",
        help="stored responses kept at most; beyond it the oldest go first (default 10000)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="largest request body accepted; a larger one gets 413 (default 8388608, i.e. 8 MiB)",
    )


class _PrintVersion(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print nanoserve's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args) -> None:
        from server.api.app import nanoserve_version

        print(f"nanoserve {nanoserve_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoserve", description=DESCRIPTION)
    parser.add_argument("--version", action=_PrintVersion)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion of PROMPT and print it")
    _add_model_flags(gen)
    _add_engine_flags(gen)
    _add_sampling_flags(gen)
    gen.add_argument("prompt", metavar="PROMPT")
    serve = sub.add_parser("serve", help="serve the OpenAI API over HTTP")
    _add_model_flags(serve)
    _add_engine_flags(serve)
    _add_server_flags(serve)
    from server.check import add_check_parser

    add_check_parser(sub, _add_model_flags)
    return parser


def _show_logs() -> None:
    """nanoserve's own INFO lines (the engine's startup choices, ...) on stderr, like the CLI's messages."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nanoserve: %(message)s"))
    logger = logging.getLogger("nanoserve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def check_flags(args: argparse.Namespace) -> None:
    """ValueError naming the first flag whose value cannot work."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.model is not None:
        model = Path(args.model)
        if not model.exists():
            raise ValueError(f"--model {args.model}: no such directory")
        if not model.is_dir():
            raise ValueError(f"--model {args.model} is a file: give the checkpoint's directory")
    if getattr(args, "speculative_config", None) is not None:  # parsed here: errors name the flag, one line
        from server.engine.speculative import parse_speculative_config

        args.speculative_config = parse_speculative_config(args.speculative_config)
        draft = args.speculative_config.model
        if draft is not None and not Path(draft).is_dir():
            raise ValueError(f"--speculative-config: the draft model {draft} is not a checkpoint directory")
    if args.command == "generate":
        _check_sampling_flags(args)
    elif args.command == "check":
        return
    else:
        _check_server_flags(args)
    _check_kv_cache_size(args)


def _check_kv_cache_size(args: argparse.Namespace) -> None:
    """Without --max-model-len, --num-kv-blocks must hold the context the engine would serve (as
    vLLM asks); a smaller cache is a typo more often than a wish for a tiny context."""
    if args.num_kv_blocks is None or args.max_model_len is not None:
        return
    from model.config import load_config
    from model.load import model_dir_or_demo

    context = load_config(model_dir_or_demo(args.model)).max_position_embeddings
    capacity = args.num_kv_blocks * args.block_size
    if capacity < context:
        raise ValueError(f"--num-kv-blocks {args.num_kv_blocks} holds {capacity} tokens (x --block-size "
                         f"{args.block_size}), less than the {context}-token context: give more blocks, or "
                         f"--max-model-len {capacity} or less")


def _check_sampling_flags(args: argparse.Namespace) -> None:
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be at least 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be at least 0 (0: off), got {args.top_k}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")


def _check_server_flags(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes < MIN_BODY_BYTES:
        raise ValueError(f"--max-body-bytes must be at least {MIN_BODY_BYTES} (ordinary requests need that much), "
                         f"got {args.max_body_bytes}")
    if not args.host:
        raise ValueError("--host must not be empty")
    if args.served_model_name == "":
        raise ValueError("--served-model-name must not be empty")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_logs()
    # Must be set before `nanoserve_kernels` is imported: the Triton interpreter is chosen at import time.
    os.environ["NANOSERVE_KERNELS"] = args.kernels
    try:
        from nanoserve_kernels import set_backend

        set_backend(args.kernels)
    except (ValueError, RuntimeError) as err:
        print(f"nanoserve: error: argument --kernels: {err}", file=sys.stderr)
        return 2
    try:
        check_flags(args)
        if args.command == "generate":
            from server.generate import generate_main

            return generate_main(args)
        if args.command == "check":
            from server.check import check_main

            return check_main(args)
        from server.api.app import serve_main

        return serve_main(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout was closed early (`nanoserve generate … | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail
        return 141  # as a process ended by SIGPIPE
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"nanoserve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
