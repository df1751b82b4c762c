"""The key-value arithmetic results laid out as the CALM paper's Table 1, beside the paper's figures.

As a terminal table, Markdown, JSON and a bar chart.
"""

from __future__ import annotations

from pathlib import Path

from launcher.experiment_report import markdown_table, write_results
from launcher.experiment_report import text_table as _text_table

# (metric suffix, row label, the paper's m_A, m_B, CALM in %; None where the paper has no such row)
TASKS = (
    ("substitution", "KV-Substitution", (98.1, 0.0, 92.9)),
    ("numeric", "Numeric-Arithmetic", (4.2, 73.7, 72.0)),
    ("heldout", "KV-Arithmetic, held-out keys", (0.7, 0.0, 84.3)),
    ("train_keys", "KV-Arithmetic, D_C keys", None),
)
# (metric prefix, column label)
MODELS = (
    ("augmenting", "m_A"),
    ("anchor", "m_B"),
    ("lora", "LoRA on m_B"),
    ("composed", "CALM m_A+m_B"),
)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["task", *(label for _, label in MODELS), "paper m_A", "paper m_B", "paper CALM"]
    rows = []
    for suffix, label, paper in TASKS:
        ours = [_percent(results.get(f"{prefix}_{suffix}")) for prefix, _ in MODELS]
        theirs = [f"{p:.1f}" for p in paper] if paper else ["-"] * 3
        rows.append([label, *ours, *theirs])
    return header, rows


def text_table(results: dict) -> str:
    return _text_table(*table_rows(results))


def markdown(results: dict) -> str:
    notes = (
        f"\nExact match, %, seed {results['seed']}. Trainable parameters: composition "
        f"{results['composition_parameters']:,}, LoRA {results['lora_parameters']:,} (rank {results['lora_rank']}). "
        f"Keys: {results['num_keys']:,}, of which {results['train_keys']:,} appear in D_C. Paper: CALM Table 1 "
        "(PaLM2-XXS m_A, PaLM2-XS m_B, 25K keys); ours: tiny models trained here, so compare the pattern, not the values.\n"
    )
    return markdown_table(*table_rows(results)) + "\n" + notes


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(MODELS)
    for m, (prefix, label) in enumerate(MODELS):
        values = [100 * (results.get(f"{prefix}_{suffix}") or 0.0) for suffix, _, _ in TASKS]
        positions = [t + (m - (len(MODELS) - 1) / 2) * width for t in range(len(TASKS))]
        ax.bar(positions, values, width, label=label)
    ax.set_xticks(range(len(TASKS)), [label for _, label, _ in TASKS], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Key-value arithmetic (CALM Table 1 setting), seed {results['seed']}")
    ax.legend(fontsize=8, ncol=len(MODELS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, folder: Path) -> dict[str, Path]:
    """results.json, results.md and results.png in folder; returns their paths by kind."""
    return write_results(results, folder, markdown, bar_chart)
