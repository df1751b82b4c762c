"""The eval job schema: everything a `calm eval` worker needs, resolved and checked on the driver.

Its own module so that the workers (launcher.eval.worker) read it without importing the command that
launches them (launcher.eval.command).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.train_config import ModelSpec, Strict


class HarnessTasks(Strict):
    """`calm eval --tasks`: what the workers hand to lm-evaluation-harness (launcher.eval.harness)."""

    tasks: list[str]  # harness task names, and task YAML files as absolute paths
    builtin: bool = True  # whether a name refers to the harness's own tasks (else only files: a faster index)
    limit: int | None = Field(None, ge=1)  # documents per task
    num_fewshot: int | None = Field(None, ge=0)
    log_samples: bool = False
    max_length: int | None = Field(None, ge=2)  # tokens per forward; None: the anchor's, as the harness's hf model
    max_gen_toks: int = Field(256, ge=1)  # when a task does not say


class EvalJob(Strict):
    """Everything a worker needs, resolved and checked on the driver."""

    model: Literal["composition", "anchor", "augmenting"]
    augmenting_index: int = 0
    composition: str | None = None  # the composition folder (composition.json + .safetensors)
    anchor: ModelSpec
    augmenting: list[ModelSpec]
    tokenizer: str
    data: list[str]  # scored one after the other by the same workers
    harness: HarnessTasks | None = None  # instead of data: lm-evaluation-harness tasks
    split: str | None = None  # of a saved DatasetDict: a training config's data.split, else the default
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    max_length: int = Field(ge=2)
    samples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 3
    use_gpu: bool = False
    examples: int = Field(5, ge=0)
