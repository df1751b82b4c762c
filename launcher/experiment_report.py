"""What the demo experiments share to show their results: a table as text and as Markdown, and the
results folder (results.json, results.md, results.png)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned, the first to the left and the rest to the right, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_results(results: dict, folder: Path, markdown: Callable[[dict], str],
                  chart: Callable[[dict, Path], None]) -> dict[str, Path]:
    """results.json, results.md and results.png in folder; returns their paths by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "markdown": folder / "results.md", "chart": folder / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    chart(results, paths["chart"])
    return paths
