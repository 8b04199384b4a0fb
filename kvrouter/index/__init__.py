"""The shared index library: block keys, the Redis key schema, and typed Lua script wrappers.

Every router replica, listener and tool goes through this package to touch the index, so the
schema has one definition (`keys.py`) and the scripts one loader (`scripts.py`).
"""
