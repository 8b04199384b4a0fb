"""One metric prefix for both processes: the listener's metrics are ``kvrouter_listener_*``,
and the old ``kvr_listener_*`` names stay for one release as deprecated aliases."""

from __future__ import annotations

from eviction_listener.metrics import ListenerMetrics, ListenerState, registry, render
from tests.support.metrics import parse


def test_new_names_and_deprecated_aliases_carry_the_same_values() -> None:
    m = ListenerMetrics()
    m.blocks_stored, m.flushes, m.takeovers = 7, 3, 1
    state = ListenerState(sources=[], owned_workers=2, live_listeners=1, ready=True)
    text = render(registry(m, lambda: state))
    parsed = parse(text)
    for name, labels in [
        ("blocks_total", {"op": "stored"}),
        ("flushes_total", {}),
        ("owned_workers", {}),
        ("ownership_changes_total", {"change": "acquired"}),
        ("ready", {}),
    ]:
        new = parsed.value("kvrouter_listener_" + name, **labels)
        assert new == parsed.value("kvr_listener_" + name, **labels) and new > 0, name
    assert "# HELP kvr_listener_ready Deprecated alias of kvrouter_listener_ready" in text
    # The router's metrics already use the kvrouter_ prefix: nothing else is left over.
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert all(n.startswith(("kvrouter_listener_", "kvr_listener_")) for n in names)
    assert len([n for n in names if n.startswith("kvr_")]) == len(names) // 2
