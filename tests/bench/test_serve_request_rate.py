"""bench.serve --request-rate R: requests arrive as a Poisson process at R per second (vLLM's
flag), not back to back; the level's JSON says at which rate it ran."""

import asyncio
import statistics
import time

from bench import serve


def test_request_rate_sends_poisson_arrivals_at_that_rate(monkeypatch):
    sent = []

    async def fake_request(client, endpoint, body, streaming=None):
        sent.append(time.perf_counter())
        return serve.RequestResult(ok=True, ttft_s=0.001, e2e_s=0.002, output_tokens=4, prompt_tokens=8, itl_s=[0.001])

    monkeypatch.setattr(serve, "one_request", fake_request)
    args = serve.parse_args(["--request-rate", "200", "--requests", "120", "--concurrency", "64", "--seed", "3"])
    assert (args.arrival, args.rate) == ("poisson", 200.0)
    level = asyncio.run(serve.run_level(args, "m", 64))
    assert level["request_rate"] == 200.0 and level["requests"] == 120 and level["errors"] == 0
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    # Exponential gaps: mean 1/R = 5 ms, spread as wide as the mean (back to back would be ~0).
    assert 0.003 < statistics.mean(gaps) < 0.012
    assert statistics.stdev(gaps) > 0.5 * statistics.mean(gaps)
    closed = asyncio.run(serve.run_level(serve.parse_args(["--requests", "4"]), "m", 4))
    assert closed["request_rate"] is None
