"""`kvrouter sim`: run simulated vLLM-compatible workers until SIGTERM or Ctrl-C.

Once every worker listens, one JSON line describing the fleet (see kvrouter.sim.fleet) goes
to stdout and, with --ready-file, to that file; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence

from kvrouter.sim.fleet import SimFleet, write_ready_file
from kvrouter.sim.settings import (
    DEFAULT_CAPACITY_TOKENS,
    KV_EVENTS_MODES,
    SettingsError,
    SimSettings,
    env_name,
    flag_name,
)

log = logging.getLogger("kvrouter.sim")

_HELP: dict[str, str] = {
    "workers": "number of simulated workers in this process",
    "host": "address every worker listens on (HTTP and ZMQ)",
    "base_port": "HTTP port of worker 0; worker i gets base+i (0 = free ports)",
    "block_size": "tokens per KV-cache block",
    "capacity_tokens": (
        f"KV-cache capacity of each worker in tokens; the default {DEFAULT_CAPACITY_TOKENS:,} "
        "is Llama-3-8B in bf16 (128 KiB per token) on one 80 GB GPU: 90%% of 80 GiB minus "
        "15 GiB of weights and ~5 GiB of activations leaves 52 GiB = 26,624 blocks of 16"
    ),
    "model": "model name served (and checked) on the OpenAI API",
    "lora_adapters": "comma-separated LoRA adapter names also served (parent: --model); each "
    "adapter's blocks are its own, and its KV events carry lora_name",
    "max_model_len": "longest prompt + max_tokens accepted",
    "prefill_tokens_per_s": "uncached prompt tokens prefilled per simulated second",
    "decode_step_ms": "base duration of one engine step (simulated ms)",
    "decode_step_ms_per_seq": "added to each step per sequence in the batch (simulated ms)",
    "max_batch": "most sequences in the running batch (vLLM max_num_seqs)",
    "max_batched_tokens": "token budget of one step; longer prefills are chunked",
    "time_scale": "simulated seconds per real second (60 replays an hour in a minute)",
    "kv_events": "publish KV events over ZMQ in vLLM's positional or map encoding",
    "kv_events_base_port": "PUB port of worker 0; worker i gets base+2i, replay base+2i+1 "
    "(0 = free ports)",
    "kv_events_topic": "topic frame of every event message",
    "kv_events_buffer_steps": "event batches kept for replay",
    "seed": "seed folded into the engine block hashes",
    "ready_file": "write the fleet's JSON description here once listening",
    "prefill_workers": "P/D: the first N workers are prefill workers, the rest decode workers "
    "(0 = all serve whole requests)",
    "kv_bytes_per_token": "P/D: KV cache bytes per token a decode worker pulls",
    "transfer_gb_per_s": "P/D: prefill-to-decode link bandwidth in GB/s (simulated time)",
}


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Add one flag per SimSettings field; each also reads KVR_SIM_<FIELD>."""
    defaults = SimSettings()
    for f in dataclasses.fields(SimSettings):
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} [env {env_name(f.name)}; default {default!r}]"
        kwargs: dict[str, object] = {"default": None, "help": help_text, "dest": f.name}
        if isinstance(default, bool):
            raise AssertionError("no boolean settings expected")
        if f.name == "kv_events":
            kwargs["choices"] = KV_EVENTS_MODES
        elif isinstance(default, int):
            kwargs["type"] = int
        elif isinstance(default, float):
            kwargs["type"] = float
        parser.add_argument(flag_name(f.name), **kwargs)  # type: ignore[arg-type]
    parser.add_argument(
        "--log-level", default="INFO", help="logging level on stderr (default INFO)"
    )


def run(args: argparse.Namespace) -> int:
    """Start the fleet and serve until SIGTERM/SIGINT; returns the exit code."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimSettings)}
    try:
        settings = SimSettings.from_env(**overrides)
    except SettingsError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(settings: SimSettings) -> None:
    """Run a fleet until SIGTERM or SIGINT, announcing it on stdout and the ready file."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with SimFleet(settings) as fleet:
        assert fleet.info is not None
        if settings.ready_file:
            write_ready_file(settings.ready_file, fleet.info)
        print(json.dumps(fleet.info.to_json()), flush=True)
        log.info(
            "%d workers up (%d blocks of %d tokens each, time scale %g, kv events %s)",
            settings.workers,
            settings.num_gpu_blocks,
            settings.block_size,
            settings.time_scale,
            settings.kv_events,
        )
        await stop.wait()
        log.info("shutting down")
