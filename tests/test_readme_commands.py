"""Every `calm` command README.md shows runs as shown, or at least parses against the real parser.

The commands are read from README.md's ```bash blocks: each line that starts with `calm`, joined with
its `\\` continuation lines, comments dropped. A block runs in order, in a scratch folder holding a
copy of configs/ (the README's paths are relative to the repository root), so its earlier lines
prepare its later ones: `python -m calm_dist.testing.tiny_checkpoints runs/cocktail-demo` makes the
tiny merge's inputs, `calm merge` merges them, `calm merge --verify` checks the result.

Commands that run in seconds here (RUN) run through launcher.cli.main and must exit 0. The others are
parsed by launcher.cli.build_parser, and the files under configs/ they name must exist; PARSED_ONLY
says why each is only parsed and which test runs it. A README command in neither fails the test.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

from launcher.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

RUN = {"plan", "merge", "--help"}
PARSED_ONLY = {
    "train": "trains with Ray + DeepSpeed for minutes; tests/test_distributed.py and tests/test_eval.py run it",
    "eval": "needs a trained composition and two ZeRO-3 workers; tests/test_eval.py runs it",
    "generate": "needs a trained composition (runs/tiny-demo/composition); tests/test_eval.py runs it",
    "submit": "needs a Ray cluster at http://HEAD:8265; tests/test_submit_cluster.py runs it against a head node",
}


def demo_assets(root: Path) -> None:
    """configs/tiny.yaml's models and data, as `calm demo --tiny` makes them (README: "its models: `calm
    demo --tiny` makes them"), without the demo's training."""
    from launcher.demo.command import make_assets

    make_assets(root / "runs" / "demo-assets")


# What a README command takes for granted, by the config it names: the README says so beside it.
PREPARED = {"configs/tiny.yaml": demo_assets}


def shell_lines(markdown: str) -> list[list[str]]:
    """The command lines of each ```bash block, continuations joined, comments and blank lines dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL):
        lines, pending = [], ""
        for raw in body.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
        blocks.append(lines)
    return blocks


def calm_blocks() -> list[list[str]]:
    """The README's blocks that show a `calm` command (with every line of the block, in order)."""
    return [block for block in shell_lines(README.read_text()) if any(line.startswith("calm ") for line in block)]


def test_the_extractor_joins_continuations_and_drops_comments():
    text = ("```bash\ncalm plan a.yaml --x 1   # note\n# only a comment\n\ncalm train b.yaml \\\n"
            "    --set k=v\nmake demo\n```\n```python\ncalm ignored\n```\n")
    assert shell_lines(text) == [["calm plan a.yaml --x 1", "calm train b.yaml --set k=v", "make demo"]]


def test_the_readme_shows_the_commands_this_test_knows_and_every_reason_is_still_used():
    commands = [shlex.split(line)[1:] for block in calm_blocks() for line in block if line.startswith("calm ")]
    assert len(commands) >= 15  # the extraction finds them (plan, merge, train, submit, eval, generate)
    shown = {argv[0] for argv in commands}
    assert {"plan", "merge", "train", "submit", "eval", "generate"} <= shown
    assert set(PARSED_ONLY) <= shown, "a reason for a command the README no longer shows"


def run_block(block: list[str], folder: Path, capsys) -> None:
    """Run (RUN) or parse (PARSED_ONLY) each `calm` line of a block in order, in `folder` (the cwd)."""
    for line in block:
        argv = shlex.split(line)
        if argv[:2] == ["python", "-m"] and argv[2].startswith("calm_dist."):  # a step the block shows first
            importlib.import_module(argv[2]).main(argv[3:])  # what its `if __name__ == "__main__"` runs
            continue
        if argv[0] != "calm":
            continue  # make, ray, kubectl, benchmarks: not this test's
        argv = argv[1:]
        for config, prepare in PREPARED.items():
            if config in argv:
                prepare(folder)
        if argv[0] in RUN:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            out = capsys.readouterr()
            assert exit_info.value.code == 0, f"`{line}` exited {exit_info.value.code}: {out.err}{out.out[-2000:]}"
        elif argv[0] in PARSED_ONLY:
            try:
                build_parser(argv[0]).parse_args(argv)
            except SystemExit:
                pytest.fail(f"`{line}` does not parse: {capsys.readouterr().err}")
            missing = [arg for arg in argv if arg.startswith("configs/") and not (ROOT / arg).exists()]
            assert not missing, f"`{line}` names files that do not exist: {missing}"
        else:
            pytest.fail(f"`{line}`: README shows it, but it is neither run here (RUN) nor listed as parse-only "
                        "with a reason (PARSED_ONLY)")


@pytest.mark.parametrize("block", calm_blocks(), ids=lambda block: next(x for x in block if x.startswith("calm ")))
def test_each_readme_calm_command_runs_or_parses(block, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    run_block(block, tmp_path, capsys)


def test_a_command_neither_run_nor_listed_fails_and_so_does_a_bad_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.fail.Exception, match="neither run here"):
        run_block(["calm frobnicate configs/tiny.yaml"], tmp_path, capsys)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        run_block(["calm train configs/tiny.yaml --no-such-flag"], tmp_path, capsys)
    with pytest.raises(AssertionError, match="names files that do not exist"):
        run_block(["calm submit configs/nope.yaml --address http://HEAD:8265"], tmp_path, capsys)
    with pytest.raises(AssertionError, match="exited 2"):
        run_block(["calm plan configs/nope.yaml"], tmp_path, capsys)
