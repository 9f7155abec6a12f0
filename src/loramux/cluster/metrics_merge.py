"""Several replicas' Prometheus text exposition as one: each sample gains a `replica` label, and
each metric's # HELP and # TYPE lines appear once, before its first sample, as the format asks."""

from __future__ import annotations

import re

# name, then {labels} or nothing, then the rest (value, optional timestamp)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """texts: replica id -> that replica's /metrics text."""
    metadata: dict[str, list[str]] = {}  # metric family -> its # HELP / # TYPE lines
    samples: dict[str, list[str]] = {}  # metric family -> its samples, from every replica
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                lines = metadata.setdefault(family, [])
                if line not in lines:
                    lines.append(line)
                samples.setdefault(family, [])
            elif (match := SAMPLE.match(line)) is not None:
                name, labels, rest = match.groups()
                label = f'replica="{replica}"'
                labels = f"{{{label},{labels[1:]}" if labels and labels != "{}" else f"{{{label}}}"
                samples.setdefault(family if family is not None and name.startswith(family) else name, []).append(f"{name}{labels}{rest}")
    return "".join(line + "\n" for family in samples for line in (*metadata.get(family, ()), *samples[family]))
