"""What the config, the plan and the reader know of each merge method: its parameters and its shape.

Not its arithmetic (merge/methods/registry.py). Kept free of torch, so a merge is checked, planned and
already reading its inputs while torch loads (a second or more of every `calm merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

# Elements per block. Part of the definition of DARE's masks: changing it changes their random stream.
BLOCK = 1 << 18


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


SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec(LinearParams, uses_base=False, takes_weights=True, model_count=(1, None), any_range=True),
    "task_arithmetic": MethodSpec(TaskArithmeticParams, True, True, (2, None), any_range=True),
    # Two histogram passes find each task vector's magnitude threshold (methods.kth_largest_abs).
    "ties": MethodSpec(SparseParams, True, True, (2, None), reads=3),
    "dare_linear": MethodSpec(SparseParams, True, True, (2, None)),
    "dare_ties": MethodSpec(SparseParams, True, True, (2, None)),
    # One pass for the angle between the two tensors.
    "slerp": MethodSpec(SlerpParams, True, False, (2, 2), reads=2),
}
