"""kvrouter: route LLM requests to the worker that already holds their prompt prefix in KV cache."""

__version__ = "0.1.0"
