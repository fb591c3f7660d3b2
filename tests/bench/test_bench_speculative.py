"""`bench.speculative`'s table: rates, ratios and acceptance from what it measured, lines changed
as asked, and a bad flag refused in one line."""

import random

import pytest

from bench.speculative import changed_lines, interleaved, make_prompts, parse_args, print_table, summarise
from server.engine.proposers import PredictionProposer


def test_the_table_is_rates_ratios_and_acceptance(capsys):
    rows = [
        {"workload": "prediction exact", "batch": 1, "same_tokens": True,
         "off": {"seconds": 4.0, "tokens": 64, "drafted": 0, "accepted": 0},
         "on": {"seconds": 1.0, "tokens": 64, "drafted": 80, "accepted": 60}},
        {"workload": "ngram random", "batch": 4, "same_tokens": False,
         "off": {"seconds": 2.0, "tokens": 256, "drafted": 0, "accepted": 0},
         "on": {"seconds": 2.5, "tokens": 256, "drafted": 0, "accepted": 0}},
    ]
    table = summarise(rows)
    assert table[0] == {"workload": "prediction exact", "batch": 1, "off_tok_s": 16.0, "on_tok_s": 64.0,
                        "speedup": 4.0, "acceptance": 0.75, "same_tokens": True}
    assert table[1]["speedup"] == 0.8 and table[1]["acceptance"] is None
    print_table({"model": "demo", "device": "cpu", "dtype": "float32", "new_tokens": 64, "cutoff": "c",
                 "table": table})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["prediction", "exact", "1", "16.0", "64.0", "4.00x", "75%", "yes"]
    assert lines[3].split() == ["ngram", "random", "4", "128.0", "102.4", "0.80x", "-", "NO"]


def test_lines_are_changed_in_the_share_asked():
    rng = random.Random(0)
    tokens = list(range(80))
    changed = changed_lines(tokens, 0.5, 8, rng)
    assert len(changed) == 80
    same = [changed[i : i + 8] == tokens[i : i + 8] for i in range(0, 80, 8)]
    assert same.count(False) == 5
    assert changed_lines(tokens, 0.0, 8, rng) == tokens
    assert changed_lines(tokens, 0.01, 8, rng) != tokens  # at least one line
    repetitive = make_prompts(2, 40, True, rng)
    assert all(p[:16] == p[16:32] and len(p) == 40 for p in repetitive)


def test_a_wrong_prediction_drafts_every_step_and_is_wrong_at_once():
    rng = random.Random(1)
    output = [rng.randrange(151643) for _ in range(30)]
    proposer = PredictionProposer(interleaved(output, rng), 8)
    assert changed_lines(output, 1.0, 8, rng) != output
    for done in range(1, 30):
        draft = proposer.propose(output[:done])
        assert len(draft) == min(8, 61 - 2 * done) and draft[0] != output[done]  # rejected at its first token


def test_a_bad_workload_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(["--workloads", "eagle"])
    assert err.value.code == 2 and "--workloads must name some of" in capsys.readouterr().err
