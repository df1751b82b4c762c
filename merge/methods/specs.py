"""What the config, the plan and the reader know of each merge method: its parameters and its shape.

Not its arithmetic (merge/methods/registry.py). Kept free of torch, so a merge is checked, planned and
already reading its inputs while torch loads (a second or more of every `calm merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

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
    # A base model may be given or not (the method then works on task vectors or on the models);
    # model_count then counts the models other than the base.
    base_optional: bool = False
    # fp32 arrays of one block a combine holds at its peak, per input model (its inputs included):
    # what `calm plan` counts for the block arithmetic (merge.planning.memory).
    arrays_per_input: int = 2
    # Bytes of the whole-tensor statistic per input model (histograms of a magnitude threshold).
    statistic_bytes_per_input: int = 0


SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec(LinearParams, uses_base=False, takes_weights=True, model_count=(1, None), any_range=True),
    "task_arithmetic": MethodSpec(TaskArithmeticParams, True, True, (2, None), any_range=True),
    # Two histogram passes find each task vector's magnitude threshold (methods.kth_largest_abs).
    "ties": MethodSpec(SparseParams, True, True, (2, None), reads=3, statistic_bytes_per_input=HISTOGRAMS),
    # One pass for each task vector's L1 norm before and after its mask (DareParams.rescale).
    "dare_linear": MethodSpec(DareParams, True, True, (2, None), reads=2, arrays_per_input=4),
    "dare_ties": MethodSpec(DareParams, True, True, (2, None), reads=2, arrays_per_input=5),
    # Two histogram passes find both magnitude thresholds, one more the L1 norms (if rescale).
    "breadcrumbs": MethodSpec(BreadcrumbsParams, True, True, (2, None), reads=4, arrays_per_input=4,
                              statistic_bytes_per_input=HISTOGRAMS * 2),
    "breadcrumbs_ties": MethodSpec(BreadcrumbsParams, True, True, (2, None), reads=4, arrays_per_input=5,
                                   statistic_bytes_per_input=HISTOGRAMS * 2),
    # Two histogram passes for the variance threshold, one for the task vectors' mean squares.
    "sce": MethodSpec(SceParams, True, False, (2, None), reads=4, arrays_per_input=5,
                      statistic_bytes_per_input=HISTOGRAMS),
    # One pass each for the inputs' dot products (merge.methods.spherical.gram).
    "model_stock": MethodSpec(ModelStockParams, True, False, (3, None), reads=2),
    "multislerp": MethodSpec(MultiSlerpParams, False, True, (1, None), reads=2, base_optional=True, arrays_per_input=4),
    "nuslerp": MethodSpec(NuSlerpParams, False, True, (2, 2), reads=2, base_optional=True),
    "karcher": MethodSpec(KarcherParams, False, False, (1, None), reads=2),
    # One pass for the angle between the two tensors.
    "slerp": MethodSpec(SlerpParams, True, False, (2, 2), reads=2),
}
