"""`python -m bench.kernels --kernels op=module:function`: on CPU, the correctness column (the
plug-in and the interpreted built-in, each against the torch reference), status 1 for a wrong plug-in."""

import json

import pytest

import bench.kernels as bench
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
