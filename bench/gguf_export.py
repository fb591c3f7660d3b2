"""A Qwen3 checkpoint (HF layout) as one GGUF file for llama.cpp, with the `gguf` package's writer.

What llama.cpp expects of a Qwen3 GGUF (its converter's choices, read from its source): architecture
`qwen3`, a `gpt2` (byte-level BPE) tokenizer with the `qwen2` pre-tokenizer, every id up to the
vocabulary size listed (ids the tokenizer lacks as `[PAD<id>]`, unused), added special tokens as
control tokens, the merges, and the special ids from `tokenizer_config.json`; tensors under
llama.cpp's names (`blk.N.attn_q.weight`, ...) with the gguf package's name map; norms in fp32,
the matrices in the requested type (F32, BF16, or Q8_0: blocks of 32 int8 with an fp16 scale).
A tied LM head is left out (llama.cpp then multiplies by the embedding table).
"""

import json
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"F32": "ALL_F32", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}


def tokenizer_facts(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict]:
    """(tokens by id, token types, merges, special token ids) from `tokenizer.json`."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    ids = {content: i for i, content in ((t["id"], t["content"]) for t in added.values())}
    config = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").exists() else {}
    special = {}
    for role in ("bos", "eos", "pad"):
        name = config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name in ids:
            special[role] = ids[name]
    return tokens, types, merges, special | {"chat_template": config.get("chat_template")}


def write_gguf(model_dir: str | Path, out_path: str | Path, gguf_type: str) -> Path:
    """Write `model_dir` as a GGUF at `out_path`, matrices in `gguf_type` (F32, BF16 or Q8_0)."""
    import gguf
    from safetensors.torch import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out_path), "qwen3")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
    tokens, types, merges, special = tokenizer_facts(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        if role in special:
            add(special[role])
    writer.add_add_bos_token(False)
    if special.get("chat_template"):
        writer.add_chat_template(special["chat_template"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, layers)
    quant = getattr(gguf.GGMLQuantizationType, gguf_type)
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(shard)
    for hf_name, tensor in tensors.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name}: no GGUF name for this tensor of a Qwen3 checkpoint")
        if tensor.ndim == 1:  # norms: fp32, as llama.cpp keeps them
            writer.add_tensor(name, tensor.float().numpy())
        elif quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, tensor.float().numpy())
        elif quant == gguf.GGMLQuantizationType.BF16:
            # bf16 bits as uint16, the shape in elements (the writer's raw_dtype path)
            bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(name, bits, raw_dtype=quant)
        else:
            data = gguf.quants.quantize(tensor.float().numpy(), quant)
            writer.add_tensor(name, data, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
