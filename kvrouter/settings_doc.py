"""docs/settings.md, generated from the settings schema: ``python -m kvrouter.settings_doc``.

tests/test_settings_schema.py fails when the committed file differs from this output, so a
change to any ``KVR_*`` name, default or help text is made in the schema alone and the docs
follow (regenerate with ``make settings-doc``).
"""

from __future__ import annotations

import sys

from eviction_listener.settings import ListenerSettings
from kvrouter.register import RegisterSettings
from kvrouter.settings import KvrSettings, SharedSettings
from kvrouter.sim.settings import SimSettings
from router_node.settings import RouterSettings

INTRO = """\
# Settings

Generated from the schema (`kvrouter/settings.py` and each process's `settings.py`) by
`make settings-doc`; `tests/test_settings_schema.py` fails when this file and the schema
disagree. Do not edit by hand.

Every setting is an environment variable and a flag of the same name (`KVR_BLOCK_SIZE`,
`--block-size`); the router also reads its `[router]` table from `--config`. Precedence,
lowest first: default, config file, environment, flag. Lists in variables are
comma-separated; flags marked repeatable are given once per item. An empty variable is the
empty string for text settings (`KVR_REDIS_URL=""`: no Redis) and "not set" for the others.

Bad input stops the process at start (exit status 2) with one line naming the variable and
the flag, the value given (`***` for secrets) and what is allowed, for example:

```
kvrouter listen: error: KVR_BLOCK_SIZE / --block-size: invalid value 'sixteen': expected an integer
kvrouter serve: KVR_BLOCKSIZE: not a setting of `kvrouter serve` (value '16');
  did you mean KVR_BLOCK_SIZE?
```

A `KVR_*` variable that is not a setting of the process but nearly spells one of its settings
is such an error; other unknown `KVR_*` variables are ignored (a ConfigMap may be shared).
Secrets (`KVR_REDIS_PASSWORD`, `KVR_ADMIN_TOKEN`) and passwords in Redis URLs show as `***` in
logs and errors.
"""


def table(cls: type[KvrSettings], names: list[str]) -> str:
    """A Markdown table of the settings `names` of `cls`."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for env, flag, default, help_text in cls.table_rows():
        field = next(n for n in cls.settable() if cls.env_name(n) == env)
        if field not in names:
            continue
        shown = f"`{default}`" if default else ""
        cell = help_text.replace("|", r"\|")
        rows.append(f"| `{env}` | `{flag}` | {shown} | {cell} |")
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole of docs/settings.md."""
    shared = SharedSettings.settable()
    router_own = [n for n in RouterSettings.settable() if n not in shared]
    listener_own = [n for n in ListenerSettings.settable() if n not in shared]
    parts = [
        INTRO,
        "## Shared by the router and the listener\n",
        "Defined once (`kvrouter/settings.py`): give both processes the same values "
        "(the chart does).\n",
        table(RouterSettings, shared),
        "## The router only: `kvrouter serve`\n",
        table(RouterSettings, router_own),
        "## The listener only: `kvrouter listen`\n",
        table(ListenerSettings, listener_own),
        "## The registry sidecar only: `kvrouter register`\n",
        "Besides the shared Redis settings, `KVR_MODEL` (the models it serves; empty = every "
        "model) and `KVR_BLOCK_SIZE` (announced with its KV events).\n",
        table(RegisterSettings, [n for n in RegisterSettings.settable() if n not in shared]),
        "## The simulator: `kvrouter sim`\n",
        "Its own `KVR_SIM_*` variables (it talks to no Redis), parsed by the same schema.\n",
        table(SimSettings, SimSettings.settable()),
    ]
    return "\n".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
