"""`python -m bench.kernels --kernels op=module:function`: on CPU, the correctness column (the
plug-in and the interpreted built-in, each against the torch reference), status 1 for a wrong plug-in."""

import json

import pytest

import bench.kernels as bench
import nanoserve_kernels
from tests.bench.test_bench_kernels import SMALL
from tests.kernels.common import kernel_backend


@pytest.fixture
def small_shapes(monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setattr(bench, name, value)
    with kernel_backend("auto"):
        yield


def test_plugins_get_a_correctness_row_beside_the_builtin(small_shapes, tmp_path, capsys):
    out = tmp_path / "plugins.json"
    spec = "rms_norm=tests.plugins.rms_norm_torch:rms_norm,decode_attention=tests.plugins.wrong:scaled_decode_attention"
    assert bench.main(["--kernels", spec, "--dtype", "float16", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "rms_norm             plug-in  tests.plugins.rms_norm_torch:rms_norm" in printed
    assert "decode_attention     plug-in  tests.plugins.wrong:scaled_decode_attention      WRONG: " in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["impl"], "error" in r) for r in rows] == [
        ("decode_attention", "plug-in", True), ("decode_attention", "triton", False),
        ("rms_norm", "plug-in", False), ("rms_norm", "triton", False)]


def test_a_spec_without_plugins_is_refused(capsys):
    assert bench.main(["--kernels", "triton"]) == 2
    assert "names no plug-in" in capsys.readouterr().err


def test_bench_generate_takes_the_kernel_spec(capsys):
    import bench.generate

    with kernel_backend("auto"):
        bench.generate.parse_args(["--kernels", "torch,rms_norm=tests.plugins.rms_norm_torch:rms_norm"])
        assert nanoserve_kernels.get_backend() == "torch,rms_norm=tests.plugins.rms_norm_torch:rms_norm"
    with pytest.raises(SystemExit):
        bench.generate.parse_args(["--kernels", "rms_norm=tests.plugins.rms_norm_torch:nope"])
    assert "--kernels: plug-in rms_norm=tests.plugins.rms_norm_torch:nope: " in capsys.readouterr().err


def test_bench_serve_with_kernels_starts_its_server_and_reports_one_that_cannot(chat_checkpoint, capsys, tmp_path):
    import bench.serve

    code = bench.serve.main(["--kernels", "rms_norm=no_such_module:f", "--serve-args", f"--model {chat_checkpoint}",
                             "--out", str(tmp_path / "serve.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "starting server.cli serve --kernels rms_norm=no_such_module:f --port " in err
    assert "bench/serve.py: the server exited with status 2 before it was ready" in err


@pytest.mark.slow
def test_bench_serve_runs_a_plugin_spec_end_to_end(chat_checkpoint, tmp_path):
    import bench.serve

    out = tmp_path / "serve.json"
    code = bench.serve.main(["--kernels", "rms_norm=tests.plugins.rms_norm_torch:rms_norm", "--serve-args",
                             f"--model {chat_checkpoint}", "--concurrency", "2", "--requests", "2",
                             "--output-tokens", "4", "--out", str(out), "--plot", str(tmp_path / "serve.png")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["args"]["kernels"] == "rms_norm=tests.plugins.rms_norm_torch:rms_norm"
    assert report["levels"][0]["errors"] == 0
