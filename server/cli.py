"""`nanoserve` command line: `generate` (one prompt, printed) and `serve` (the OpenAI server)."""

import argparse
import os
import sys


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
        choices=["auto", "triton", "torch"],
        help="auto: Triton on CUDA, torch ops on CPU; triton on CPU runs the Triton interpreter (slow)",
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Scheduler and KV-cache flags shared by `generate` and `serve` (the engine's own)."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--max-model-len", type=int, default=None,
        help="prompt + completion tokens per sequence at most (default: the model's context, "
        "at most 2048 on CPU, and never more than the KV cache holds)",
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
        "step; on CPU enough for max-model-len x max-num-seqs tokens)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    g.add_argument(
        "--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
        help="compute every prompt in full instead of reusing the KV blocks of prefixes computed before "
        "(default: prefix caching on)",
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
        metavar="PATH",
        help="SQLite file that keeps stored Responses API objects across restarts "
        "(default: responses.sqlite3 in $NANOSERVE_CACHE, else ~/.cache/nanoserve)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoserve", description=__doc__)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Must be set before `kernels` is imported: the Triton interpreter is chosen at import time.
    os.environ["NANOSERVE_KERNELS"] = args.kernels
    try:
        if args.command == "generate":
            from server.generate import generate_main

            return generate_main(args)
        from server.api.app import serve_main

        return serve_main(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"nanoserve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
