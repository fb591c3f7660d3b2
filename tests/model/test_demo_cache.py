"""The demo cache: its build says what it does, and a damaged build is rebuilt, not trusted."""

import subprocess
import sys

from model.demo import DEMO_NAME, MANIFEST, demo_checkpoint


def test_a_truncated_demo_cache_is_rebuilt_identically(tmp_path, monkeypatch, demo_dir, capsys):
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    built = demo_checkpoint()
    assert "building the demo checkpoint" in capsys.readouterr().err
    weights = built / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])  # as a full disk or a killed copy leaves it
    assert demo_checkpoint() == built
    assert "model.safetensors is not the file that was written" in capsys.readouterr().err
    assert weights.read_bytes() == (demo_dir / "model.safetensors").read_bytes()
    (built / MANIFEST).unlink()
    demo_checkpoint()
    assert f"{MANIFEST} is missing" in capsys.readouterr().err
    demo_checkpoint()
    assert capsys.readouterr().err == ""  # an intact build is used as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_NAME]  # no staging or old copies left


def test_a_truncated_checkpoint_is_one_clear_line(tmp_path, demo_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in demo_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", str(broken), "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"nanoserve: error: {weights} is truncated or corrupt (safetensors: ")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "mod')
    weights.write_bytes((demo_dir / "model.safetensors").read_bytes())
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--model", str(broken), "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"nanoserve: error: the tokenizer files in {broken} cannot be read")
