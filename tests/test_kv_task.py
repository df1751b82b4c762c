"""The key-value arithmetic experiment's data and baselines: who sees which keys, exact answers, the
LoRA rank that matches the composition's parameter count."""

import re

import pytest

from calm_dist.model.composed import compose
from calm_dist.model.connections import INPUT, Connection
from calm_dist.testing.tiny_models import tiny_model
from launcher.kv_arithmetic import task as kv_task
from launcher.kv_arithmetic.lora_baseline import (
    matched_rank,
    parameters_per_rank,
    trainable_parameters,
    with_lora,
)


@pytest.fixture(scope="module")
def task():
    return kv_task.make_task(seed=3, num_keys=500)


def keys_in(records, field="prompt"):
    return {key for r in records for key in re.findall(r"[a-z]+", r[field])}


def test_keys_values_and_split(task):
    assert len(set(task.keys)) == 500 and all(2 <= len(k) <= 4 and k.isalpha() for k in task.keys)
    assert set(task.values.values()) <= set(range(10))
    assert len(task.train_keys) == 100  # 20% of the keys
    assert not set(task.train_keys) & set(task.heldout_keys)
    assert set(task.train_keys) | set(task.heldout_keys) == set(task.keys)
    assert kv_task.make_task(seed=3, num_keys=500) == task
    other = kv_task.make_task(seed=4, num_keys=500)
    assert other.keys != task.keys and other.values != task.values


def test_composition_data_uses_only_its_keys(task):
    dc = kv_task.kv_arithmetic(task, task.train_keys, 2000, seed=0)
    used = keys_in(dc)
    assert used <= set(task.train_keys)
    assert len(used) > 0.9 * len(task.train_keys)
    assert not used & set(task.heldout_keys)
    heldout = kv_task.kv_arithmetic(task, task.heldout_keys, 500, seed=1)
    assert keys_in(heldout) <= set(task.heldout_keys)


def test_anchor_data_holds_no_key_and_augmenting_data_no_result(task):
    numeric = kv_task.numeric_arithmetic(task, 500, seed=0)
    assert not keys_in(numeric) and not keys_in(numeric, "completion")
    streams = kv_task.kv_streams(task, 200, seed=0)
    substitutions = kv_task.kv_substitution(task, task.keys, 200, seed=0)
    for record in substitutions:  # a completion is the expression with values, never its result
        assert re.fullmatch(r"\d([+-]\d)+", record["completion"])
        assert kv_task.substitute(task, record["prompt"][:-1]) == record["completion"]
    for record in streams:  # each key immediately followed by its own value
        for key, value in re.findall(r"([a-z]+)(\d)", record["text"]):
            assert task.values[key] == int(value)


def test_each_task_has_its_own_prompt_form(task):
    """One prompt never expects two answers: a substitution prompt is never an arithmetic prompt."""
    substitutions = kv_task.kv_substitution(task, task.keys, 300, seed=0)
    arithmetic = kv_task.kv_arithmetic(task, task.keys, 300, seed=0) + kv_task.numeric_arithmetic(task, 300, seed=0)
    assert all(r["prompt"].endswith(":") for r in substitutions)
    assert all(r["prompt"].endswith("=") for r in arithmetic)
    tokenizer = kv_task.kv_tokenizer(task)
    assert tokenizer.convert_tokens_to_ids(":") != tokenizer.unk_token_id


def test_answers_are_exact(task):
    for record in kv_task.kv_arithmetic(task, task.keys, 300, seed=2):
        substituted = kv_task.substitute(task, record["prompt"][:-1])
        assert int(record["completion"]) == eval(substituted)  # noqa: S307 - digits and +/- only
    assert kv_task.evaluate_expression("3+5-9") == -1


def test_tokenizer_makes_each_key_one_token(task):
    tokenizer = kv_task.kv_tokenizer(task)
    record = kv_task.kv_arithmetic(task, task.heldout_keys, 1, seed=3)[0]
    text = record["prompt"] + record["completion"]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(re.findall(r"[a-z]+|\S", text))
    assert tokenizer.unk_token_id not in ids


def test_lora_rank_matches_the_composition_parameters():
    anchor = tiny_model("llama", layers=4, width=128, heads=4, vocab=64, seed=0)
    augmenting = tiny_model("llama", layers=2, width=128, heads=4, vocab=64, seed=1)
    composed = compose(anchor, augmenting, connections=[Connection(0, 1, INPUT), Connection(0, 1, 1)])
    target = composed.expected_composition_parameters()
    rank = matched_rank(anchor, target)
    per_rank = parameters_per_rank(anchor)
    assert abs(rank * per_rank - target) <= per_rank / 2  # the nearest rank
    lora = with_lora(tiny_model("llama", layers=4, width=128, heads=4, vocab=64, seed=0), rank)
    assert trainable_parameters(lora) == rank * per_rank


def test_lora_on_chosen_layers_adapts_only_those():
    anchor = tiny_model("llama", layers=4, width=128, heads=4, vocab=64, seed=0)
    per_rank = parameters_per_rank(anchor, layers={2, 3})
    assert per_rank * 2 == parameters_per_rank(anchor)  # equal layers: half of them, half the parameters
    lora = with_lora(anchor, 3, layers={2, 3})
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {"2", "3"}
    assert trainable_parameters(lora) == 3 * per_rank


def test_the_cross_tokenizer_variant_reads_keys_as_characters_after_whitespace(task):
    """The records of the cross-tokenizer variant: spaced, word level for the anchor (the same ids as the
    unspaced task), one token per character for m_A; the anchor's decoding puts a space after each
    token, so m_A's view of a key is visible from the key's own token on."""
    from calm_dist.model.alignment import Aligner

    anchor, spaced_anchor, characters = kv_task.kv_tokenizer(task), kv_task.kv_tokenizer(task, spaced=True), kv_task.character_tokenizer()
    records = kv_task.kv_substitution(task, task.keys, 50, seed=0) + kv_task.numeric_arithmetic(task, 20, seed=1)
    for record, spaced in zip(records, kv_task.spaced_records(records), strict=True):
        for field in ("prompt", "completion"):
            text = spaced[field]
            assert text == " ".join(re.findall(r"[a-z]+|\S", record[field]))
            assert spaced_anchor.encode(text, add_special_tokens=False) == anchor.encode(record[field], add_special_tokens=False)
            assert spaced_anchor.decode(spaced_anchor.encode(text, add_special_tokens=False)) == text + " "
            assert characters.decode(characters.encode(text, add_special_tokens=False)) == text
    key = next(k for k in task.keys if len(k) == 3)
    assert characters.convert_ids_to_tokens(characters.encode(key, add_special_tokens=False)) == list(key)

    prompt = kv_task.spaced(f"{key}+{task.keys[1]}=")
    ids = [spaced_anchor.bos_token_id, *spaced_anchor.encode(prompt, add_special_tokens=False)]
    settled_ids, visible = Aligner(spaced_anchor, [characters]).align_ids(ids)[0]
    seen = [characters.decode(settled_ids[1:count]) for count in visible]  # settled_ids[0] is m_A's BOS
    # Positions: <s>, the key, +, the second key, =.
    assert seen[0] == "" and seen[1] == key and seen[3] == f"{key} + {task.keys[1]}"


def test_prepared_base_models_are_reused_for_a_design_with_training_overrides(tmp_path):
    """The cross-tokenizer design carries `calm train` overrides (tuples): its cache key must survive
    the JSON round trip of pretrained.json, or every run pretrains both base models again."""
    from launcher.kv_arithmetic.experiment import BaseModelPlan, Design, prepare

    tiny = BaseModelPlan(1, 16, 2, steps=2, lr=1e-3, batch_size=4)
    design = Design(num_keys=20, augmenting=tiny, anchor=tiny, augmenting_streams=8, augmenting_substitutions=8,
                    anchor_examples=8, dc_kv_examples=8, dc_numeric_examples=8, eval_examples=4,
                    augmenting_tokenizer="characters", training=(("composition.num_heads", 2),))
    logs: list[str] = []
    prepare(tmp_path, 0, design, logs.append)
    stamp = (tmp_path / "anchor" / "model.safetensors").stat().st_mtime_ns
    prepare(tmp_path, 0, design, logs.append)
    assert any(line.startswith("base models: reusing") for line in logs)
    assert (tmp_path / "anchor" / "model.safetensors").stat().st_mtime_ns == stamp
