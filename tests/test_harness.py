"""lm-evaluation-harness over compositions: the `calm` model at init scores every request as the
harness's own `hf` model scores the anchor alone (the real SmolLM2 as anchor, on local multiple-choice,
generation and perplexity tasks), across tokenizers too; lm_eval's command line finds it; `calm eval
--tasks` runs it on two Ray Train workers under ZeRO-3 and writes the harness's files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from launcher.eval.harness import local_task  # noqa: E402
from launcher.eval.harness_model import CalmLM  # noqa: E402  (registers `calm`; needs lm_eval)
from tests.distributed.runs import ENV, ROOT  # noqa: E402
from tests.test_eval import noise_in, terminal_lines  # noqa: E402

MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome", " Madrid"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" three", " four", " five"], "answer": 1},
    {"question": "The sky on a clear day is", "choices": [" green", " blue", " red"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
    {"question": "A cat says", "choices": [" meow", " moo", " quack, loudly and often"], "answer": 0},
]
GENERATION = [
    {"question": "What is the capital of Germany?", "answer": "Berlin"},
    {"question": "What is 2+3?", "answer": "5"},
    {"question": "What color is grass?", "answer": "Green"},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Paris is the capital of France."}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2):
    """Three local tasks; init compositions with SmolLM2 as anchor and a small augmenting model that
    shares its tokenizer, or reads the text through a BPE tokenizer of its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calm_dist.model.composed import compose
    from calm_dist.model.composition_checkpoint import save_composition
    from calm_dist.model.connections import Connection
    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import sample_texts, trained_tokenizer

    folder = tmp_path_factory.mktemp("harness")
    tasks = {
        "mc": local_task(folder, "calm_mc", MULTIPLE_CHOICE, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
        "gen": local_task(folder, "calm_gen", GENERATION, 'output_type: generate_until\n'
                         'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
                         'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 10\n  do_sample: false\n'
                         'metric_list:\n  - metric: exact_match\n    ignore_case: true\n'),
        "rolling": local_task(folder, "calm_rolling", TEXTS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                             'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'),
    }
    anchor = AutoModelForCausalLM.from_pretrained(smollm2)
    shared = tiny_model("llama", layers=2, width=32, heads=2, vocab=anchor.config.vocab_size, seed=1)
    shared.save_pretrained(folder / "shared")
    save_composition(compose(anchor, AutoModelForCausalLM.from_pretrained(folder / "shared"),
                             connections=[Connection(0, 1, 10), Connection(0, 1, 20)]), folder / "composition")
    own = trained_tokenizer("bpe", sample_texts(300), 400)
    tiny_model("llama", layers=2, width=32, heads=2, vocab=400, seed=2).save_pretrained(folder / "cross-aug")
    own.save_pretrained(folder / "cross-aug")
    cross = compose(anchor, AutoModelForCausalLM.from_pretrained(folder / "cross-aug"), connections=[Connection(0, 1, 15)],
                    tokenizers=[AutoTokenizer.from_pretrained(smollm2), own])
    assert cross.aligner is not None  # the augmenting model reads its own tokens
    save_composition(cross, folder / "cross")
    return folder, tasks


def evaluate(model: str, model_args: dict, tasks: list[Path]) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[str(t) for t in tasks], batch_size=4,
                                   device="cpu", log_samples=True, task_manager=TaskManager(include_defaults=False))


@pytest.fixture(scope="module")
def hf_scores(assets, smollm2):
    """The harness's own hf model on the anchor alone: the reference."""
    _, tasks = assets
    return evaluate("hf", {"pretrained": str(smollm2), "dtype": "float32"}, list(tasks.values()))


def responses(results: dict, task: str) -> list:
    """Each document's raw answers: (loglikelihood, is greedy) per choice, a generated text, or the
    summed loglikelihood of a text."""
    return [[r[0] for r in sample["resps"]] for sample in results["samples"][task]]


def assert_same_scores(ours: dict, reference: dict, tasks: list[str]) -> None:
    for task in tasks:
        for mine, theirs in zip(responses(ours, task), responses(reference, task), strict=True):
            for a, b in zip(mine, theirs, strict=True):
                if isinstance(b, str):
                    assert a == b
                elif isinstance(b, tuple | list):
                    assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]
                else:
                    assert a == pytest.approx(b, abs=1e-5)
        assert ours["results"][task] == pytest.approx(reference["results"][task], abs=1e-5)


@pytest.mark.parametrize("composition", ["composition", "cross"])
def test_calm_at_init_scores_as_the_harness_hf_model_on_the_anchor(assets, hf_scores, composition):
    folder, tasks = assets
    ours = evaluate("calm", {"composition": str(folder / composition), "dtype": "float32"}, list(tasks.values()))
    assert_same_scores(ours, hf_scores, ["calm_mc", "calm_gen", "calm_rolling"])
    # The checks say something: the anchor gets some right and some wrong, and generates text.
    accuracy = hf_scores["results"]["calm_mc"]["acc,none"]
    assert 0 < accuracy < 1
    assert any(text[0].strip() for text in responses(hf_scores, "calm_gen"))


def test_the_harness_finds_calm_beside_its_own_models_and_reads_its_model_args(assets):
    from lm_eval.api.registry import get_model

    folder, _ = assets
    assert get_model("calm") is CalmLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide the harness's own
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        CalmLM.create_from_arg_string(f"composition={folder / 'composition'},pretrained=x")
    with pytest.raises(ValueError, match="needs composition=PATH"):
        CalmLM.create_from_arg_string("dtype=float32")
    with pytest.raises(ValueError, match="batch_size=auto: give a number"):
        CalmLM.create_from_arg_string(f"composition={folder / 'composition'}", {"batch_size": "auto"})


def test_lm_eval_command_line_with_the_calm_model_writes_the_harness_results(assets, hf_scores, tmp_path):
    folder, tasks = assets
    result = subprocess.run(
        [sys.executable, "-m", "launcher.eval.harness_model", "--model", "calm", "--model_args",
         f"composition={folder / 'composition'},dtype=float32,anchor_only=True", "--tasks", str(tasks["mc"]),
         "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path)],
        env=ENV, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [written] = list(tmp_path.rglob("results_*.json"))
    scores = json.loads(written.read_text())["results"]["calm_mc"]
    assert scores["acc,none"] == pytest.approx(hf_scores["results"]["calm_mc"]["acc,none"])
    assert "calm_mc" in result.stdout and "acc" in result.stdout  # the harness's table


def test_calm_eval_tasks_checks_its_input_before_any_worker(assets, tmp_path):
    from launcher.eval.command import plan
    from launcher.train_config import ConfigError

    folder, tasks = assets
    composition = folder / "composition"
    with pytest.raises(ConfigError, match=f"--tasks: {tmp_path / 'nope.yaml'}: no such task file"):
        plan(composition, None, tasks=[str(tmp_path / "nope.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text(tasks["mc"].read_text().replace(str(folder / "calm_mc.json"), str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match=f"--tasks: {broken}: not a task the harness can load"):
        plan(composition, None, tasks=[str(broken)])
    with pytest.raises(ConfigError, match="give --data FILE... or --tasks TASK..."):
        plan(composition, None)
    p = plan(composition, None, tasks=[str(tasks["mc"])], anchor_only=True, samples=2, num_fewshot=1)
    assert p.label == "anchor" and p.job.model == "anchor" and p.job.data == []
    assert p.job.harness.tasks == [str(tasks["mc"].resolve())] and not p.job.harness.builtin
    assert (p.job.harness.limit, p.job.harness.num_fewshot, p.job.harness.max_length) == (2, 1, None)


@pytest.mark.distributed
def test_calm_eval_tasks_on_two_zero3_workers_scores_as_hf(assets, hf_scores):
    folder, tasks = assets
    out = folder / "ray-out"
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "eval", str(folder / "composition"), "--tasks", str(tasks["mc"]),
         str(tasks["gen"]), "--workers", "2", "--micro-batch-size", "4", "--dtype", "float32", "--log-samples",
         "--output-dir", str(out)],
        env=ENV, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [written] = list((out / "harness/composition").glob("results_*.json"))
    ours = json.loads(written.read_text())
    # 5 questions (15 choices, 13 distinct forward inputs) in the hf model's batches of 4, dealt to 2 ranks;
    # the 3 prompts are one batch, so rank 1 decodes a filler that must count nowhere.
    ours["samples"] = {task: [json.loads(line) for line in next(written.parent.glob(f"samples_{task}_*.jsonl"))
                              .read_text().splitlines()] for task in ("calm_mc", "calm_gen")}
    for task in ("calm_mc", "calm_gen"):  # the samples file writes a (loglikelihood, is greedy) as two strings
        for sample in ours["samples"][task]:
            sample["resps"] = [[(float(r[0][0]), r[0][1] == "True") if isinstance(r[0], list) else r[0]]
                               for r in sample["resps"]]
    assert_same_scores(ours, hf_scores, ["calm_mc", "calm_gen"])
    lines = terminal_lines(result)
    assert noise_in(lines) == [], "\n".join(noise_in(lines))
    assert any("calm_mc" in line and "acc" in line for line in lines)  # the harness's table
    assert (written.parent / written.name.replace("results_", "table_").replace(".json", ".md")).is_file()
    assert lines[-1].startswith("log: ")
