"""The compiled fast pass's ctypes table against fast_pass.c's prototypes, and a build that fails for real
(a broken compiler, none at all, a corrupt source): the merge falls back to torch with the same answer."""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
import sys
import textwrap
from fractions import Fraction

import pytest
import torch
from test_exact import hard_values, reference_round

from merge.methods import exact, fast_kernel

# C types of fast_pass.c's prototypes -> what ctypes passes for them (every pointer is a c_void_p).
C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "double": ctypes.c_double, "float": ctypes.c_float, "void": None}
QUALIFIERS = {"const", "volatile", "restrict"}


def exported_prototypes(source: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter declarations) of every function the C source defines and exports
    (not static)."""
    code = re.sub(r"/\*.*?\*/|//[^\n]*", " ", source, flags=re.S)  # comments
    code = re.sub(r"^[ \t]*#.*$", "", code, flags=re.M)  # preprocessor lines (MULTIVERSION's definition)
    found = {}
    for match in re.finditer(r"^(?:MULTIVERSION\s+)?([A-Za-z_][\w \t*]*?)\b(\w+)\s*\(([^()]*)\)\s*\{", code, re.M):
        returns, name, parameters = match.groups()
        if "static" in returns.split():
            continue
        found[name] = (returns.strip(), [p.strip() for p in parameters.split(",")])
    return found


def ctype_of(declaration: str) -> type:
    """The ctypes type of one C parameter declaration ('const double *scaled', 'int64_t n') or type."""
    if "*" in declaration:
        return ctypes.c_void_p
    words = [w for w in declaration.split() if w not in QUALIFIERS]
    return C_TYPES[words[0]]


def test_the_prototype_parser_sees_what_it_should():
    source = textwrap.dedent("""
        static inline float helper(uint32_t bits) { return 0; }
        MULTIVERSION
        int64_t exported(int k, const void *const *ys,
                         double factor) {
            if (k) {
            } else if (k > 1) {
            }
        }
    """)
    assert exported_prototypes(source) == {"exported": ("int64_t", ["int k", "const void *const *ys", "double factor"])}


def test_every_declared_signature_matches_the_c_prototype():
    prototypes = exported_prototypes(fast_kernel.SOURCE.read_text())
    assert set(prototypes) == set(fast_kernel.SIGNATURES), "fast_pass.c exports other functions than the table declares"
    for name, (restype, argtypes) in fast_kernel.SIGNATURES.items():
        returns, parameters = prototypes[name]
        assert restype is ctype_of(returns), name
        assert len(argtypes) == len(parameters), f"{name}: {len(argtypes)} argument types for {len(parameters)} parameters"
        for position, (declared, parameter) in enumerate(zip(argtypes, parameters, strict=True)):
            assert declared is ctype_of(parameter), f"{name}: argument {position} ({parameter}) declared {declared}"
    lib = fast_kernel.library()
    if lib is not None:  # the table is what the loaded functions use
        for name, (restype, argtypes) in fast_kernel.SIGNATURES.items():
            assert getattr(lib, name).restype is restype and getattr(lib, name).argtypes == list(argtypes)


@pytest.mark.parametrize("breakage", ["a failing compiler", "no compiler", "a corrupt source"])
def test_a_failed_build_falls_back_to_torch_with_the_same_results(breakage, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached: the build really runs
    monkeypatch.setattr(fast_kernel, "_LOADED", [])  # this process has tried nothing yet
    if breakage == "a failing compiler":
        monkeypatch.setenv("CC", f"{sys.executable} -c \"raise SystemExit('cc: error: fails on purpose')\"")
    elif breakage == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:  # whatever compiler this machine has (or none) refuses it
        corrupt = tmp_path / "fast_pass.c"
        shutil.copy(fast_kernel.SOURCE, corrupt)
        corrupt.write_text(corrupt.read_text() + "\nthis line is not C;\n")
        monkeypatch.setattr(fast_kernel, "SOURCE", corrupt)

    generator = torch.Generator().manual_seed(3)
    coefficients, divisor = [Fraction(1 / 3)] * 3, Fraction(1 / 3) * 3
    ys = [hard_values(generator, 600, torch.bfloat16) for _ in coefficients]
    with caplog.at_level(logging.WARNING, logger=fast_kernel.__name__):
        got = exact.combine(ys, coefficients, divisor, torch.bfloat16)
    assert fast_kernel.library() is None
    assert any("could not build the compiled fast pass" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "cache").rglob("*.partial")), "a failed build leaves no partial library"

    columns = [[Fraction(v) for v in y.double().tolist()] for y in ys]
    for i in range(len(got)):
        q = sum(c * column[i] for c, column in zip(coefficients, columns, strict=True)) / divisor
        assert got[i].item() == reference_round(q, torch.bfloat16), i
    monkeypatch.undo()  # the real source and compiler: where they build, the compiled pass agrees bit for bit
    if fast_kernel.library() is not None:
        assert torch.equal(exact.combine(ys, coefficients, divisor, torch.bfloat16).view(torch.int16), got.view(torch.int16))
