"""The engine: requests, sequences, scheduling, KV blocks, sampling, detokenizing, the model
runner and the asynchronous front (`async_engine.AsyncEngine`). It imports `model`, never the
HTTP layer. Nothing is imported here, so that `server.engine.request` stays free of torch."""
