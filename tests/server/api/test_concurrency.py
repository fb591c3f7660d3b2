"""Many clients at once on a live server: concurrent streams, and clients that go away mid-stream."""

import asyncio
import time

import httpx


def test_16_concurrent_streams_all_finish_correctly(client, server):
    prompts = [f"Story number {i}:" for i in range(16)]
    alone = [client.completions.create(model=server.model, prompt=p, max_tokens=16, temperature=0).choices[0]
             for p in prompts]

    async def stream(async_client, prompt):
        chunks = [c async for c in await async_client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0, stream=True)]
        return "".join(c.choices[0].text for c in chunks), [c.choices[0].finish_reason for c in chunks]

    async def main():
        async with server.async_client() as async_client:
            return await asyncio.gather(*(stream(async_client, p) for p in prompts))

    for (text, finish_reasons), expected in zip(asyncio.run(main()), alone):
        assert text == expected.text  # a request's greedy text does not depend on what shares its batch
        assert [r for r in finish_reasons if r is not None] == [expected.finish_reason]


def test_clients_that_disconnect_mid_stream_free_their_kv_blocks(server):
    aborted = 'nanoserve_requests_finished_total{finish_reason="abort"}'
    aborted_before = server.metric(aborted, default=0.0)
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}

    async def leave_after_first_token(http):
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            await asyncio.gather(*(leave_after_first_token(http) for _ in range(10)))

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while server.metric("nanoserve_kv_blocks_used") or server.metric("nanoserve_requests_running"):
        assert time.monotonic() < deadline, "the abandoned requests still hold KV blocks"
        time.sleep(0.05)
    assert server.metric("nanoserve_requests_waiting") == 0
    assert server.metric(aborted) == aborted_before + 10
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    completion = server.client().completions.create(model=server.model, prompt="Still here?", max_tokens=3,
                                                    extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3
