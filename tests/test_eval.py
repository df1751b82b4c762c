"""Evaluation and generation from saved compositions: KV-cached greedy decoding on the evaluation path
equals recomputation, exact match can be 1.0 and 0.0, `calm generate` and `calm eval` on tiny models."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_dist.data.batches import collate
from calm_dist.data.records import load_records
from calm_dist.data.tokenization import tokenize_records
from calm_dist.distributed.lockstep_eval import (
    colocated_decode_states,
    eval_share,
    evaluate,
    greedy_completions,
    new_cache_for,
    rank_chunks,
    recomputed_decode_states,
)
from calm_dist.model.architectures import model_dims
from calm_dist.model.augmenting import augmenting_states
from calm_dist.model.composed import ComposedModel, compose
from calm_dist.model.composition_checkpoint import save_composition
from calm_dist.model.decoding import SingleModel
from tests.conftest import train_steps
from tests.distributed.runs import ENV, ROOT

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 20, 21, 22, 23, 24, 25, 26], [1, 4]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny demo assets (anchor, augmenting, character tokenizer) and a trained composition saved from
    them, plus the composed model itself."""
    from transformers import AutoModelForCausalLM

    from launcher.demo.command import make_assets

    folder = tmp_path_factory.mktemp("eval")
    make_assets(folder / "assets")
    anchor = AutoModelForCausalLM.from_pretrained(folder / "assets/anchor").eval()
    augmenting = AutoModelForCausalLM.from_pretrained(folder / "assets/augmenting").eval()
    composed = train_steps(compose(anchor, augmenting, every_n=2), steps=8, lr=5e-2)
    save_composition(composed, folder / "run/composition")
    return folder, composed


def external(composed):
    """The composed model as the workers build it: augmenting models outside, only their dimensions in."""
    model = ComposedModel(composed.anchor, [model_dims(m) for m in composed.augmenting], composed.connections,
                          composed.options)
    model.composition.load_state_dict(composed.composition.state_dict())
    return model.eval()


def test_cached_greedy_decoding_on_the_eval_path_equals_recomputation(saved):
    _, composed = saved
    model = external(composed)
    augmenting = list(composed.augmenting)
    connections = composed.connections
    cases = [
        (model, colocated_decode_states(augmenting, connections), augmenting),
        # the pipelined path: whole-prefix augmenting states, sliced to the new tokens
        (model, recomputed_decode_states(
            lambda b: augmenting_states(augmenting, connections, b["input_ids"], b["attention_mask"])), []),
        (SingleModel(composed.anchor), None, []),
    ]
    outputs = []
    for m, states, caches in cases:
        cached = greedy_completions(m, PROMPTS, states, lambda m=m, c=caches: new_cache_for(m, c), 12, 0, None)
        full = greedy_completions(m, PROMPTS, states, lambda m=m, c=caches: new_cache_for(m, c), 12, 0, None,
                                  use_cache=False)
        assert cached == full
        assert all(len(row) == 12 for row in cached)
        outputs.append(cached)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]  # the composition changes what is generated: the checks above say something


def test_decoding_stops_at_eos_on_every_row():
    class Scripted(torch.nn.Module):
        """Emits 7, 8, then EOS (2) for row 0 and 7, EOS for row 1, counting its forwards."""

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Module()
            self.calls = 0

        def forward(self, ids, mask, augmenting_states=None, cache=None):
            self.calls += 1
            script = [[7, 8, 2, 9], [7, 2, 9, 9]]
            logits = torch.zeros(2, ids.shape[1], 16)
            for row in range(2):
                logits[row, -1, script[row][self.calls - 1]] = 1.0
            return type("Out", (), {"logits": logits})

    model = Scripted()
    assert greedy_completions(model, [[1, 3], [1]], None, lambda: None, 10, 0, 2) == [[7, 8], [7]]
    assert model.calls == 3  # not 10: every row had finished


@pytest.mark.parametrize("count,micro,world", [(10, 3, 2), (64, 8, 2), (5, 4, 3), (1, 8, 2), (16, 4, 4)])
def test_rank_chunks_evaluate_each_record_once_in_lockstep(count, micro, world):
    shares = [rank_chunks(count, micro, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of micro-batches
    counted = sorted(i for s in shares for indices, counts in s if counts for i in indices)
    assert counted == list(range(count))


def greedy_records(composed, tokenizer, prompts: list[str], wrong: bool = False, micro_batch_size: int = 2) -> list[dict]:
    """Records whose completion is the composition's own greedy continuation (cut at EOS), or, with
    `wrong`, that continuation with one more character. Decoded in the micro-batches the evaluation
    uses, so that padding is the same too."""
    model, augmenting = external(composed), list(composed.augmenting)
    encoded = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    tokens = []
    for start in range(0, len(encoded), micro_batch_size):
        tokens += greedy_completions(model, encoded[start:start + micro_batch_size],
                                     colocated_decode_states(augmenting, composed.connections),
                                     lambda: new_cache_for(model, augmenting), 6, 0, tokenizer.eos_token_id)
    records = []
    for prompt, row in zip(prompts, tokens, strict=True):
        completion = tokenizer.decode(row).strip()
        records.append({"prompt": prompt, "completion": completion + ("q" if wrong else "")})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_exact_match_is_one_for_greedy_targets_and_zero_for_others_and_loss_is_exact(saved):
    from transformers import AutoTokenizer

    folder, composed = saved
    tokenizer = AutoTokenizer.from_pretrained(folder / "assets/anchor")
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (33, 4), (5, 67), (8, 9), (10, 11)]]
    model, augmenting = external(composed), list(composed.augmenting)
    connections = composed.connections

    def score(records):
        path = write_jsonl(folder / "scored.jsonl", records)
        records = load_records(path)
        tokenized = tokenize_records(records, tokenizer, max_length=32, prompt_field="prompt",
                                     completion_field="completion")
        share = eval_share(records, tokenized, tokenizer, micro_batch_size=2, rank=0, world_size=1, pad_token_id=0,
                           prompt_field="prompt", completion_field="completion")
        metrics = evaluate(model, share, decode=tokenizer.decode,
                           states_for=lambda b: augmenting_states(augmenting, connections, b["input_ids"],
                                                                  b["attention_mask"]),
                           decode_states=colocated_decode_states(augmenting, connections),
                           new_cache=lambda: new_cache_for(model, augmenting), max_new_tokens=6, pad_token_id=0,
                           eos_token_id=tokenizer.eos_token_id)
        return metrics, tokenized

    right, tokenized = score(greedy_records(composed, tokenizer, prompts))
    wrong, _ = score(greedy_records(composed, tokenizer, prompts, wrong=True))
    assert right["eval_exact_match"] == 1.0 and right["eval_samples"] == 5
    assert wrong["eval_exact_match"] == 0.0
    # The loss is the mean over every predicted token of every record, each counted once.
    batch = collate(list(tokenized), 0)
    logits = composed(batch["input_ids"], batch["attention_mask"]).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum")
    expected = losses.item() / int((batch["labels"][:, 1:] != -100).sum())
    assert right["eval_loss"] == pytest.approx(expected, rel=1e-5)


def calm(capsys, *args: str) -> tuple[int, str, str]:
    """Run `calm ARGS` in this process: (exit code, stdout, stderr)."""
    from launcher.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_calm_generate_streams_the_greedy_completion_and_writes_prompt_files(saved, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder, composed = saved
    composition = str(folder / "run/composition")
    tokenizer = AutoTokenizer.from_pretrained(folder / "assets/anchor")
    records = greedy_records(composed, tokenizer, ["12+7=", "3+45="])
    code, out, err = calm(capsys, "generate", composition, "--prompt", "12+7=", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.splitlines() == ["12+7=" + records[0]["completion"]]  # nothing but the text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("12+7=\n3+45=\n")
    output = tmp_path / "completions.jsonl"
    code, out, err = calm(capsys, "generate", composition, "--prompts", str(prompts), "--max-new-tokens", "6",
                          "--output", str(output))
    assert code == 0, err
    assert [json.loads(line) for line in output.read_text().splitlines()] == records
    assert "Loading weights" not in out + err  # transformers' chatter stays quiet


def test_sampling_through_generate_is_seeded(saved):
    from transformers import AutoTokenizer

    from calm_dist.model.decoding import complete

    folder, composed = saved
    tokenizer = AutoTokenizer.from_pretrained(folder / "assets/anchor")
    runs = [complete(composed, tokenizer, ["1+1=", "22+3="], max_new_tokens=8, do_sample=True, temperature=2.0,
                     top_k=20, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = complete(composed, tokenizer, ["1+1=", "22+3="], max_new_tokens=8)
    assert greedy == complete(composed, tokenizer, ["1+1=", "22+3="], max_new_tokens=8, do_sample=True, top_k=1,
                              seed=5)


def test_calm_generate_names_a_missing_base_model(saved, tmp_path, capsys):
    folder, _ = saved
    code, _, err = calm(capsys, "generate", str(folder / "run/composition"), "--prompt", "1",
                        "--anchor", str(tmp_path / "nope"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"calm generate: error: --anchor: the anchor {tmp_path / 'nope'} is not a Hugging Face model folder "
        "(no config.json)"]


# --------------------------------------------------------------------------------------------------
# Multi-process: the real commands on Ray Train workers under DeepSpeed ZeRO-3


# Lines that must never reach the terminal of a quiet run (seen there before output was made quiet).
NOISE = ["Failed to query Ray Train Controller", "Warning", "WARNING", "across cluster", "pid=",
         "Checkpoint successfully created", "deepspeed_shm_comm_op", "DeepSpeed", "ds_accelerator",
         "Started a local Ray instance", "Token authentication", "core_worker", "Generating train split",
         "tokenizing", "Loading weights", "Setting up process group", "[rank", "INFO", "Traceback"]


def terminal_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What a terminal shows: both streams, progress-bar redraws (carriage returns) split into lines."""
    return [line for line in re.split(r"[\r\n]+", result.stdout + result.stderr) if line.strip()]


def noise_in(lines: list[str]) -> list[str]:
    return [line for line in lines if any(pattern in line for pattern in NOISE)]


@pytest.mark.distributed
def test_calm_eval_on_two_zero3_workers_scores_the_composition(saved):
    from transformers import AutoTokenizer

    folder, composed = saved
    tokenizer = AutoTokenizer.from_pretrained(folder / "assets/anchor")
    prompts = ["1+2=", "33+4=", "5+67=", "8+9=", "10+11=", "99+1=", "7="]
    data = write_jsonl(folder / "greedy.jsonl", greedy_records(composed, tokenizer, prompts))
    # A second file in the same launch, whose targets are never the greedy completion.
    wrong = write_jsonl(folder / "wrong.jsonl", greedy_records(composed, tokenizer, prompts[:3], wrong=True))
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "eval", str(folder / "run/composition"), "--data", str(data), str(wrong),
         "--workers", "2", "--micro-batch-size", "2", "--max-new-tokens", "6"],
        env=ENV, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    other = json.loads((folder / "run/eval/wrong.composition.json").read_text())
    assert other["exact_match"] == 0.0 and other["samples"] == 3 and other["data"] == str(wrong.resolve())
    report = json.loads((folder / "run/eval/greedy.composition.json").read_text())
    # 7 records in micro-batches of 2 over 2 ranks: rank 1 runs a filler that must count nowhere.
    assert report["exact_match"] == 1.0 and report["samples"] == 7
    assert report["model"] == "composition" and report["workers"] == 2
    records = load_records(data)
    tokenized = tokenize_records(records, tokenizer, max_length=512, prompt_field="prompt", completion_field="completion")
    batch = collate(list(tokenized), 0)
    logits = composed(batch["input_ids"], batch["attention_mask"]).logits
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum")
    assert report["loss"] == pytest.approx(total.item() / int((batch["labels"][:, 1:] != -100).sum()), rel=1e-5)
    lines = terminal_lines(result)
    assert noise_in(lines) == []
    assert any(line.split()[:3] == ["composition", "1.000", f"{report['loss']:.4f}"] for line in lines)
    assert any(line.split()[:2] == ["composition", "0.000"] and line.endswith("wrong.jsonl") for line in lines)
    assert lines[-1].startswith("log: ") and Path(lines[-1][5:]).is_file()

    # A weights file that cannot be read is the user's input error, found before any worker starts: one
    # line naming it, exit 2.
    broken = folder / "broken"
    shutil.copytree(folder / "run/composition", broken)
    (broken / "composition.safetensors").write_bytes(b"not safetensors")
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(broken), "--data", str(data),
                             "--workers", "1"], env=ENV, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"calm eval: error: {broken / 'composition.safetensors'}: unreadable" in result.stderr
