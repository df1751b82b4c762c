"""The data pipeline: loading every format alike, exact loss masks, deterministic sharding, exact resume."""

import csv
import json
import logging
import re

import datasets
import pytest
import torch

from calm_dist.data.batches import ShardedBatches, collate
from calm_dist.data.records import DataError, check_fields, load_records, record_lines, where_is
from calm_dist.data.tokenization import IGNORE_INDEX, tokenize_records
from calm_dist.testing.tokenizers import tiny_tokenizer

# Values a careless reader would mangle: a leading zero, an empty string, "NA", a comma, quotes, a newline.
RECORDS = [
    {"prompt": "12+7=", "completion": "19", "note": "plain"},
    {"prompt": "what is 3*3?", "completion": "009", "note": ""},
    {"prompt": "NA", "completion": "a, \"quoted\"\nanswer", "note": "NA"},
]


def write_all_formats(tmp_path, records=RECORDS):
    paths = {name: tmp_path / f"r.{name}" for name in ("jsonl", "json", "csv", "parquet")}
    paths.update(saved=tmp_path / "saved", saved_dict=tmp_path / "saved_dict")
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"].write_text(json.dumps(records))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(paths["parquet"])
    dataset.save_to_disk(paths["saved"])
    other = datasets.Dataset.from_list(records[:1])
    datasets.DatasetDict({"train": other, "validation": dataset}).save_to_disk(paths["saved_dict"])
    return paths


def test_every_format_loads_the_same_records_offline_and_leaves_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    default_cache = datasets.config.HF_DATASETS_CACHE
    before = sorted(default_cache.rglob("*")) if default_cache.exists() else None
    paths = write_all_formats(tmp_path)
    for name in ("jsonl", "json", "csv", "parquet", "saved"):
        assert load_records(paths[name]).to_list() == RECORDS, name
    assert load_records(paths["saved_dict"], split="validation").to_list() == RECORDS
    assert load_records(paths["saved_dict"]).to_list() == RECORDS[:1], "a DatasetDict defaults to train"
    assert load_records(paths["csv"], split="train").num_rows == 3
    after = sorted(default_cache.rglob("*")) if default_cache.exists() else None
    assert after == before


def test_a_cache_dir_keeps_the_arrow_cache_there(tmp_path):
    path = write_all_formats(tmp_path)["jsonl"]
    dataset = load_records(path, cache_dir=tmp_path / "cache")
    assert dataset.to_list() == RECORDS
    assert dataset.cache_files and all(str(tmp_path / "cache") in f["filename"] for f in dataset.cache_files)


def test_unusable_sources_name_the_file(tmp_path):
    paths = write_all_formats(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": \n')
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "header_only.csv").write_text("prompt,completion\n")
    (tmp_path / "no_rows.json").write_text("[]")
    cases = [
        (tmp_path / "missing.jsonl", None, "no such file or folder"),
        (tmp_path / "notes.txt", None, "unknown data file extension '.txt'; use one of ['.csv', '.json'"),
        (tmp_path / "empty.jsonl", None, "the file is empty"),
        (tmp_path / "broken.jsonl", None, "line 2 is not valid JSON: Expecting value"),
        (tmp_path / "plain_folder", None, "a folder but not one written by Dataset.save_to_disk"),
        (tmp_path / "header_only.csv", None, "no records"),
        (tmp_path / "no_rows.json", None, "no records"),
        (paths["saved_dict"], "test", "no split 'test'; its splits are ['train', 'validation']"),
        (paths["saved"], "test", "holds one Dataset, not a DatasetDict; split='test'"),
        (paths["csv"], "validation", "a data file holds a single split; split='validation'"),
    ]
    for path, split, message in cases:
        with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
            load_records(path, split=split)


def test_field_errors_name_the_file_the_field_and_the_fields_that_exist(tmp_path):
    path = tmp_path / "r.jsonl"
    dataset = datasets.Dataset.from_list([{**r, "count": 1} for r in RECORDS])
    existing = "['prompt', 'completion', 'note', 'count']"
    cases = [
        (dict(text_field="text"), f"{path}: no field 'text' (the text_field); its fields are {existing}"),
        (dict(prompt_field="prompt", completion_field="answer"),
         f"{path}: no field 'answer' (the completion_field); its fields are {existing}"),
        (dict(text_field="note", **PROMPTED),
         f"{path}: give either text_field ('note') or prompt_field + completion_field "
         "('prompt', 'completion')"),
        (dict(), f"{path}: no text_field or prompt_field + completion_field given"),
        (dict(prompt_field="prompt"), f"{path}: no completion_field given"),
        (dict(completion_field="completion"), f"{path}: no prompt_field given"),
        (dict(text_field="count"), f"{path}: field 'count' (the text_field) holds Value('int64'), not text"),
    ]
    for fields, message in cases:
        given = {"text_field": None, "prompt_field": None, "completion_field": None, **fields}
        with pytest.raises(DataError, match=re.escape(message)):
            check_fields(dataset, path, **given)
    check_fields(dataset, path, text_field="note", prompt_field=None, completion_field=None)
    check_fields(dataset, path, text_field=None, **PROMPTED)


PROMPTED = {"prompt_field": "prompt", "completion_field": "completion"}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_and_padding_are_masked_exactly():
    tok = tiny_tokenizer()
    records = datasets.Dataset.from_list(RECORDS[:2])
    tokenized = tokenize_records(records, tok, max_length=64, **PROMPTED)
    assert tokenized.column_names == ["input_ids", "labels"]
    for row, record in zip(tokenized, RECORDS[:2], strict=True):
        prompt, completion = ids(tok, record["prompt"]), ids(tok, record["completion"])
        assert row["input_ids"] == [1, *prompt, *completion, 2]
        assert row["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + [*completion, 2]

    batch = collate(list(tokenized), pad_token_id=tok.pad_token_id)
    lengths = [len(r["input_ids"]) for r in tokenized]
    prompt_ends = [1 + len(ids(tok, r["prompt"])) for r in RECORDS[:2]]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    position = torch.arange(max(lengths))
    for row in range(2):
        real = position < lengths[row]
        supervised = real & (position >= prompt_ends[row])
        assert torch.equal(batch["attention_mask"][row], real.long())
        assert torch.equal(batch["labels"][row] == IGNORE_INDEX, ~supervised)
        assert torch.equal(batch["labels"][row][supervised], batch["input_ids"][row][supervised])
        assert (batch["input_ids"][row][~real] == tok.pad_token_id).all()


def test_text_mode_supervises_every_token_and_eos_and_bos_are_optional():
    tok = tiny_tokenizer()
    records = datasets.Dataset.from_list(RECORDS)
    tokenized = tokenize_records(records, tok, max_length=64, text_field="prompt")
    assert tokenized[0] == {"input_ids": [1, *ids(tok, "12+7="), 2], "labels": [1, *ids(tok, "12+7="), 2]}
    without_eos = tokenize_records(records, tok, max_length=64, text_field="prompt", add_eos=False)
    assert without_eos[0]["input_ids"] == [1, *ids(tok, "12+7=")]
    tok.bos_token = None
    without_bos = tokenize_records(records, tok, max_length=64, **PROMPTED)
    assert without_bos[0]["labels"] == [IGNORE_INDEX] * 5 + [*ids(tok, "19"), 2]


def test_truncation_keeps_the_start_and_drops_records_with_nothing_left_to_predict(caplog):
    tok = tiny_tokenizer()
    records = datasets.Dataset.from_list(RECORDS)  # prompts of 5, 12 and 2 tokens, after a bos
    with caplog.at_level(logging.WARNING, logger="calm_dist.data.tokenization"):
        tokenized = tokenize_records(records, tok, max_length=7, **PROMPTED)
    assert "dropped 1 of 3 records" in caplog.text and "max_length=7" in caplog.text
    assert tokenized["input_ids"] == [[1, *ids(tok, "12+7=1")], [1, *ids(tok, "NA"), *ids(tok, "a, \"")]]
    assert tokenized["labels"][0] == [IGNORE_INDEX] * 6 + ids(tok, "1")
    message = "no record has a token left to predict after truncation to max_length=3"
    with pytest.raises(DataError, match=message):
        tokenize_records(records.select([0, 1]), tok, max_length=3, **PROMPTED)


def test_tokenizing_is_deterministic_and_refuses_nulls():
    tok = tiny_tokenizer()
    records = datasets.Dataset.from_list(RECORDS * 5)
    first = tokenize_records(records, tok, max_length=16, **PROMPTED)
    second = tokenize_records(records, tok, max_length=16, **PROMPTED)
    assert first.to_list() == second.to_list()
    with_null = datasets.Dataset.from_list([{"text": "ab"}, {"text": None}])
    with pytest.raises(DataError, match="record 1 \\(counting from 0\\) has no value \\(null\\) in field 'text'"):
        tokenize_records(with_null, tok, max_length=16, text_field="text")


def test_collate_pads_right_and_labels_are_optional():
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="some examples have labels and some do not"):
        collate([{"input_ids": [5], "labels": [5]}, {"input_ids": [8]}], pad_token_id=0)


# ------------------------------------------------------------------------------------------------
# Sharding and resume. Record i is [i, i, ...] (1 to 3 tokens), so a batch's first column names its records.

N = 23


def numbered(n=N):
    return [{"input_ids": [i] * (1 + i % 3), "labels": [i] * (1 + i % 3)} for i in range(n)]


def sharded(data=None, **overrides):
    options = dict(micro_batch_size=2, rank=0, world_size=2, seed=0, pad_token_id=0) | overrides
    return ShardedBatches(numbered() if data is None else data, **options)


def permutation(seed):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed)).tolist()


def record_ids(batch):
    return batch["input_ids"][:, 0].tolist()


def take(batches, k):
    iterator = iter(batches)
    return [next(iterator) for _ in range(k)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch_of_the_epoch_permutation(world_size):
    micro = 2
    ranks = [sharded(micro_batch_size=micro, rank=r, world_size=world_size, seed=7)
             for r in range(world_size)]
    steps = N // (micro * world_size)
    assert all(r.batches_per_epoch == steps and r.samples_per_epoch == steps * micro for r in ranks)
    seen = [take(r, steps + 1) for r in ranks]  # one epoch and the first step of the next

    union = [i for step in range(steps) for rank in range(world_size) for i in record_ids(seen[rank][step])]
    assert union == permutation(7)[: steps * micro * world_size]
    assert len(set(union)) == len(union)
    next_epoch = [i for rank in range(world_size) for i in record_ids(seen[rank][steps])]
    assert next_epoch == permutation(8)[: micro * world_size]

    batch = seen[1][0]
    lengths = [1 + i % 3 for i in record_ids(batch)]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()


def test_without_drop_last_the_last_global_batch_is_filled_from_the_epoch_start():
    ranks = [sharded(rank=r, drop_last=False) for r in range(2)]
    assert ranks[0].batches_per_epoch == 6
    seen = [i for step in zip(*(take(r, 6) for r in ranks), strict=True) for b in step for i in record_ids(b)]
    assert seen == permutation(0) + permutation(0)[:1]


def test_seed_and_shuffle_decide_the_order():
    def order(seed, shuffle=True):
        batches = sharded(micro_batch_size=4, world_size=1, seed=seed, shuffle=shuffle)
        return [i for b in take(batches, 5) for i in record_ids(b)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, shuffle=False) == list(range(20))


def test_a_tokenized_dataset_batches_like_its_rows(tmp_path):
    tok = tiny_tokenizer()
    tokenized = tokenize_records(datasets.Dataset.from_list(RECORDS * 4), tok, max_length=16,
                                 **PROMPTED)
    batches = ShardedBatches(tokenized, micro_batch_size=3, rank=1, world_size=2, seed=3, pad_token_id=0)
    for step, batch in enumerate(take(batches, 3)):
        epoch, index = divmod(step, batches.batches_per_epoch)
        expected = collate([tokenized[i] for i in batches.batch_indices(epoch, index)], pad_token_id=0)
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[k], expected[k]) for k in batch)


def test_a_dataset_smaller_than_one_global_batch_is_refused():
    with pytest.raises(DataError, match=r"5 records do not fill one global batch of 6 \(micro_batch_size=3"):
        sharded(numbered(5), micro_batch_size=3)


@pytest.mark.parametrize("k", [3, 5, 6, 11])  # mid-epoch, at the epoch boundary (5 per epoch), and later
def test_resume_continues_bitwise_identically(k):
    def make(rank=1):
        return sharded(rank=rank, seed=11)

    reference = take(make(), k + 7)
    interrupted = make()
    for got, want in zip(take(interrupted, k), reference, strict=False):
        assert torch.equal(got["input_ids"], want["input_ids"])
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert (state["epoch"], state["next_batch"]) == divmod(k, 5)

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for got, want in zip(take(resumed, 7), reference[k:], strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in got)

    # The state holds no rank: rank 0 resumes from rank 1's state at the same step.
    rank0 = make(rank=0)
    rank0.load_state_dict(state)
    assert record_ids(take(rank0, 1)[0]) == record_ids(take(make(rank=0), k + 1)[k])


def test_a_state_from_other_sharding_or_data_is_refused():
    state = sharded().state_dict()
    others = {
        "world_size": (sharded(world_size=3), 3),
        "micro_batch_size": (sharded(micro_batch_size=3), 3),
        "seed": (sharded(seed=1), 1),
        "num_samples": (sharded(numbered(22)), 22),
    }
    for key, (batches, value) in others.items():
        with pytest.raises(DataError, match=f"saved with {key}={state[key]} but this run has {key}={value}"):
            batches.load_state_dict(state)
        assert (batches.epoch, batches.next_batch) == (0, 0), "a refused state changes nothing"

    batches = sharded()
    with pytest.raises(DataError, match="an epoch has 5 batches"):
        batches.load_state_dict({**state, "next_batch": 5})
    with pytest.raises(DataError, match=r"the saved state lacks \['seed'\]"):
        batches.load_state_dict({k: v for k, v in state.items() if k != "seed"})


def test_errors_name_file_lines_as_an_editor_numbers_them(tmp_path):
    """Line numbers count from 1, blank lines included, and a CSV's header is line 1."""
    lines = [json.dumps({"text": str(i)}) for i in range(300)]
    lines[256] = '{"text": oops}'
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{broken}: line 257 is not valid JSON: Expecting value")):
        load_records(broken)

    lines[256] = json.dumps({"text": None})
    with_null = tmp_path / "null.jsonl"
    with_null.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line 4
    records = load_records(with_null)
    with pytest.raises(DataError, match=re.escape(
            f"{with_null}: line 258 has no value (null) in field 'text' (the text_field)")):
        check_fields(records, with_null, text_field="text", prompt_field=None, completion_field=None)

    table = tmp_path / "t.csv"
    table.write_text('text,note\n"a",x\n"two\nlines",y\n\n"c",z\n')
    assert record_lines(table) == [2, 3, 6]
    assert [where_is(table, i) for i in (0, 2, 3)] == ["line 2", "line 6", "record 3 (counting from 0)"]
    assert where_is(tmp_path / "saved_folder", 5) == "record 5 (counting from 0)"
