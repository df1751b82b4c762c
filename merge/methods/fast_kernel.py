"""merge/methods/fast_pass.c, compiled on first use with the system's C compiler and loaded with ctypes:
- the exact fast pass of merge.methods.exact;
- the magnitude histograms of merge.methods.magnitude;
- the last pass of the sign-electing merges (TIES, and mergekit's task arithmetic after sparsification);
- the seeded draws of merge.methods.blocks, the sparse methods' masks, norms and statistics (DARE, DELLA, SCE);
- the spherical methods' Gram matrix and Multi-SLERP's step.

Why compiled: the fast pass in torch is ~17 ops, each a pass over memory, and on a 2-core machine it cost
as much CPU as reading and writing the files; fused it is one pass. Why at run time: the C is small and
plain (no Python headers), so any C compiler builds it in under a second, and the project stays a
pure-Python install. Without a compiler, the torch code runs: the same answer, slower (the log says so).

The library is cached under $XDG_CACHE_HOME/calm-dist (else ~/.cache/calm-dist), named by the
source's hash, so an edited kernel is rebuilt and concurrent workers never load a half-written one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("fast_pass.c")
CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

# The functions fast_pass.c exports, as ctypes sees them: name -> (return type, argument types), in the order of
# the C prototypes (tests/test_merge_fast_kernel.py checks it against the source). Pointers are c_void_p.
_P, _INT, _I64, _U64, _F32, _F64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_double
# k, ys, codes, scaled, factor, absolute, overflow_risk, parts, counts, positive
_CONSTANTS = (_INT, _P, _P, _P, _F64, _F64, _F64, _P, _P, _INT)
SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    # ..., out_code, out, n, where, low, estimate
    "fast_pass_float": (_I64, (*_CONSTANTS, _INT, _P, _I64, _P, _P, _P)),
    # ..., out, n, where, low, estimate
    "fast_pass_double": (_I64, (*_CONSTANTS, _P, _I64, _P, _P, _P)),
    # values, base (or NULL), dtype code, n, ways (HISTOGRAM_WAYS x 65536 int64) -> nonzero count
    "magnitude_high_histogram": (_I64, (_P, _P, _INT, _I64, _P)),
    # values, base (or NULL), dtype code, n, high, hist -> count in that high bin
    "magnitude_low_histogram": (_I64, (_P, _P, _INT, _I64, _INT, _P)),
    # k, xs (base first), thresholds, weights, scale, n, out
    "ties_merge": (None, (_INT, _P, _P, _P, _F32, _I64, _P)),
    # k, base, tvs, weights, ties, normalize, divisor, scale, n, out
    "mix_merge": (None, (_INT, _P, _P, _P, _INT, _INT, _F32, _F32, _I64, _P)),
    # key, n, out
    "uniform_draws": (None, (_U64, _I64, _P)),
    # k, xs (base first, as stored), dtype code, masks (k Mask), rescale, ratios, weights, ties, normalize,
    # divisor, scale, n, out
    "sparse_merge": (None, (_INT, _P, _INT, _P, _P, _P, _P, _INT, _INT, _F32, _F32, _I64, _P)),
    # x, base (as stored), dtype code, mask, n, sums
    "masked_l1": (None, (_P, _P, _INT, _P, _I64, _P)),
    # k, xs (base first), dtype code, n, out
    "sce_variance": (None, (_INT, _P, _INT, _I64, _P)),
    # k, xs (base first), dtype code, select, threshold, n, sums
    "sce_squares": (None, (_INT, _P, _INT, _INT, _F32, _I64, _P)),
    # k, xs (base first), dtype code, select, threshold, shares, n, out
    "sce_merge": (None, (_INT, _P, _INT, _INT, _F32, _P, _I64, _P)),
    # x, base (as stored), dtype code, rows, group, key, low, epsilon, keep, sums (or NULL)
    "della_keep": (None, (_P, _P, _INT, _I64, _I64, _U64, _F32, _F32, _P, _P)),
    # k, xs (any base first), dtype code, has_base, n, gram (k x k doubles)
    "gram_block": (None, (_INT, _P, _INT, _INT, _I64, _P)),
    # k, xs (any base first), has_base, weights, divisors, dots, spherical, mean_norm, cos_length, sin_ratio, norm, n, out
    "multislerp_merge": (None, (_INT, _P, _INT, _P, _P, _P, _INT, _F32, _F32, _F32, _F32, _I64, _P)),
}
MAX_MODELS = 8  # fast_pass.c's bound on the task vectors of ties_merge, mix_merge, multislerp_merge and the sce_ passes
_LOCK = threading.Lock()
_LOADED: list[ctypes.CDLL | None] = []  # empty until the first try


def library() -> ctypes.CDLL | None:
    """The compiled fast pass, or None where it cannot be built (then use the torch version)."""
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "calm-dist"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _load() -> ctypes.CDLL | None:
    source = SOURCE.read_bytes()
    compiler = _compiler()
    tag = hashlib.sha256(source + " ".join(compiler).encode()).hexdigest()[:16]
    target = cache_dir() / f"fast_pass-{platform.machine()}-{tag}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()
        log.warning("merge: could not build the compiled fast pass (%s); using torch ops, slower", detail)
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, list(argtypes)
    return lib


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private name, then an atomic rename: processes building at once each finish their own.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        command = [*compiler, "-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC", str(SOURCE), "-o", partial, "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        os.replace(partial, target)
        log.info("merge: built the compiled fast pass into %s", target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


_SCRATCH = threading.local()


def _scratch(n: int, out_dtype: torch.dtype, fast: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-thread room for the unsure elements of n outputs, reused: fresh allocations this size would
    be page-faulted in on every call."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    held = buffers.get((out_dtype, fast))
    if held is None or len(held[0]) < n:
        held = buffers[out_dtype, fast] = (
            torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=out_dtype), torch.empty(n, dtype=fast)
        )
    return held


class CompiledPass:
    """fast_pass.c set up for one merge.methods.exact.combine() call: the per-tensor constants become C
    arrays once, and each call runs the pass on one slice."""

    def __init__(self, lib: ctypes.CDLL, plan: Any, dtypes: list[torch.dtype], out_dtype: torch.dtype, fast: torch.dtype):
        k = len(dtypes)
        groups = [*plan.exact_coefficients, plan.exact_divisor]
        parts = [part for group in groups for part in group]
        self._after_inputs = (
            (ctypes.c_int * k)(*(CODES[d] for d in dtypes)), (ctypes.c_double * k)(*plan.scaled), plan.factor, plan.absolute, plan.overflow_risk,
            (ctypes.c_double * len(parts))(*parts), (ctypes.c_int * len(groups))(*map(len, groups)), int(plan.positive),
            *(() if fast == torch.float64 else (CODES[out_dtype],)),
        )
        self._function = lib.fast_pass_double if fast == torch.float64 else lib.fast_pass_float
        self._fast = fast

    def __call__(self, ys: list[torch.Tensor], out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fills out, deciding the usual unsure elements exactly itself; returns the others' positions
        with the low end's rounding and the estimate there (fresh tensors), for merge.methods.exact to settle."""
        n, k = len(out), len(ys)
        where, low, estimate = _scratch(n, out.dtype, self._fast)
        inputs = (ctypes.c_void_p * k)(*(y.data_ptr() for y in ys))
        count = self._function(k, inputs, *self._after_inputs, out.data_ptr(), n, where.data_ptr(), low.data_ptr(),
                               estimate.data_ptr())
        return where[:count].clone(), low[:count].clone(), estimate[:count].clone()


def compiled_pass(plan: Any, ys: Sequence[torch.Tensor], out: torch.Tensor, fast: torch.dtype) -> CompiledPass | None:
    """The compiled pass for these contiguous inputs and output, or None (no compiler, another dtype):
    then merge.methods.exact runs the same pass in torch."""
    if out.dtype not in CODES or not all(y.dtype in CODES and y.is_contiguous() for y in ys):
        return None
    lib = library()
    return CompiledPass(lib, plan, [y.dtype for y in ys], out.dtype, fast) if lib is not None else None


# fast_pass.c's WAYS: the interleaved high histograms a pass adds to, summed at its end.
HISTOGRAM_WAYS = 4


def stored_code(lib: ctypes.CDLL | None, tensors: Sequence[torch.Tensor]) -> int | None:
    """The dtype code in which the passes that read their inputs as stored (the magnitude histograms, SCE's,
    the Gram matrix, the sparse methods' L1 norms, DELLA's mask) read these (contiguous CPU tensors of equal
    length, all bfloat16 or all float32), or None: they cannot."""
    if lib is None or not tensors or tensors[0].dtype not in (torch.bfloat16, torch.float32):
        return None
    return CODES[tensors[0].dtype] if _contiguous_cpu(tensors, tensors[0].dtype) else None


def _floats(tensors: Sequence[torch.Tensor]) -> bool:
    return _contiguous_cpu(tensors, torch.float32)


def _contiguous_cpu(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether every tensor is a contiguous CPU tensor of this dtype, as long as the first."""
    return all(t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu" and t.numel() == tensors[0].numel()
               for t in tensors)


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def ties_merge(xs: Sequence[torch.Tensor], thresholds: Sequence[float], weights: Sequence[float], scale: float
               ) -> torch.Tensor | None:
    """merge.methods.registry.ties's result for fp32 blocks xs (base first), to the bit; None where the
    compiled pass is not built or does not apply (then the torch code runs)."""
    lib, k = library(), len(xs) - 1
    if lib is None or not 1 <= k <= MAX_MODELS or not _floats(xs):
        return None
    out = torch.empty_like(xs[0])
    lib.ties_merge(k, _pointers(xs), (ctypes.c_float * k)(*thresholds), (ctypes.c_float * k)(*weights), scale,
                   out.numel(), out.data_ptr())
    return out


def mix_merge(base: torch.Tensor, tvs: Sequence[torch.Tensor], weights: Sequence[float], ties: bool, normalize: bool,
              divisor: float, scale: float) -> torch.Tensor | None:
    """merge.methods.sparse.mix's result, to the bit (`divisor`: the weights' fp32 sum as mix uses it
    without ties); None where the compiled pass is not built or does not apply."""
    lib, k = library(), len(tvs)
    if lib is None or not 1 <= k <= MAX_MODELS or not _floats([base, *tvs]):
        return None
    out = torch.empty_like(base)
    lib.mix_merge(k, base.data_ptr(), _pointers(tvs), (ctypes.c_float * k)(*weights), int(ties), int(normalize), divisor,
                  scale, out.numel(), out.data_ptr())
    return out


def uniform_draws(key: int, n: int) -> torch.Tensor | None:
    """merge.methods.blocks.uniform_draws(key, n), to the bit; None where the compiled pass is not built."""
    lib = library()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.float32)
    lib.uniform_draws(key, n, out.data_ptr())
    return out


class Mask(ctypes.Structure):
    """Which elements of a task vector d = x - base a sparse method keeps: DARE's, those whose draw
    (merge.methods.blocks.uniform_draws(key, n)) is below density; Breadcrumbs', lower <= |d| < upper;
    or those whose bit is 1 in a given packed mask (della_keep's; its address). fast_pass.c's Mask."""

    _fields_ = [("kind", ctypes.c_int), ("key", ctypes.c_uint64), ("density", ctypes.c_float), ("lower", ctypes.c_float),
                ("upper", ctypes.c_float), ("given", ctypes.c_void_p)]

    @classmethod
    def dare(cls, key: int, density: float) -> Mask:
        return cls(1, key, density)

    @classmethod
    def window(cls, lower: float, upper: float) -> Mask:
        return cls(0, lower=lower, upper=upper)

    @classmethod
    def given_by(cls, keep: torch.Tensor) -> Mask:
        """The caller holds `keep` (della_keep's packed bits) until the mask has been used."""
        return cls(2, given=keep.data_ptr())


def sparse_merge(xs: Sequence[torch.Tensor], masks: Sequence[Mask], ratios: Sequence[torch.Tensor | None],
                 weights: Sequence[float], ties: bool, normalize: bool, divisor: float, scale: float) -> torch.Tensor | None:
    """merge.methods.sparse.masked_mix, to the bit: each task vector x - base (xs: base first, read as stored
    where they can be) masked, times its ratio (fp32, 0-d) unless None, then mixed; None: not compiled here."""
    k = len(xs) - 1
    if (compiled := _stored_or_widened(xs, k)) is None:
        return None
    lib, code, xs = compiled
    out = torch.empty(xs[0].shape, dtype=torch.float32)
    rescale = (ctypes.c_int * k)(*(r is not None for r in ratios))
    ratio = (ctypes.c_float * k)(*(0.0 if r is None else r.item() for r in ratios))
    lib.sparse_merge(k, _pointers(xs), code, (Mask * k)(*masks), rescale, ratio, (ctypes.c_float * k)(*weights), int(ties),
                     int(normalize), divisor, scale, out.numel(), out.data_ptr())
    return out


def masked_l1(x: torch.Tensor, base: torch.Tensor, mask: Mask) -> tuple[float, float] | None:
    """The L1 norms (fp64 sums) of x - base and of it masked (as sparse_merge masks it), x and base read as
    stored where they can be (_stored_or_widened); None where the compiled pass is not built."""
    compiled = _stored_or_widened([x, base], 1)
    if compiled is None:
        return None
    lib, code, (x, base) = compiled
    sums = (ctypes.c_double * 2)()
    lib.masked_l1(x.data_ptr(), base.data_ptr(), code, ctypes.byref(mask), x.numel(), sums)
    return sums[0], sums[1]


def _read_as_stored(xs: Sequence[torch.Tensor], k: int) -> tuple[ctypes.CDLL, int] | None:
    """The library and the dtype code in which a pass over k vectors (SCE's task vectors, the Gram matrix's)
    reads xs as stored (all bfloat16 or all float32); None where it cannot."""
    lib = library()
    code = stored_code(lib, xs) if 1 <= k <= MAX_MODELS else None
    return None if code is None else (lib, code)


def _stored_or_widened(xs: Sequence[torch.Tensor], k: int) -> tuple[ctypes.CDLL, int, list[torch.Tensor]] | None:
    """_read_as_stored of xs, and xs (widened to float32 where they cannot be read as stored: float16)."""
    compiled = _read_as_stored(xs, k)
    if compiled is None and 1 <= k <= MAX_MODELS and all(x.numel() == xs[0].numel() for x in xs):
        xs = [x.float().contiguous() for x in xs]
        compiled = _read_as_stored(xs, k)
    return None if compiled is None else (*compiled, list(xs))


def sce_variance(xs: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """merge.methods.sparse's variance of the task vectors of xs (base first; bfloat16 or float32 as
    stored), in fp32, to the bit; None where the compiled pass is not built or does not apply."""
    compiled = _read_as_stored(xs, len(xs) - 1)
    if compiled is None:
        return None
    lib, code = compiled
    out = torch.empty(xs[0].shape, dtype=torch.float32)
    lib.sce_variance(len(xs) - 1, _pointers(xs), code, out.numel(), out.data_ptr())
    return out


def sce_squares(xs: Sequence[torch.Tensor], threshold: float | None) -> list[float] | None:
    """Each selected task vector's sum of squares (squares in fp32, summed in fp64), as SCE's statistic
    takes them; None where the compiled pass is not built or does not apply."""
    compiled = _read_as_stored(xs, len(xs) - 1)
    if compiled is None:
        return None
    lib, code = compiled
    sums = (ctypes.c_double * (len(xs) - 1))()
    lib.sce_squares(len(xs) - 1, _pointers(xs), code, int(threshold is not None), threshold or 0.0, xs[0].numel(), sums)
    return list(sums)


def sce_merge(xs: Sequence[torch.Tensor], threshold: float | None, shares: Sequence[float]) -> torch.Tensor | None:
    """merge.methods.sparse.sce's fp32 result, to the bit; None where the compiled pass is not built or
    does not apply."""
    compiled = _read_as_stored(xs, len(xs) - 1)
    if compiled is None:
        return None
    lib, code = compiled
    out = torch.empty(xs[0].shape, dtype=torch.float32)
    k = len(xs) - 1
    lib.sce_merge(k, _pointers(xs), code, int(threshold is not None), threshold or 0.0, (ctypes.c_float * k)(*shares),
                  out.numel(), out.data_ptr())
    return out


def gram_block(xs: Sequence[torch.Tensor], has_base: bool) -> list[list[float]] | None:
    """The Gram matrix (fp64) of the blocks xs (as stored: bfloat16 or float32) or, with a base (xs[0]), of
    their fp32 task vectors, as merge.methods.spherical.gram takes a block's; None where the compiled pass
    is not built or does not apply."""
    k = len(xs) - int(has_base)
    compiled = _read_as_stored(xs, k)
    if compiled is None:
        return None
    lib, code = compiled
    gram = (ctypes.c_double * (k * k))()
    lib.gram_block(k, _pointers(xs), code, int(has_base), xs[0].numel(), gram)
    return [list(gram[i * k:(i + 1) * k]) for i in range(k)]


def multislerp_merge(xs: Sequence[torch.Tensor], has_base: bool, weights: torch.Tensor, divisors: torch.Tensor,
                     dots: torch.Tensor, mean_norm: torch.Tensor | None, cos_length: torch.Tensor, sin_ratio: torch.Tensor,
                     norm: torch.Tensor) -> torch.Tensor | None:
    """merge.methods.spherical.multislerp's result for fp32 blocks xs (any base first) and its statistic's
    fp32 values, to the bit; None where the compiled pass is not built or does not apply."""
    lib, k = library(), len(xs) - int(has_base)
    if lib is None or not 1 <= k <= MAX_MODELS or not _floats(xs):
        return None
    out = torch.empty_like(xs[0])

    def floats(values: torch.Tensor) -> ctypes.Array:
        return (ctypes.c_float * k)(*values.flatten().tolist())

    # Without mean_norm (the linear fallback) the other scalars are not used (the statistic fills them with the weights).
    spherical = [float(t) if mean_norm is not None else 0.0 for t in (mean_norm, cos_length, sin_ratio, norm)]
    lib.multislerp_merge(k, _pointers(xs), int(has_base), floats(weights), floats(divisors), floats(dots),
                         int(mean_norm is not None), *spherical, out.numel(), out.data_ptr())
    return out


def della_keep(x: torch.Tensor, base: torch.Tensor, group: int, key: int, density: float, epsilon: float,
               norms: bool = False) -> tuple[torch.Tensor, tuple[float, float] | None] | None:
    """DELLA's keep mask of the task vector x - base, a block of whole rows of `group` elements, packed (uint8;
    element i is bit i % 8 of byte i // 8: 1 kept, 0 dropped): merge.methods.della's `block_uniform(block,
    model) < keep_chances(...)`, to the bit, with the draws of `key`; with `norms`, also masked_l1's two norms
    of it, from the same pass (x and base read as stored where they can be); None where it does not apply."""
    compiled = _stored_or_widened([x, base], 1)
    if compiled is None or x.numel() % group:
        return None
    lib, code, (x, base) = compiled
    keep = torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
    sums = (ctypes.c_double * 2)() if norms else None
    # della.py adds density - epsilon and multiplies by epsilon as torch does with Python floats: in fp32.
    lib.della_keep(x.data_ptr(), base.data_ptr(), code, x.numel() // group, group, key, density - epsilon, epsilon,
                   keep.data_ptr(), sums)
    return keep, (sums[0], sums[1]) if sums is not None else None
