"""A merge killed with SIGKILL at any point, then rerun, ends byte-identical to an uninterrupted merge;
`calm merge --verify` re-checks a finished one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from merge_fixtures import budget_for_blocks, folder_bytes, random_tensors, raw_checkpoint, write_config

from launcher.cli import main as calm
from merge.job import run_merge
from merge.merge_config import load_config

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {f"layers.{i}.weight": (300, 1000) for i in range(6)} | {"norm.weight": (1000,)}

# Runs a merge that kills itself (SIGKILL: no cleanup of any kind) at a chosen point.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import merge.job, merge.io.manifest, merge.io.safetensors_file as io
    from merge.merge_config import load_config
    config, point, when = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = 0

    def hook(original, before=True):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == when and before:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if calls == when:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    if point == "mid-shard":  # a chunk half written to a partial file
        original = io.ShardWriter.write
        def write(self, data):
            global calls
            calls += 1
            if calls == when:
                original(self, memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, data)
        io.ShardWriter.write = write
    elif point == "after-rename":  # a shard complete on disk, not yet in the manifest
        io.ShardWriter.commit = hook(io.ShardWriter.commit, before=False)
    elif point == "mid-manifest":  # the manifest's temporary copy written, not renamed
        original_replace = os.replace
        def replace(src, dst):
            global calls
            if str(dst).endswith("merge_manifest.json"):
                calls += 1
                if calls == when:
                    os.kill(os.getpid(), signal.SIGKILL)
            original_replace(src, dst)
        merge.io.manifest.os.replace = replace
    elif point == "aux":  # the first of the config and tokenizer files written
        merge.job.write_atomic = hook(merge.job.write_atomic, before=False)
    elif point == "before-index":  # everything but the index
        merge.job.index_bytes = hook(merge.job.index_bytes)
    merge.job.run_merge(load_config(config), show_progress=False)
    sys.exit("not killed")
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three checkpoints, a config writing 3 shards in 1-block chunks, and the uninterrupted result."""
    root = tmp_path_factory.mktemp("resume")
    for seed in range(3):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, SHAPES), shards=2)
    config = {
        "method": "dare_ties", "base_model": "m0", "parameters": {"density": 0.5},
        "models": [{"path": str(root / f"m{i}")} for i in range(3)],
        "output": {"path": str(root / "reference"), "max_shard_size": 1_300_000},
        "memory_budget": budget_for_blocks(1, per_element=18),
    }
    run_merge(load_config(write_config(root, config)), show_progress=False, log=lambda _: None)
    (root / "killer.py").write_text(KILLER)
    return root, config


def rerun(root: Path, config: dict, out: Path) -> list[str]:
    logs: list[str] = []
    run_merge(load_config(write_config(root, config | {"output": config["output"] | {"path": str(out)}}, "rerun.yaml")),
              show_progress=False, log=logs.append)
    return logs


@pytest.mark.parametrize(
    ("point", "when", "kept"),
    [
        ("mid-manifest", 1, 0), ("aux", 1, 0), ("mid-shard", 5, 0), ("after-rename", 2, 1), ("mid-manifest", 5, 2),
        ("before-index", 1, 3),
    ],
)
def test_killed_merge_resumes_to_identical_bytes(setup, tmp_path, point, when, kept):
    root, config = setup
    out = tmp_path / "out"
    killed = write_config(tmp_path, config | {"output": config["output"] | {"path": str(out)}})
    proc = subprocess.run([sys.executable, str(root / "killer.py"), str(killed), point, str(when)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert folder_bytes(out) != folder_bytes(root / "reference")
    if point == "mid-shard":
        assert list(out.glob(".*.partial"))
    logs = rerun(root, config, out)
    assert folder_bytes(out) == folder_bytes(root / "reference")
    resumed = [line for line in logs if line.startswith("resuming")]
    assert resumed == ([f"resuming {out}: {kept} of 3 shards already complete and verified"] if kept else [])


def test_killed_process_pool_resumes_to_identical_bytes(setup, tmp_path):
    root, config = setup
    out = tmp_path / "out"
    budget = budget_for_blocks(1, per_element=18, workers=2)
    cfg = write_config(tmp_path, config | {"workers": 2, "memory_budget": budget, "output": config["output"] | {"path": str(out)}})
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "merge", str(cfg), "--no-progress"], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("model-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the merge ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its pool workers
    proc.wait()
    rerun(root, config, out)
    assert folder_bytes(out) == folder_bytes(root / "reference")


def test_verify_accepts_a_finished_merge_and_names_what_is_wrong(setup, tmp_path, capsys):
    root, config = setup
    out = tmp_path / "out"
    rerun(root, config, out)
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", "--verify", str(out)])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith("OK")

    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (out / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", "--verify", str(out)])
    assert exit_.value.code == 1
    printed = capsys.readouterr().out
    assert "model-00002-of-00003.safetensors: sha256 differs from the manifest" in printed
    assert printed.strip().endswith("FAILED")

    # A rerun repairs it: the bad shard fails its hash and is recomputed.
    rerun(root, config, out)
    assert folder_bytes(out) == folder_bytes(root / "reference")
