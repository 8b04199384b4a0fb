"""Eviction listener: engine KV-cache events and worker notices into the shared index."""
