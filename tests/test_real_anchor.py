"""The real-anchor experiment's data: a world whose answers are one SmolLM2 token each, D_C that asks
only about its own people, ordinary text that is never what is scored, and m_A's own tokenizer."""

import re

import pytest

from launcher.general_ability import ALL_GENERAL_PROMPTS, PROSE_MODULES, docstrings
from launcher.real_anchor import data as world_data
from launcher.real_anchor import ordinary
from launcher.real_anchor import world as w


@pytest.fixture(scope="module")
def world():
    return w.make_world(0)


def test_every_answer_is_one_anchor_token(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for attribute, values in w.ATTRIBUTES.items():
        assert len(values) == len(set(values)) == 24, attribute
        for value in values:
            assert len(tokenizer(" " + value, add_special_tokens=False).input_ids) == 1, value


def test_the_world_is_seeded_and_its_surnames_unique(world):
    assert w.make_world(0) == world and w.make_world(1) != world
    surnames = [p.surname for p in world.people]
    assert len(set(surnames)) == len(surnames) == 2000
    assert len(world.dc_people) == 400 and not set(world.dc_people) & set(world.heldout_people)


def test_no_name_of_the_world_is_a_word_of_the_ordinary_text():
    """Names drawn from sounds can be real ones: seed 1 drew "Neil", so "The first man on the moon was
    Neil" named one of m_A's people. With the ordinary text's words reserved, none is."""
    reserved = ordinary.ordinary_words()
    assert {"Neil", "Mona", "Bar"} <= reserved

    def names(world):
        return {p.first for p in world.people} | {p.surname for p in world.people}

    assert "Neil" in names(w.make_world(1))  # what the reservation is for
    for seed in (0, 1, 2):
        world = w.make_world(seed, reserved=reserved)
        assert not names(world) & reserved and len({p.surname for p in world.people}) == 2000
        assert len({p.first for p in world.people}) == 200


def test_questions_ask_about_the_people_given_and_answer_with_their_attribute(world):
    by_name = {p.name: p for p in world.people}
    dc = w.questions(world, world.dc_people, None, seed=1)
    assert len(dc) == 3 * len(world.dc_people)
    for record in dc:
        name = re.search(r"(?:does|of) (\w+ \w+)", record["prompt"]).group(1)
        person = by_name[name]
        assert person in world.dc_people
        assert record["completion"] == " " + getattr(person, record["attribute"])


def test_m_a_reads_statements_with_its_own_word_level_tokenizer(world):
    tokenizer = w.specialist_tokenizer(world)
    person = world.people[7]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(f"{person.name} lives in {person.town}.").input_ids)
    assert tokens == [person.first, person.surname, "lives", "in", person.town, "."]
    statements = w.statements(world)
    assert all("?" not in r["text"] for r in statements)  # never a question
    assert sum(r["text"].count(person.surname) for r in statements) == 4 * len(w.STATEMENTS)


def test_dc_holds_questions_about_its_people_and_ordinary_text_that_is_never_scored(world, tmp_path):
    answers = [{"prompt": p, "completion": " x"} for p in ordinary.factual_prompts()]
    files = world_data.write_data(world, tmp_path, eval_questions=50, prose=100, anchor_answers=answers)
    dc = world_data.read_jsonl(files["composition_train"])
    assert len(dc) == 3 * len(world.dc_people) + 100 + len(answers)
    heldout_names = {p.name for p in world.heldout_people}
    assert not any(name in r["prompt"] + r["completion"] for r in dc for name in heldout_names)
    heldout = world_data.read_jsonl(files[world_data.EVAL_SETS["heldout"]])
    assert len(heldout) == 50 and all(any(n in r["prompt"] for n in heldout_names) for r in heldout)
    # Prose is trained on every token (no prompt), from docstrings the prose loss never reads.
    prose = [r for r in dc if r["prompt"] == ""]
    assert len(prose) == 100 and all(len(r["completion"].split()) == 40 for r in prose)
    scored = " ".join(docstrings())
    assert not any(r["completion"] in scored for r in prose)
    assert not set(ordinary.ORDINARY_MODULES) & set(PROSE_MODULES)
    assert not set(ordinary.factual_prompts()) & {p for p, _ in ALL_GENERAL_PROMPTS}
    # Every word the world shares with English is kept in ordinary prompts (the composition learned to
    # write a world animal wherever m_A read one), and three times an animal, twice a trade, unless scored.
    kept = [set(p.split()) for p in ordinary.factual_prompts()]
    assert all(sum(word in k for k in kept) >= 3 for word in w.ANIMALS if word not in ("cat", "mouse"))
    assert all(sum(word in k for k in kept) >= 2 for word in w.ANIMALS + w.TRADES)


def test_the_anchors_own_answers_are_its_greedy_continuations(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calm_dist.model.decoding import prompt_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
    answers = ordinary.anchor_answers(model, tokenizer, max_new_tokens=3)
    assert [r["prompt"] for r in answers] == ordinary.factual_prompts()
    for record in answers[:: len(answers) // 4]:  # a few, each decoded alone by Hugging Face's generate
        ids = torch.tensor(prompt_ids(tokenizer, [record["prompt"]]))
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert record["completion"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_whole_experiment_runs_through_calm_train_and_calm_eval_on_a_stand_in_anchor(tmp_path, smollm2):
    """Every step of `calm demo real` (m_A trained, `calm train` on 2 ZeRO-3 workers, `calm eval`, each
    model alone, LoRA, general ability, the report) on a 2-layer stand-in with SmolLM2's tokenizer, a few
    steps each: the pipeline, not the result (bench/real_anchor.py measures that)."""
    from transformers import AutoTokenizer

    from calm_dist.testing.tiny_models import tiny_model
    from launcher.real_anchor.experiment import Design, run_experiment
    from launcher.real_anchor.report import text_table, write_report
    from launcher.real_anchor.specialist import SpecialistPlan

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    anchor = tmp_path / "stand-in"
    tiny_model("llama", layers=2, width=32, heads=2, vocab=len(tokenizer), seed=0).save_pretrained(anchor)
    tokenizer.save_pretrained(anchor)
    design = Design(people=60, specialist=SpecialistPlan(width=32, heads=2, steps=3, batch_size=4), eval_questions=12,
                    prose=12, answer_tokens=2, training=(("composition.connections", [[0, -1, 0], [0, 0, 1]]), ("training.steps", 3),
                                           ("training.micro_batch_size", 4), ("training.global_batch_size", 8),
                                           ("training.log_every", 1), ("training.schedule.warmup_steps", 1),
                                           ("ray.num_workers", 2), ("ray.cpus_per_worker", 1)))
    logs: list[str] = []
    results = run_experiment(tmp_path / "root", 0, logs.append, design=design, anchor=anchor)

    for prefix in ("composed", "anchor", "lora"):
        assert {f"{prefix}_heldout", f"{prefix}_dc_people", f"{prefix}_general_loss", f"{prefix}_general_exact_match"} <= results.keys()
    for prefix in ("composed", "lora"):  # the prompts it answers otherwise than the anchor account for the difference
        changed = results[f"{prefix}_general_prompts_changed"]
        net = sum(not c["lost"] for c in changed) - sum(c["lost"] for c in changed)
        assert results[f"{prefix}_general_exact_match"] - results["anchor_general_exact_match"] == pytest.approx(
            net / results["general_prompts"])
    assert 0.0 <= results["specialist_heldout"] <= 1.0 and results["steps"] == 3 and results["dc_people"] == 12
    assert results["lora_parameters"] > 0 and results["composition_parameters"] > 0
    assert any(line.startswith("trained m_A") for line in logs)
    paths = write_report(results, tmp_path / "results")
    assert all(path.is_file() for path in paths.values())
    assert "CALM m_A+m_B" in text_table(results)


def test_a_result_is_reused_only_for_the_identity_that_made_it(tmp_path):
    """m_A, the anchor's answers and the composition are reused by stamp: tuples in an identity match
    after the JSON round trip, any other difference (or no stamp) means computing again."""
    from launcher.real_anchor.experiment import _stamped, _write_stamp

    stamp, identity = tmp_path / "run" / "stamp.json", {"plan": (1, 2), "steps": 400}
    assert _stamped(stamp, identity) is None
    _write_stamp(stamp, identity, training={"seconds": 3.0})
    assert _stamped(stamp, identity) == {"identity": {"plan": [1, 2], "steps": 400}, "training": {"seconds": 3.0}}
    assert _stamped(stamp, {**identity, "steps": 300}) is None
    assert not stamp.with_suffix(".partial").exists()
