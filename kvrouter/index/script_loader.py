"""Loading the Lua scripts shipped in the package.

Scripts live in ``lua/`` (installed as ``kvrouter.lua``) as ``verb_noun-N.lua``, N being the
number of KEYS. ``_lib.lua`` is spliced in after each script's header comment, so the shared
helpers exist once in the source tree and every script is still a single body for EVALSHA.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

_SCRIPT_FILE = re.compile(r"^([a-z_]+)-(\d+)\.lua$")


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    num_keys: int
    source: str
    read_only: bool
    sha: str = field(init=False, repr=False)
    """SHA1 of the source, as EVALSHA names it: computed once here, not on every call (it
    was a property that hashed the ~10 kB source for each EVALSHA on the request path)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    def without_flags(self) -> LuaScript:
        """This script without its ``#!lua`` flags line (for servers that reject it)."""
        if not self.source.startswith("#!"):
            return self
        return replace(self, source=self.source.split("\n", 1)[1])


def _splice(source: str, lib: str) -> str:
    """Insert the shared library after the script's shebang line and header comment."""
    lines = source.splitlines(keepends=True)
    head = ""
    if lines and lines[0].startswith("#!"):
        head, lines = lines[0], lines[1:]
    body = "".join(lines)
    end = body.find("]]")
    if not body.lstrip().startswith("--[[") or end < 0:
        raise ValueError("every script must open with a --[[ header ]] comment")
    end += 2
    return head + body[:end] + "\n" + lib + body[end:]


@cache
def load_scripts() -> dict[str, LuaScript]:
    """All scripts shipped in the package, by name (e.g. ``lookup_chain``)."""
    pkg = resources.files("kvrouter.lua")
    lib = (pkg / "_lib.lua").read_text(encoding="utf-8")
    out: dict[str, LuaScript] = {}
    for entry in pkg.iterdir():
        m = _SCRIPT_FILE.match(entry.name)
        if not m:
            continue
        raw = entry.read_text(encoding="utf-8")
        out[m.group(1)] = LuaScript(
            name=m.group(1),
            num_keys=int(m.group(2)),
            source=_splice(raw, lib),
            read_only=raw.startswith("#!lua flags=no-writes"),
        )
    return out
