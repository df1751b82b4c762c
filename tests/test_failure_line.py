"""The one line a failed run ends with names the worker's exception, whatever Ray and libraries wrap
around it (a traceback, a cut in the middle of a long one, a footer after the exception's own line)."""

from launcher.runtime.quiet import one_line

RAY_WRAPPED = """Training failed due to worker errors:
Traceback (most recent call last):
  File "/x/trainer.py", line 80, in __init__
    raise ZeRORuntimeException(msg)
deepspeed.runtime.zero.utils.ZeRORuntimeException: You are using ZeRO-Offload with a client optimizer
... (Output truncated. See individual worker logs for full details) ...
eException: You are using ZeRO-Offload with a client"""

PYDANTIC = """pydantic_core._pydantic_core.ValidationError: 1 validation error for DeepSpeedZeroConfig
reduce_bucket_size
  Input should be greater than 0 [type=greater_than, input_value=-5, input_type=int]
    For further information visit https://errors.pydantic.dev/2.14/v/greater_than"""


def test_the_line_names_the_exception_not_a_cut_or_a_footer():
    assert one_line(RuntimeError(RAY_WRAPPED)) == (
        "ZeRORuntimeException: You are using ZeRO-Offload with a client optimizer")
    assert one_line(RuntimeError(PYDANTIC)) == "ValidationError: 1 validation error for DeepSpeedZeroConfig"
    assert one_line(ValueError("a plain message\n")) == "a plain message"
    assert one_line(ValueError("")) == "ValueError"
