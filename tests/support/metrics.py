"""Reading a `/metrics` body the way Prometheus does: prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, and the declared type of every family."""

    samples: list[tuple[str, dict[str, str], float]]
    types: dict[str, str]
    """Family name as written in ``# TYPE`` (counters with their ``_total``) -> type."""

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`. Raises
        KeyError when no sample matches, so a renamed or missing series fails the test."""
        found = [
            v
            for n, ls, v in self.samples
            if n == name and all(ls.get(k) == want for k, want in labels.items())
        ]
        if not found:
            raise KeyError(f"no sample {name}{labels or ''} in the scrape")
        return sum(found)

    def has(self, name: str, **labels: str) -> bool:
        """True when some sample called `name` carries `labels`."""
        try:
            self.value(name, **labels)
        except KeyError:
            return False
        return True

    def label_values(self, name: str, label: str) -> set[str]:
        """The values `label` takes over the samples called `name`."""
        return {ls[label] for n, ls, _ in self.samples if n == name and label in ls}


def parse(text: str) -> Scrape:
    """Parse a Prometheus text-format body (raises ValueError on a malformed one)."""
    samples: list[tuple[str, dict[str, str], float]] = []
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        declared = fam.name + "_total" if fam.type == "counter" else fam.name
        types[declared] = fam.type
        samples.extend((s.name, dict(s.labels), s.value) for s in fam.samples)
    return Scrape(samples, types)
