"""A run's report: report.json (every figure and the run's configuration), report.md (the tables) and
PNG plots, all in one output directory."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + ([f"\n{self.note}"] if self.note else []))


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


@contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str, **axes) -> Iterator:
    """An axes to draw on; saved to `path` (gridded, with a legend) when the block ends."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    yield ax
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **axes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]]) -> Path:
    with _figure(path, title, xlabel, ylabel) as ax:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, label=label)
    return path


def cdf_plot(path: Path, title: str, xlabel: str, series: dict[str, list[float]], target: float | None = None) -> Path:
    with _figure(path, title, xlabel, "share of requests", ylim=(0, 1.02)) as ax:
        for label, values in series.items():
            v = sorted(x for x in values if x is not None)
            if v:
                ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label)
        if target is not None:
            ax.axvline(target, color="grey", linestyle="--", label="target")
    return path


def write_report(out_dir: Path, report: dict, tables: list[Table], plots: list[Path]) -> Path:
    """Writes report.json and report.md into out_dir (plots are already there); returns report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report | {"plots": [p.name for p in plots]}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    load = report["load"]
    alone = ("the machine was otherwise idle" if load["idle"] else "the machine was NOT idle: figures are unreliable")
    header = [
        f"## loramux bench {report['setting']}",
        "",
        f"`{report['command']}`",
        "",
        f"{report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads, {report['config']['dtype']}; "
        f"other processes used {100 * load['other_cpu_share']:.1f}% of the CPU during the run, load average "
        f"{load['load_average_1m_before']:.2f} before it ({alone}). "
        f"Started {report['started']}, took {report['wall_seconds']:.0f} s.",
        "",
        "",
    ]
    body = "\n\n".join(t.markdown() for t in tables)
    figures = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    path = out_dir / "report.md"
    path.write_text("\n".join(header) + body + "\n\n" + figures + "\n")
    return path
