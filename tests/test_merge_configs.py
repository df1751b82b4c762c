"""The shipped merge configs: the tiny one runs as documented; the 70B one plans within its memory
budget against 70B-shaped inputs (sparse files: real headers, no data on disk)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from calm_dist.testing.tiny_checkpoints import write_demo
from launcher.cli import main as calm
from merge.io.checkpoint_folder import Checkpoint
from merge.io.safetensors_file import build_header
from merge.merge_config import load_config, validate_config
from merge.planning.inputs import match_tensors
from merge.planning.plan import WORKER_OVERHEAD, build_tasks, plan_tensors

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_tiny_config_runs_as_documented(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    config = shutil.copy(CONFIGS / "cocktail-tiny.yaml", tmp_path / "configs")
    write_demo(tmp_path / "runs" / "cocktail-demo")
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", str(config), "--no-progress"])
    assert exit_.value.code == 0
    out = tmp_path / "runs" / "cocktail-demo" / "merged"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["weights_from"] == "examples"
    assert sum(row["weight"] for row in report["weights"].values()) == pytest.approx(1.0)
    assert "loss of math on 5 examples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", "--verify", str(out)])
    assert exit_.value.code == 0


def llama_70b_headers(folder: Path, shards: int = 30) -> None:
    """Llama-3.1-70B's tensors as bf16 safetensors shards whose data is a hole in a sparse file."""
    hidden, inter, kv, vocab = 8192, 28672, 1024, 128256
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(80):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    folder.mkdir(parents=True)
    names = list(shapes)
    weight_map = {}
    for s in range(shards):
        part = names[s * len(names) // shards : (s + 1) * len(names) // shards]
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header = build_header([(n, "BF16", shapes[n]) for n in part])
        with open(folder / filename, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(2 * shapes[n][0] * (shapes[n][1] if len(shapes[n]) > 1 else 1) for n in part))
        weight_map |= dict.fromkeys(part, filename)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "tie_word_embeddings": False}))


def test_70b_config_plans_within_its_memory_budget(tmp_path):
    raw = yaml.safe_load((CONFIGS / "cocktail-70b.yaml").read_text())
    load_config(CONFIGS / "cocktail-70b.yaml")  # valid as shipped
    for model in raw["models"]:
        llama_70b_headers(tmp_path / model["name"])
        model["path"] = str(tmp_path / model["name"])
    raw["output"]["path"] = str(tmp_path / "out")
    # The loss step needs the real models; the plan only needs weights.
    raw.pop("weights_from_examples")
    raw["weights"] = [0.4, 0.3, 0.3]
    cfg = validate_config(raw)
    checkpoints = [Checkpoint.open(m.name, m.path) for m in cfg.models]
    assert sum(t.nbytes for t in checkpoints[0].tensors.values()) == 141_107_412_992
    tasks = build_tasks(cfg, plan_tensors(cfg, match_tensors(checkpoints, cfg.vocab_policy), cfg.weights))
    assert len(tasks) == 30 and sum(len(t.tensors) for t in tasks) == 723
    assert all(t.data_bytes <= 5e9 for t in tasks[:-1])
    chunk = tasks[0].chunk_elems
    assert chunk == 64 * 2**18
    # 3 bf16 output chunks, and the input chunks held at once (3 bf16 inputs each): more than the 2 of
    # computing and reading, since the budget has room to read further ahead.
    assert tasks[0].read_slots > 2
    per_worker = WORKER_OVERHEAD + chunk * (3 * 2 + tasks[0].read_slots * 3 * 2)
    assert per_worker * cfg.workers <= cfg.memory_budget


def test_70b_config_plans_before_the_download_as_it_will_from_the_weights(tmp_path):
    """As shipped, its models' weights live on a cluster's storage: `calm plan` reads each model's
    `config:` (configs/models/llama-3.1-70b) instead, and gets every figure the weights' headers give."""
    from launcher.plan.command import merge_setup
    from merge.planning.config_only import plan_inputs

    shipped = load_config(CONFIGS / "cocktail-70b.yaml")
    before = plan_inputs(shipped)
    assert all(i.from_config and i.from_config.endswith("llama-3.1-70b/config.json, bfloat16") for i in before)
    raw = yaml.safe_load((CONFIGS / "cocktail-70b.yaml").read_text())
    for model in raw["models"]:
        llama_70b_headers(tmp_path / model["name"])
        model["path"] = str(tmp_path / model["name"])
    downloaded = validate_config(raw, base=CONFIGS)
    after = plan_inputs(downloaded)
    assert not any(i.from_config for i in after)
    planned, tasks = merge_setup(shipped, before)
    assert planned == merge_setup(downloaded, after)[0]
    assert planned.input_bytes == 141_107_412_992 and sum(len(t.tensors) for t in tasks) == 723


def test_read_ahead_stays_within_the_budget():
    """chunk_plan's input chunks held at once: the computed one and one read ahead when the budget is
    tight; with room to spare (chunks already at their largest), up to READ_AHEAD_BYTES of them; always
    within the budget."""
    from merge.io.safetensors_file import TensorInfo
    from merge.methods.specs import BLOCK
    from merge.planning.plan import MAX_CHUNK, OUT_BUFFERS, READ_AHEAD_BYTES, OutputTensor, chunk_plan

    source = TensorInfo("x", "w", "BF16", (2**30,), 0, 2**31)
    tensors = [OutputTensor("w", "BF16", (2**30,), (source,) * 3, "linear", (1.0, 1.0, 1.0), {}, 0)]
    per_element = OUT_BUFFERS * 2 + 2 * 3 * 2
    budgets = [WORKER_OVERHEAD + per_element * BLOCK * b for b in (1, 7, 64)] + [2 * 2**30, 64 * 2**30]
    budgets.append(WORKER_OVERHEAD + per_element * MAX_CHUNK + 3 * MAX_CHUNK * 3 * 2)  # room for 3 more
    for budget in budgets:
        chunk, slots = chunk_plan(tensors, budget, workers=1)
        assert WORKER_OVERHEAD + chunk * OUT_BUFFERS * 2 + slots * chunk * 3 * 2 <= budget
        assert 2 <= slots <= max(2, READ_AHEAD_BYTES // (chunk * 3 * 2))
        if chunk < MAX_CHUNK:
            assert slots == 2  # the budget goes to larger chunks first
    assert chunk_plan(tensors, budgets[-1], workers=1) == (MAX_CHUNK, 5)
    assert chunk_plan(tensors, 64 * 2**30, workers=1) == (MAX_CHUNK, READ_AHEAD_BYTES // (MAX_CHUNK * 3 * 2))
