"""The LM-Cocktail results laid out as the paper's table (base, fine-tuned, Cocktail; the target task
and general ability), beside the paper's figures, and the mixing row; as a terminal table, Markdown,
JSON and a bar chart."""

from __future__ import annotations

from pathlib import Path

from launcher.experiment_report import markdown_table, write_results
from launcher.experiment_report import text_table as text_table_of

# The paper's Llama-2-7B-chat on AG News (target) and its other tasks' average (general), in %.
PAPER = {"base": (40.80, 46.80), "finetuned": (94.42, 38.58), "cocktail": (94.46, 47.73)}
ROWS = (("base", "base (SmolLM2-135M-Instruct)"), ("finetuned", "fine-tuned on news topics"),
        ("cocktail", "Cocktail (fine-tuned + base)"))
MIX_ROWS = (("base", "base"), ("finetuned", "news fine-tune"), ("reviews_finetuned", "reviews fine-tune"),
            ("mix", "mix of the three, weights from 10 examples"))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def main_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "news topics (T)", "general prompts", "prose loss", "paper T", "paper general"]
    rows = [[label, _percent(r[f"{key}_news"]), _percent(r[f"{key}_general_exact_match"]),
             f"{r[f'{key}_general_loss']:.3f}", *(f"{v:.2f}" for v in PAPER[key])] for key, label in ROWS]
    return header, rows


def mix_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "mixed task (new)", "weight in the mix"]
    return header, [[label, _percent(r[f"{key}_mixed"]),
                     f"{r['mix_weights'][name]:.3f}" if name in r["mix_weights"] else "-"]
                    for (key, label), name in zip(MIX_ROWS, ("base", "news", "reviews", None), strict=True)]


def summary(r: dict) -> str:
    return (f"fine-tuning raised the prose loss by {100 * r['general_loss_increase']:.1f} %; the Cocktail got back "
            f"{100 * r['general_loss_recovered']:.0f} % of it and {100 * r['general_exact_match_recovered']:.0f} % of the "
            f"general prompts lost, keeping {_percent(r['cocktail_news'])} % on news (fine-tuned "
            f"{_percent(r['finetuned_news'])} %)")


def text_table(r: dict) -> str:
    return text_table_of(*main_rows(r)) + "\n\n" + text_table_of(*mix_rows(r))


def markdown(r: dict) -> str:
    return (
        markdown_table(*main_rows(r)) + "\n\n" + markdown_table(*mix_rows(r)) + "\n\n"
        f"Exact match in %, {r['heldout']} held-out examples per task, seed {r['seed']}; general prompts: "
        f"{r['general_prompts']} completions the base model gets right; prose loss: mean token loss on "
        f"{r['prose_tokens']:,} tokens of Python standard-library docstrings. Fine-tunes: every weight, "
        f"{r['finetune']['steps']} AdamW steps of {r['finetune']['batch_size']} at {r['finetune']['learning_rate']:g}. "
        f"Cocktail: the fine-tune's share fixed at {r['finetuned_share']}, the base's from {r['examples']} examples "
        f"(temperature {r['temperature']:g}). Paper: LM-Cocktail, Llama-2-7B-chat fine-tuned on AG News; "
        f"its general column is the average over its other tasks. {summary(r)}.\n"
    )


def bar_chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    metrics = (("news", "news topics (T)"), ("general_exact_match", "general prompts"))
    width = 0.8 / len(ROWS)
    for m, (key, label) in enumerate(ROWS):
        positions = [t + (m - (len(ROWS) - 1) / 2) * width for t in range(len(metrics))]
        left.bar(positions, [100 * r[f"{key}_{metric}"] for metric, _ in metrics], width, label=label.split(" (")[0])
    left.set_xticks(range(len(metrics)), [label for _, label in metrics])
    left.set_ylabel("exact match (%)")
    left.set_ylim(0, 125)
    left.legend(fontsize=8, ncol=3, loc="upper center")
    left.set_title("fine-tuning forgets; the Cocktail keeps T and recovers", fontsize=9)
    right.bar(range(len(MIX_ROWS)), [100 * r[f"{key}_mixed"] for key, _ in MIX_ROWS])
    right.set_xticks(range(len(MIX_ROWS)), ["base", "news ft", "reviews ft", "mix"])
    right.set_ylim(0, 105)
    right.set_title("mixing existing models for a new task", fontsize=9)
    fig.suptitle(f"LM-Cocktail on SmolLM2-135M-Instruct, seed {r['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(r: dict, folder: Path) -> dict[str, Path]:
    """results.json, results.md and results.png in folder; returns their paths by kind."""
    return write_results(r, folder, markdown, bar_chart)
