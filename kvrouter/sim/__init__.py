"""Fleet simulator and trace replay: simulated vLLM-compatible workers for tests and benchmarks.

- `kvrouter.sim.kvcache`: the prefix-caching block pool (vLLM semantics, engine hashes).
- `kvrouter.sim.scheduler`: continuous batching and the timing model, in simulated time.
- `kvrouter.sim.engine`: drives a scheduler in real time under a time scale.
- `kvrouter.sim.events` / `publisher`: KV events in vLLM's wire format over ZMQ, with replay.
- `kvrouter.sim.worker` / `fleet`: the OpenAI HTTP API and many workers in one process.
- `kvrouter.sim.trace` / `replay`: Mooncake traces, ideal hit ratios, the replay client.
"""
