"""kvrouter's Lua scripts, one file per script (``verb_noun-N.lua``, N = number of KEYS).

This folder sits at the top of the repository and installs as the package ``kvrouter.lua``
(setuptools ``package-dir``), so the scripts load through ``importlib.resources`` from a wheel
and from an editable install alike (see ``kvrouter/index/scripts.py``).
"""
