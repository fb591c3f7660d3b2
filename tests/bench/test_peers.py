"""bench.peers: its table from recorded figures, its per-round arithmetic, the floor, the GGUF it
writes for llama.cpp, and what it says when llama.cpp is not installed."""

import json

import pytest

from bench.peers import METRICS, Stream, floor_bytes, format_table, main, median_table, round_metrics

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)


def test_table_is_the_median_of_the_rounds_with_our_ratio():
    # Three rounds of figures as recorded on a 2-core EPYC (llama.cpp bf16 vs nanoserve bf16).
    recorded = [(10.1, 30.7, 10.3, 33.7, 84.0, 70.0), (9.2, 29.9, 9.8, 31.0, 80.0, 68.0), (10.6, 31.5, 10.9, 34.2, 86.0, 74.0)]
    ours = [(9.0, 41.0, 9.4, 46.0, 70.0, 64.0), (8.1, 38.0, 8.2, 44.0, 72.0, 57.0), (9.9, 44.0, 10.0, 47.5, 68.0, 69.0)]
    rounds = [{"llama.cpp BF16": dict(zip(METRICS, a)), "nanoserve bfloat16": dict(zip(METRICS, b))}
              for a, b in zip(recorded, ours)]
    medians = median_table(rounds)
    assert medians["llama.cpp BF16"]["1-stream tok/s"] == 10.1
    assert medians["nanoserve bfloat16"]["8-stream tok/s"] == 41.0
    text = format_table(medians, 3, "nanoserve bfloat16", "llama.cpp BF16")
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["metric", "(median", "of", "3", "rounds)"]
    assert lines[1].split() == ["1-stream", "tok/s", "10.1", "9.0", "0.89x"]
    assert lines[2].split() == ["8-stream", "tok/s", "30.7", "41.0", "1.34x"]
    assert lines[5].split() == ["prefill", "tok/s", "84.0", "70.0", "0.83x"]


def test_round_figures_from_stream_times():
    one = Stream(start=0.0, first=0.5, last=3.5, end=3.6)  # 31 tokens after the first in 3 s
    eight = [Stream(start=0.0, first=1.0, last=7.2, end=7.5 + i * 0.1) for i in range(8)]
    figures = round_metrics(one, eight, tokens=32, prompt_tokens=50, floor_s=0.05)
    assert figures["1-stream tok/s"] == pytest.approx(32 / 3.6)
    assert figures["8-stream tok/s"] == pytest.approx(8 * 32 / 8.2)
    assert figures["decode tok/s, batch 1"] == pytest.approx(31 / 3.0)
    assert figures["decode tok/s, batch 8"] == pytest.approx(8 * 31 / 6.2)
    assert figures["prefill tok/s"] == pytest.approx(100.0)
    assert figures["% of memory floor, batch 1"] == pytest.approx(100 * 0.05 * 31 / 3.0)


def test_floor_counts_every_matmul_weight_once_and_one_embedding_row():
    per_layer = 1024 * (2048 + 2 * 1024) + 2048 * 1024 + 3 * 1024 * 3072
    assert floor_bytes(QWEN3_06B, 2.0) == 2 * (28 * per_layer + 151936 * 1024 + 1024)
    assert floor_bytes(QWEN3_06B, 34 / 32) == pytest.approx(floor_bytes(QWEN3_06B, 2.0) * 17 / 32)


def test_without_llama_server_it_says_how_to_install_it(tmp_path, capsys):
    assert main(["--llama-server", str(tmp_path / "missing"), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llama-server" in err and "--llama-server PATH" in err and "cmake" in err


def _small_tokenizer(directory, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json of `vocab_size - 3` ranks and 2 special tokens (one id left unused)."""
    vocab = {f"t{i}": i for i in range(vocab_size - 3)}
    added = [{"id": vocab_size - 3, "content": "<|endoftext|>", "special": True},
             {"id": vocab_size - 2, "content": "<|im_end|>", "special": True}]
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": ["t1 t2", ["t3", "t4"]]}, "added_tokens": added}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def test_gguf_export_writes_what_llama_cpp_reads(tmp_path):
    gguf = pytest.importorskip("gguf")
    from bench.gguf_export import write_gguf
    from model.demo import write_checkpoint

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, dtype="bfloat16")
    checkpoint = write_checkpoint(tmp_path / "ckpt", shape, seed=3, with_tokenizer=False)
    _small_tokenizer(checkpoint, 300)
    for gguf_type in ("BF16", "Q8_0", "F32"):
        reader = gguf.GGUFReader(str(write_gguf(checkpoint, tmp_path / f"m-{gguf_type}.gguf", gguf_type)))
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors  # tied: llama.cpp multiplies by token_embd
        assert len(tensors) == 1 + 1 + 2 * 11  # embedding, final norm, per layer 7 matrices and 4 norms
        assert tensors["blk.1.attn_q.weight"].tensor_type.name == gguf_type
        assert tensors["blk.0.attn_k_norm.weight"].tensor_type.name == "F32"
        assert list(tensors["blk.0.ffn_down.weight"].shape) == [128, 64]  # GGUF lists the inner dimension first
        fields = reader.fields
        text = lambda key: bytes(fields[key].parts[-1]).decode()  # noqa: E731
        assert (text("general.architecture"), text("tokenizer.ggml.model"), text("tokenizer.ggml.pre")) == ("qwen3", "gpt2", "qwen2")
        tokens = fields["tokenizer.ggml.tokens"]
        assert len(tokens.data) == 300 and bytes(tokens.parts[tokens.data[-1]]).decode() == "[PAD299]"
        types = fields["tokenizer.ggml.token_type"]
        assert [int(types.parts[i][0]) for i in types.data[-3:]] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                                                     gguf.TokenType.UNUSED]
        assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 298
        assert int(fields["qwen3.block_count"].parts[-1][0]) == 2


def test_a_server_that_dies_mid_run_is_named_and_the_finished_rounds_are_kept(tmp_path, monkeypatch, capsys):
    """llama-server exiting during round 2: bench.peers names the side, its exit status and its log,
    prints the table of round 1 and exits 1 (no traceback)."""
    import httpx

    import bench.peers as peers
    import bench.timing
    import model.tokenizer

    pytest.importorskip("gguf")
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN3_06B))
    (tmp_path / "ckpt-F32.gguf").write_bytes(b"")  # already converted: nothing to write
    server = tmp_path / "llama-server"
    server.write_text("")

    class Process:
        def __init__(self, command):
            self.llama = command[0] == str(server)

        def poll(self):
            return 1 if self.llama else None

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 0

    calls = []

    async def measure(url, model, prompts, tokens):
        calls.append(url)
        if len(calls) == 4:  # round 2, llama.cpp's turn (after ours)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return Stream(0.0, 0.5, 3.5, 3.6), [Stream(0.0, 1.0, 7.2, 7.5) for _ in range(8)]

    monkeypatch.setattr(peers, "_start", lambda command, url, log, timeout: Process(command))
    monkeypatch.setattr(peers, "_measure", measure)
    monkeypatch.setattr(bench.timing, "memory_bandwidth", lambda device: 20e9)
    monkeypatch.setattr(model.tokenizer, "Tokenizer", lambda directory: type("T", (), {"encode": lambda self, s: s.split()})())
    status = main(["--model", str(model_dir), "--dtype", "float32", "--rounds", "3", "--llama-server", str(server),
                   "--work-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 1 and len(calls) == 4
    assert "bench.peers: llama.cpp F32 failed in round 2 (RemoteProtocolError: Server disconnected" in err
    assert "its server exited with status 1, log: " in err and "llama.cpp-F32.log" in err
    assert "the 1 round(s) that finished:" in err and "Traceback" not in err
    assert out.splitlines()[2].split()[:3] == ["metric", "(median", "of"] and "1-stream tok/s" in out
