"""bench/gpu_smoke.py, the check for the day a GPU is lent, run here on CPU exactly as it is (gloo instead
of NCCL): one torchrun worker trains a composition on the real SmolLM2 anchor in bf16, evaluates it,
exports it and runs `calm generate`; and its seeded stand-in for machines without the asset has
SmolLM2's shape."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_smoke.py"


def gpu_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds `marker` (all those a command started inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.distributed
def test_the_gpu_smoke_check_runs_on_cpu_and_prints_one_json_line(tmp_path, smollm2):
    marker = f"GPU_SMOKE_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    env.pop("DS_ACCELERATOR", None)  # the script must set what it needs itself
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "2", "--batch", "2", "--eval-samples", "4",
         "--anchor", str(smollm2), "--out", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # stdout holds the JSON alone; library output went to stderr
    result = json.loads(lines[0])
    assert set(result) >= {"device", "anchor", "steps", "step_time_s", "tokens_per_s", "peak_gpu_memory_bytes",
                           "eval_exact_match", "eval_loss", "generated"}
    assert result["device"] == "cpu" and result["anchor"] == str(smollm2) and result["steps"] == 2
    assert result["peak_gpu_memory_bytes"] is None
    assert result["step_time_s"] > 0 and result["tokens_per_s"] > 0
    assert math.isfinite(result["eval_loss"]) and math.isfinite(result["train_loss"])
    assert 0.0 <= result["eval_exact_match"] <= 1.0
    assert result["generated"].strip()  # SmolLM2 says something after "99+54="
    # The run is what `calm train` exports, and the config asked for the anchor in bf16 under ZeRO-3.
    assert (tmp_path / "runs" / "gpu-smoke" / "composition" / "composition.json").is_file()
    assert "dtype: bfloat16" in (tmp_path / "gpu-smoke.yaml").read_text()
    assert processes_with(marker) == []  # torchrun and its worker are gone


def test_the_seeded_stand_in_has_smollm2s_shape(smollm2):
    """Where the asset cannot travel, the anchor is built from gpu_smoke.SMOLLM2_SHAPE: the same config
    fields and the same parameter count as the real checkpoint's."""
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    shape = gpu_smoke().SMOLLM2_SHAPE
    real, stand_in = AutoConfig.from_pretrained(smollm2), LlamaConfig(**shape)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                  "hidden_act", "bos_token_id", "eos_token_id"):
        assert getattr(stand_in, field) == getattr(real, field), field
    assert stand_in.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert stand_in.rms_norm_eps == pytest.approx(real.rms_norm_eps)
    with torch.device("meta"):
        built = sum(p.numel() for p in LlamaForCausalLM(stand_in).parameters())
    with safe_open(smollm2 / "model.safetensors", "pt") as weights:
        stored = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert built == stored
