"""Shared by the multi-process tests: a tiny training config in a temp folder, `calm train` as a
subprocess, and the comparison of two runs' exported compositions."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def tiny_config(folder: Path, steps: int, checkpoint_every: int, max_failures: int = 0, hub_gpt2_anchor: bool = False) -> Path:
    """configs/tiny.yaml on freshly made tiny assets: constant schedule, no eval, a log line per step.
    hub_gpt2_anchor: the anchor is a tied GPT-2 as hubs publish it (no `transformer.` prefix, no head)."""
    from calm_dist.testing.tokenizers import tiny_tokenizer
    from launcher.demo.command import make_assets

    assets = folder / "assets"
    make_assets(assets)
    anchor = assets / "anchor"
    if hub_gpt2_anchor:
        anchor = assets / "gpt2-hub-anchor"
        hub_style("gpt2", anchor, seed=0, width=128, layers=4)
        tiny_tokenizer(128).save_pretrained(anchor)
    base = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    base["models"] = {"anchor": {"path": str(anchor), "dtype": "float32"},
                      "augmenting": [{"path": str(assets / "augmenting"), "dtype": "float32"}]}
    base["data"].update(train=str(assets / "train.jsonl"), eval=None)
    base["training"].update(steps=steps, micro_batch_size=4, global_batch_size=16, checkpoint_every=checkpoint_every,
                            eval_every=None, log_every=1, schedule={"kind": "constant"})
    base["ray"].update(storage_path=str(folder / "ray"), max_failures=max_failures)
    base["output_dir"] = str(folder / "out")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(base))
    return config


def hub_style(family: str, folder: Path, seed: int, width: int = 64, layers: int = 2) -> None:
    """A tied checkpoint as model hubs publish many: saved from the base model, so no base-model prefix
    (GPT-2: `wte.weight`, `h.0.attn.c_attn.weight`; Gemma: `embed_tokens.weight`), no head, and GPT-2's
    causal-mask buffers stored beside the weights."""
    from calm_dist.testing.tiny_models import tiny_model

    model = tiny_model(family, layers=layers, width=width, heads=4, seed=seed, tied=True)
    prefix = model.base_model_prefix + "."
    tensors = {name.removeprefix(prefix): tensor.contiguous() for name, tensor in model.state_dict().items()
               if name.startswith(prefix)}
    if family == "gpt2":
        positions = model.config.n_positions
        mask = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
        tensors.update({f"h.{i}.attn.bias": mask.clone() for i in range(model.config.n_layer)})
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "train", str(config), *extra]


def train(config: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`calm train CONFIG EXTRA...`, asserting its exit code and that it left no process running (Ray's
    included, after a failure too); its output is returned."""
    marker = f"calm-test-{uuid.uuid4().hex}"
    result = subprocess.run(train_command(config, *extra), env={**ENV, "CALM_TEST_RUN": marker}, cwd=ROOT,
                            timeout=900, capture_output=True, text=True)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    left = left_running(marker)
    if left:
        kill_marked(marker)  # the failure is reported; the machine is not left with orphans
    assert left == [], f"calm train left processes running: {left}"
    return result


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries `marker`."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"CALM_TEST_RUN={marker}".encode() in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def left_running(marker: str, grace_s: float = 45.0) -> list[str]:
    """Processes still alive whose environment carries `marker` (every process a command starts inherits
    it), after giving them grace_s to exit."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"CALM_TEST_RUN={marker}".encode() in environ.read_bytes().split(b"\0"):
                    alive.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def assert_same_composition(out: Path, expected_run: str, run: str, trained_steps: int) -> None:
    """The two runs exported bitwise-equal composition tensors, and `run` trained all its steps."""
    expected = load_file(out / expected_run / "composition/composition.safetensors")
    actual = load_file(out / run / "composition/composition.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    manifest = json.loads((out / run / "composition/composition.json").read_text())
    assert manifest["trained_steps"] == trained_steps
