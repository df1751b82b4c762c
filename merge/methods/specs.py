"""What the config, the plan and the reader know of each merge method: its parameters and its shape.

Not its arithmetic (merge/methods/registry.py). Kept free of torch, so a merge is checked, planned and
already reading its inputs while torch loads (a second or more of every `calm merge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Elements per block. Part of the definition of DARE's masks: changing it changes their random stream.
BLOCK = 1 << 18
# Bytes of the two 65536-bin int64 histograms that find one exact magnitude threshold
# (merge.methods.magnitude.kth_largest_abs).
HISTOGRAMS = 2 * 8 << 16


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LinearParams(_Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")
    allow_negative_weights: bool = Field(False, description="negative weights extrapolate; refused unless set")


class TaskArithmeticParams(_Params):
    scale: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="multiplies the summed task vectors")


class SparseParams(_Params):
    density: float = Field(gt=0, le=1, description="fraction of each task vector kept")
    scale: float = Field(1.0, alias="lambda", allow_inf_nan=False)


class DareParams(_Params):
    """mergekit's dare_linear and dare_ties: a random keep-mask, then the kept rescaled to the task
    vector's L1 norm (not divided by density: mergekit's `rescale`)."""

    density: float = Field(1.0, gt=0, le=1, description="chance each task-vector element is kept")
    scale: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="multiplies the mixed task vector")
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(True, description="scale the kept elements back to the task vector's L1 norm")


class BreadcrumbsParams(_Params):
    """Model Breadcrumbs: drop each task vector's largest `gamma` and smallest elements, keep `density`."""

    density: float = Field(1.0, ge=0, le=1, description="fraction of each task vector kept")
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of the largest elements dropped as outliers")
    scale: float = Field(1.0, alias="lambda", allow_inf_nan=False)
    normalize: bool = False
    rescale: bool = Field(False, description="scale the kept elements back to the task vector's L1 norm")


class DellaParams(_Params):
    """mergekit's della (MagPrune, then TIES's sign election): each task-vector element kept at random
    with a chance from density - epsilon (the smallest magnitude of its row) to density + epsilon (the
    largest), the kept rescaled to the task vector's L1 norm."""

    density: float = Field(1.0, gt=0, le=1, description="mean chance each task-vector element is kept; 1 keeps all")
    epsilon: float = Field(0.15, ge=0, allow_inf_nan=False, description="half the spread of the chances across a row")
    scale: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="multiplies the mixed task vector")
    normalize: bool = Field(True, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(True, description="scale the kept elements back to the task vector's L1 norm")

    @model_validator(mode="after")
    def _chances_are_probabilities(self) -> DellaParams:
        # mergekit's own condition, refused here before any work rather than midway through a merge.
        if self.density < 1 and (self.density + self.epsilon >= 1 or self.density - self.epsilon <= 0):
            raise ValueError(f"epsilon: density ± epsilon must lie strictly between 0 and 1 (density {self.density}, "
                             f"epsilon {self.epsilon})")
        return self


class DellaLinearParams(DellaParams):
    """della_linear: della without the sign election, and not normalized by default (mergekit's)."""

    normalize: bool = Field(False, description="divide by the sum of the weights")


class SceParams(_Params):
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of elements kept, by variance across the models")


class ModelStockParams(_Params):
    pass


class MultiSlerpParams(_Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)


class NuSlerpParams(_Params):
    pass


class KarcherParams(_Params):
    max_iter: int = Field(10, ge=0, description="Riemannian gradient steps at most")
    tol: float = Field(1e-5, gt=0, allow_inf_nan=False, description="stop when the step is shorter")


class PassthroughParams(_Params):
    pass


class SlerpParams(_Params):
    t: float = Field(ge=0, le=1, description="0 gives the first (base) model, 1 the second")
    dot_threshold: float = Field(0.9995, gt=0, le=1, description="above this |cos| fall back to linear interpolation")


@dataclass(frozen=True)
class MethodSpec:
    params: type[_Params]
    uses_base: bool
    takes_weights: bool
    model_count: tuple[int, int | None]
    # How many times each input tensor is read in full: a whole-tensor statistic's passes, then the merge.
    reads: int = 1
    # combine is elementwise and draws nothing at random: it may be given any range of the tensor, with
    # the inputs in their stored dtypes (it widens them itself), instead of fp32 blocks; and it writes
    # its result, already in the output dtype, into `out=`.
    any_range: bool = False
    # combine is given each input's block as stored (bfloat16, float16 or float32), not widened to fp32,
    # and widens what it needs itself (SCE's compiled merge reads bfloat16 as it is).
    stored_blocks: bool = False
    # A base model may be given or not (the method then works on task vectors or on the models);
    # model_count then counts the models other than the base.
    base_optional: bool = False
    # fp32 arrays of one block a combine holds at its peak, per input model (its inputs included):
    # what `calm plan` counts for the block arithmetic (merge.planning.memory).
    arrays_per_input: int = 2
    # Bytes of the whole-tensor statistic per input model (histograms of a magnitude threshold).
    statistic_bytes_per_input: int = 0
    # Bits per element of a tensor, per task vector, that the statistic holds for the merge pass (DELLA's
    # packed keep masks), from the statistic pass until the tensor is merged.
    held_mask_bits: int = 0
    # combine ranks elements within rows (DELLA): its blocks are whole rows, as many as fit in BLOCK
    # elements (block_elements), and its random draws are keyed by those blocks.
    row_blocks: bool = False
    # (tensor shape, params) -> why this method cannot merge a tensor of that shape, or None; asked for
    # every tensor before the merge starts (merge.planning.plan.plan_tensors).
    refuses: Callable[[tuple[int, ...], Any], str | None] | None = None


def row_length(shape: Sequence[int]) -> int:
    """Elements of one row as DELLA ranks them: a slab along the first dimension (a matrix's row); a
    vector is one row. mergekit ranks along dimension 1 within a slab, so a slab holds whole groups."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def block_elements(spec: MethodSpec | None, shape: Sequence[int]) -> int:
    """Elements per block of a tensor of this shape: BLOCK, or for a method ranking within rows as many
    whole rows as fit in BLOCK (rows longer than that are refused by such a method unless it ranks
    nothing, when BLOCK serves)."""
    if spec is None or not spec.row_blocks:
        return BLOCK
    row = row_length(shape)
    return BLOCK if row > BLOCK or row == 0 else BLOCK // row * row


def _della_refuses(shape: tuple[int, ...], params: Any) -> str | None:
    if params.density >= 1:  # nothing is ranked (mergekit returns the task vector as it is)
        return None
    group = shape[1] if len(shape) >= 2 else math.prod(shape)
    if group < 2:
        return (f"della ranks each element's magnitude among the elements of its row along dimension 1, and "
                f"shape {list(shape)} gives rows of {group} element(s) (mergekit's ranks are undefined there)")
    if row_length(shape) > BLOCK:
        return (f"della ranks elements within rows, streamed as whole rows of up to {BLOCK} elements; shape "
                f"{list(shape)} has rows of {row_length(shape)}")
    return None


SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec(LinearParams, uses_base=False, takes_weights=True, model_count=(1, None), any_range=True),
    "task_arithmetic": MethodSpec(TaskArithmeticParams, True, True, (2, None), any_range=True),
    # Two histogram passes find each task vector's magnitude threshold (methods.kth_largest_abs).
    "ties": MethodSpec(SparseParams, True, True, (2, None), reads=3, statistic_bytes_per_input=HISTOGRAMS),
    # One pass for each task vector's L1 norm before and after its mask (DareParams.rescale).
    "dare_linear": MethodSpec(DareParams, True, True, (2, None), stored_blocks=True, reads=2, arrays_per_input=4),
    "dare_ties": MethodSpec(DareParams, True, True, (2, None), stored_blocks=True, reads=2, arrays_per_input=5),
    # One pass for each task vector's L1 norm before and after its mask; the ranks (int64 sort order
    # and inverse) and draws of one input at a time on top of the task vectors.
    "della": MethodSpec(DellaParams, True, True, (2, None), stored_blocks=True, reads=2, arrays_per_input=7, row_blocks=True,
                        held_mask_bits=1, refuses=_della_refuses),
    "della_linear": MethodSpec(DellaLinearParams, True, True, (2, None), stored_blocks=True, reads=2, arrays_per_input=6,
                               row_blocks=True, held_mask_bits=1, refuses=_della_refuses),
    # Two histogram passes find both magnitude thresholds, one more the L1 norms (if rescale).
    "breadcrumbs": MethodSpec(BreadcrumbsParams, True, True, (2, None), stored_blocks=True, reads=4, arrays_per_input=4,
                              statistic_bytes_per_input=HISTOGRAMS * 2),
    "breadcrumbs_ties": MethodSpec(BreadcrumbsParams, True, True, (2, None), stored_blocks=True, reads=4, arrays_per_input=5,
                                   statistic_bytes_per_input=HISTOGRAMS * 2),
    # Two histogram passes for the variance threshold, one for the task vectors' mean squares.
    "sce": MethodSpec(SceParams, True, False, (2, None), reads=4, arrays_per_input=5, stored_blocks=True,
                      statistic_bytes_per_input=HISTOGRAMS),
    # One pass each for the inputs' dot products (merge.methods.spherical.gram).
    "model_stock": MethodSpec(ModelStockParams, True, False, (3, None), reads=2),
    "multislerp": MethodSpec(MultiSlerpParams, False, True, (1, None), reads=2, base_optional=True, arrays_per_input=4),
    "nuslerp": MethodSpec(NuSlerpParams, False, True, (2, 2), reads=2, base_optional=True),
    "karcher": MethodSpec(KarcherParams, False, False, (1, None), reads=2),
    # Copies layer slices (merge/planning/slices.py): every output tensor is one input tensor, no arithmetic.
    "passthrough": MethodSpec(PassthroughParams, False, False, (1, None), any_range=True, arrays_per_input=0),
    # One pass for the angle between the two tensors.
    "slerp": MethodSpec(SlerpParams, True, False, (2, 2), reads=2),
}
