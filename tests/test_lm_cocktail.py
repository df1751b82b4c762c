"""The LM-Cocktail experiment (`calm demo cocktail`): its data, its general-ability material, its
arithmetic, and the whole pipeline on a tiny model (the real run, on SmolLM2, is bench/cocktail.py)."""

import json
import sysconfig
from pathlib import Path

import pytest

from launcher.general_ability import (
    ALL_GENERAL_PROMPTS,
    GENERAL_PROMPTS,
    answered,
    changed_answers,
    docstrings,
    prose_files,
    stdlib_folder,
)
from launcher.lm_cocktail.report import markdown, text_table, write_report
from launcher.lm_cocktail.tasks import NEWS_LABELS, REVIEW_LABELS, make_tasks


def _texts(examples) -> set[str]:
    return {e.prompt.split(": ", 1)[1].rsplit("\n", 1)[0] for e in examples}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_texts_are_never_in_finetuning_or_in_the_examples_for_the_weights(seed):
    tasks = make_tasks(seed)
    for task in (tasks.news, tasks.reviews):
        tuned, examples, heldout = _texts(task.finetune), _texts(task.examples), _texts(task.heldout)
        assert (len(examples), len(heldout)) == (10, 200)
        assert len(tuned) == len(task.finetune) > 600
        assert tuned.isdisjoint(heldout) and tuned.isdisjoint(examples) and examples.isdisjoint(heldout)
    mixed = _texts(tasks.mixed.examples) | _texts(tasks.mixed.heldout)
    assert tasks.mixed.finetune == []
    assert mixed.isdisjoint(_texts(tasks.news.finetune) | _texts(tasks.reviews.finetune))
    assert _texts(tasks.mixed.examples).isdisjoint(_texts(tasks.mixed.heldout))
    answers = {e.answer.strip() for e in tasks.mixed.heldout}
    assert answers == set(NEWS_LABELS) | set(REVIEW_LABELS)  # both kinds in the new task
    for e in tasks.mixed.heldout:  # each asked in its own kind's form
        assert e.prompt.startswith("News: " if e.answer.strip() in NEWS_LABELS else "Review: ")


def test_a_seed_draws_other_data_and_the_same_seed_the_same():
    assert make_tasks(0) == make_tasks(0)
    assert _texts(make_tasks(0).news.heldout) != _texts(make_tasks(1).news.heldout)


def test_the_prose_comes_only_from_the_standard_library_this_python_ships():
    files = prose_files()
    assert len(files) >= 35
    stdlib = stdlib_folder().resolve()
    for path in files:
        assert path.resolve().is_relative_to(stdlib) and path.is_file()
        assert "site-packages" not in path.parts
    assert stdlib == Path(sysconfig.get_paths()["stdlib"]).resolve()
    prose = docstrings()
    assert len(prose) > 100 and sum(len(d) for d in prose) > 24 * 128 * 4  # the loss's 3,072 tokens, with room
    assert all("  " not in d and "\n" not in d for d in prose)


def test_general_prompts_are_distinct_with_one_word_answers():
    assert len({p for p, _ in ALL_GENERAL_PROMPTS}) == len(ALL_GENERAL_PROMPTS) >= 150
    assert ALL_GENERAL_PROMPTS[:len(GENERAL_PROMPTS)] == GENERAL_PROMPTS  # LM-Cocktail's 48 come first
    assert all(len(answer.split()) == 1 for _, answer in ALL_GENERAL_PROMPTS)


def test_changed_answers_are_the_prompts_one_model_gets_right_and_the_other_not():
    prompts = (("The capital of France is", "Paris"), ("Ice is frozen", "water"), ("A triangle has three", "sides"))
    base = [" Paris.", " water", " angles"]
    other = [" Lyon, a city", " water.", " sides and"]
    assert answered(base, prompts) == [True, True, False] and answered(other, prompts) == [False, True, True]
    assert changed_answers(base, other, prompts) == [
        {"prompt": "The capital of France is", "base": " Paris.", "other": " Lyon, a city", "lost": True},
        {"prompt": "A triangle has three", "base": " angles", "other": " sides and", "lost": False}]


def _results(**changes) -> dict:
    r = {"seed": 0, "heldout": 200, "examples": 10, "general_prompts": 48, "prose_tokens": 3072,
         "finetune": {"steps": 160, "batch_size": 8, "learning_rate": 8e-5, "seed": 0}, "finetuned_share": 0.5,
         "temperature": 5.0, "cocktail_weights": {"finetuned": 0.5, "base": 0.5},
         "mix_weights": {"base": 0.5, "news": 0.25, "reviews": 0.25},
         "base_news": 0.0, "finetuned_news": 1.0, "cocktail_news": 0.99,
         "base_general_exact_match": 1.0, "finetuned_general_exact_match": 0.5, "cocktail_general_exact_match": 0.9,
         "base_general_loss": 3.0, "finetuned_general_loss": 3.3, "cocktail_general_loss": 3.06,
         "base_mixed": 0.2, "finetuned_mixed": 0.5, "reviews_finetuned_mixed": 0.7, "mix_mixed": 0.9}
    return {**r, **changes}


def test_recovery_is_the_share_of_the_fine_tunes_loss_the_cocktail_got_back():
    from launcher.lm_cocktail.experiment import recovery

    got = recovery(_results())
    assert got["general_loss_increase"] == pytest.approx(0.1)
    assert got["general_loss_recovered"] == pytest.approx(0.8)  # 3.3 -> 3.06 of the 0.3 lost
    assert got["general_exact_match_recovered"] == pytest.approx(0.8)  # 0.5 -> 0.9 of the 0.5 lost


def test_the_table_shows_ours_beside_the_papers(tmp_path):
    from launcher.lm_cocktail.experiment import recovery

    r = _results()
    r.update(recovery(r))
    table = text_table(r)
    assert "Cocktail (fine-tuned + base)" in table and "94.46" in table and "99.0" in table
    assert "0.250" in table  # a mixing weight
    md = markdown(r)
    assert md.count("\n| ") >= 8 and "got back 80 %" in md
    paths = write_report(r, tmp_path)
    assert json.loads(paths["json"].read_text())["cocktail_news"] == 0.99
    assert paths["chart"].stat().st_size > 10_000


def test_the_whole_experiment_on_a_tiny_model(tmp_path):
    """Fine-tunes (cached on a rerun), both `calm merge` blends with the weights LM-Cocktail's recipe
    gives, and every score, on a tiny Llama with a character tokenizer."""
    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import tiny_tokenizer
    from launcher.lm_cocktail.experiment import run_experiment
    from launcher.lm_cocktail.finetune import FinetuneSettings

    base = tmp_path / "base"
    tiny_model("llama", layers=2, width=32, heads=2, vocab=128, seed=0).save_pretrained(base)
    tiny_tokenizer(128, padding_side="left").save_pretrained(base)
    settings = FinetuneSettings(steps=2, batch_size=2, seed=0)
    lines: list[str] = []
    r = run_experiment(tmp_path / "runs", 0, lines.append, settings=settings, base=base)
    assert not r["finetunes_cached"]
    assert r["cocktail_weights"]["finetuned"] == 0.5 and r["cocktail_weights"]["base"] == pytest.approx(0.5)
    assert sum(r["mix_weights"].values()) == pytest.approx(1.0) and len(r["mix_weights"]) == 3
    for key in ("base", "finetuned", "cocktail", "reviews_finetuned", "mix"):
        assert 0.0 <= r[f"{key}_news"] <= 1.0 and r[f"{key}_general_loss"] > 0
    assert (tmp_path / "runs/seed-0/cocktail/model.safetensors").is_file()
    lines.clear()
    again = run_experiment(tmp_path / "runs", 0, lines.append, settings=settings, base=base)
    assert again["finetunes_cached"] and sum("cached" in line for line in lines) == 2
    assert again["cocktail_general_loss"] == r["cocktail_general_loss"]


def test_the_targets_read_the_results_as_the_issue_states_them():
    from launcher.lm_cocktail.experiment import TARGETS, recovery, targets_missed

    r = _results(finetunes_cached=True, wall_s=120.0)
    r.update(recovery(r))
    assert targets_missed(r) == [] and len(TARGETS) == 7
    slow = {**r, "wall_s": 400.0}
    assert targets_missed(slow) == ["wall_s within budget"]  # cached fine-tunes: 300 s
    assert targets_missed({**slow, "finetunes_cached": False}) == []  # from nothing: 2100 s
    forgot_little = _results(finetuned_general_loss=3.1, cocktail_general_loss=3.02, finetunes_cached=True, wall_s=1.0)
    forgot_little.update(recovery(forgot_little))
    assert targets_missed(forgot_little) == ["general_loss_increase >= 0.05"]
    assert targets_missed({**r, "mix_mixed": 0.69}) == ["mix_mixed >= best alone"]


def test_a_folder_the_experiment_did_not_make_is_never_deleted(tmp_path):
    from launcher.lm_cocktail.finetune import FinetuneSettings, finetune
    from launcher.lm_cocktail.tasks import make_tasks

    theirs = tmp_path / "finetunes" / "news-seed0"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    from calm_dist.errors import InputError

    with pytest.raises(InputError, match="news-seed0"):
        finetune(tmp_path / "base", make_tasks(0).news.finetune, FinetuneSettings(), theirs, print)
    assert (theirs / "notes.txt").read_text() == "mine"
