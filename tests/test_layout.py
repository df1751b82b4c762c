"""The layout's rules, read from the source (AST only, nothing imported): no import cycles, DeepSpeed and
Ray only where they belong, modules a reader can take in one sitting, each saying what it is; and the
old module paths of the README still work for one release, with a warning."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calm_dist", "launcher", "merge")
MAX_LINES = 400
LONG_MODULE_REASON = "# longer than 400 lines:"  # the comment a longer module must carry, with its reason


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(path: Path) -> set[str]:
    """Every module this one imports, at the top or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _internal_edges(name: str) -> set[str]:
    return {target for target in IMPORTS[name] if target in MODULES and target != name}


def _third_party(name: str, package: str) -> bool:
    return any(target == package or target.startswith(package + ".") for target in IMPORTS[name])


def test_no_import_cycles():
    graph = {name: _internal_edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_model_knows_nothing_of_deepspeed_or_ray():
    offenders = [name for name in MODULES if name.startswith("calm_dist.model")
                 and (_third_party(name, "deepspeed") or _third_party(name, "ray"))]
    assert not offenders


def test_deepspeed_only_in_calm_dist_distributed():
    offenders = [name for name in MODULES if _third_party(name, "deepspeed")
                 and not name.startswith("calm_dist.distributed")]
    assert not offenders


def test_ray_only_in_the_launcher_and_the_merge_runner():
    offenders = [name for name in MODULES if _third_party(name, "ray")
                 and not name.startswith(("launcher", "merge.execution"))]
    assert not offenders


def test_every_module_says_what_it_is_and_is_short_or_says_why_not():
    undocumented = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not undocumented, f"modules without a docstring: {undocumented}"
    long = [name for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > MAX_LINES and LONG_MODULE_REASON not in path.read_text()]
    assert not long, f"over {MAX_LINES} lines with no '{LONG_MODULE_REASON} ...' comment: {long}"


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path):
    module = tmp_path / "example.py"
    module.write_text("def f():\n    from launcher.cli import main\n")
    assert "launcher.cli" in _imports(module)


@pytest.mark.parametrize("old, new, name", [
    ("calm_dist.composed", "calm_dist.model.composed", "compose"),
    ("calm_dist.generation", "calm_dist.model.decoding", "generate"),
    ("calm_dist.checkpoint", "calm_dist.model.composition_checkpoint", "load_composition"),
    ("calm_dist.tokenizer", "calm_dist.testing.tokenizers", "trained_tokenizer"),
    ("merge.tiny", "calm_dist.testing.tiny_checkpoints", "write_demo"),
])
def test_old_module_paths_forward_with_a_deprecation_warning(old, new, name):
    with pytest.warns(DeprecationWarning, match=f"import {name} from {new}"):
        moved = getattr(importlib.import_module(old), name)
    assert moved is getattr(importlib.import_module(new), name)


def test_the_readme_api_is_at_the_package_top_level():
    import calm_dist

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the top level is the new home: no deprecation on the way
        for name in ("compose", "generate", "save_composition", "load_composition", "Connection"):
            assert callable(getattr(calm_dist, name))


def test_the_configs_the_demo_reads_are_found_from_where_its_modules_now_live():
    """A module moved one folder deeper once looked for configs/ inside launcher/ (`calm demo` failed)."""
    from launcher.demo.command import TINY_CONFIG
    from launcher.kv_arithmetic.experiment import CONFIG
    from launcher.kv_arithmetic.experiment import ROOT as RUNS

    assert TINY_CONFIG.is_file() and CONFIG.is_file()
    assert RUNS == ROOT / "runs" / "kv-arithmetic"
