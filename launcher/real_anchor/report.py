"""The real-anchor results as a table (answers about the world's people, and the anchor's own ability),
as a terminal table, Markdown, JSON and a bar chart."""

from __future__ import annotations

from pathlib import Path

from launcher.experiment_report import markdown_table, write_results
from launcher.experiment_report import text_table as text_table_of

# (metric prefix, column label)
MODELS = (("specialist", "m_A"), ("anchor", "m_B (SmolLM2)"), ("lora", "LoRA on m_B"), ("composed", "CALM m_A+m_B"))
# (metric suffix, row label, how it is shown)
ROWS = (("heldout", "questions, held-out people (%)", "percent"),
        ("dc_people", "questions, D_C's people (%)", "percent"),
        ("general_exact_match", "general prompts (%)", "percent"),
        ("general_loss", "prose loss", "loss"))


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if kind == "percent" else f"{value:.3f}"


def table_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    header = ["", *(label for _, label in MODELS)]
    return header, [[label, *(_cell(r.get(f"{prefix}_{suffix}"), kind) for prefix, _ in MODELS)]
                    for suffix, label, kind in ROWS]


def summary(r: dict) -> str:
    return (f"the composition answers {100 * r['composed_heldout']:.1f} % of the questions about people it was never "
            f"asked about (each model alone and LoRA at most {100 * max(r['anchor_heldout'], r['specialist_heldout'], r['lora_heldout']):.1f} %), "
            f"its prose loss {100 * (r['composed_general_loss'] / r['anchor_general_loss'] - 1):+.1f} % from SmolLM2's")


def text_table(r: dict) -> str:
    return text_table_of(*table_rows(r))


def markdown(r: dict) -> str:
    return (
        markdown_table(*table_rows(r)) + "\n\n"
        f"Seed {r['seed']}. Exact match of one-token answers (town, trade or animal; 24 values each) on "
        f"{r['eval_questions']} questions per row; {r['people']:,} invented people, {r['dc_people']} of them in D_C. "
        f"m_A is scored with its own tokenizer; it never saw a question, only statements. General prompts: "
        f"first word of the completion, on {r['general_prompts']} short factual prompts (the score is against SmolLM2's own); prose loss: mean token loss on Python "
        f"standard-library docstrings. Trainable parameters: composition {r['composition_parameters']:,}, LoRA "
        f"{r['lora_parameters']:,} (rank {r['lora_rank']}), {r['steps']} steps each. In short: {summary(r)}.\n"
    )


def bar_chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    shown = [row for row in ROWS if row[2] == "percent"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(MODELS)
    for m, (prefix, label) in enumerate(MODELS):
        values = [100 * (r.get(f"{prefix}_{suffix}") or 0.0) for suffix, _, _ in shown]
        ax.bar([t + (m - (len(MODELS) - 1) / 2) * width for t in range(len(shown))], values, width, label=label)
    ax.set_xticks(range(len(shown)), [label.removesuffix(" (%)") for _, label, _ in shown], fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"CALM on SmolLM2-135M-Instruct with a specialist trained here, seed {r['seed']}")
    ax.legend(fontsize=8, ncol=len(MODELS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, folder: Path) -> dict[str, Path]:
    """results.json, results.md and results.png in folder; returns their paths by kind."""
    return write_results(results, folder, markdown, bar_chart)
