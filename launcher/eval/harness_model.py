"""A saved composition as an lm-evaluation-harness model: `CalmLM`, registered as `calm`.

It reads the text as the harness's own `hf` model does (the same encoding of context and continuation,
the same truncation, prefix token and stop sequences), so that for a composition at init, which equals
its anchor, every score equals `hf` on the anchor alone. Loglikelihoods come from one forward per batch
of requests; generation decodes with the KV caches (launcher.eval.harness_runner, which also splits
the requests across ranks under ZeRO-3).

The harness finds models only in its registry, and lm-eval 0.4 reads no entry points for models, so
this module must be imported before the harness looks the name up:

    calm-lm-eval --model calm --model_args composition=runs/NAME/composition --tasks hellaswag
    python -m launcher.eval.harness_model ...      # the same: lm_eval's command line, `calm` registered

or from Python, `import launcher.eval.harness_model` and then `lm_eval.simple_evaluate(model="calm",
model_args={"composition": ...})`, or `simple_evaluate(model=CalmLM.from_composition(...))`.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (the harness's own models first: it imports them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from launcher.eval.harness_runner import Runner
from launcher.eval.job import HarnessTasks

DEFAULT_MAX_LENGTH = 2048  # the harness's, for a model whose config names no context length


@register_model("calm")
class CalmLM(TemplateLM):
    """lm_eval's LM over a Runner (launcher.eval.harness_runner) and the anchor's tokenizer (or, for a
    base model alone, that model's). CalmLM.from_composition builds one in this process; `calm eval
    --tasks` builds one on each Ray Train worker."""

    def __init__(self, runner: Runner, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, *,
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None):
        super().__init__()
        for key, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks), ("max_length", max_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"calm model: {key}={value!r}: must be a whole number of at least 1")
        self.runner, self.tokenizer = runner, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    # ----------------------------------------------------------------------------------------------
    # Built from a composition folder, in this process

    @classmethod
    def from_composition(cls, composition: str | Path, *, anchor: str | None = None,
                         augmenting: str | list[str] | None = None, tokenizer: str | None = None,
                         augmenting_tokenizer: str | list[str] | None = None, anchor_only: bool = False,
                         augmenting_only: int | None = None, dtype: str = "auto", device: str | None = None,
                         **settings) -> CalmLM:
        """The composition on its base models (composition.json names them; anchor/augmenting override),
        or with anchor_only / augmenting_only=K one base model alone (the baseline rows). dtype: "auto"
        (as stored), "float32" or "bfloat16"; device: a torch device (default cuda if there is one).
        settings: batch_size, max_length, max_gen_toks, add_bos_token, prefix_token_id."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from calm_dist.model.composition_checkpoint import read_manifest
        from calm_dist.model.decoding import SingleModel, pad_token_id
        from launcher.generate.command import base_paths, load

        composition = Path(composition)
        listed = [augmenting] if isinstance(augmenting, str) else augmenting
        own = [augmenting_tokenizer] if isinstance(augmenting_tokenizer, str) else augmenting_tokenizer
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if anchor_only or augmenting_only is not None:
            anchor_path, augmenting_paths = base_paths(composition, anchor, listed)
            if augmenting_only is not None and not 0 <= augmenting_only < len(augmenting_paths):
                raise ValueError(f"calm model: augmenting_only={augmenting_only}: {composition} has augmenting models "
                                 f"0..{len(augmenting_paths) - 1}")
            path = anchor_path if anchor_only else augmenting_paths[augmenting_only]
            if anchor_only:
                tokenizer_path = tokenizer or anchor_path
            else:  # alone, an augmenting model trained on its own tokens reads them
                recorded = (read_manifest(composition).get("tokenizers") or {}).get("augmenting") or []
                trained_own = augmenting_only < len(recorded) and recorded[augmenting_only] is not None
                tokenizer_path = (own[augmenting_only] if own else path) if trained_own else (tokenizer or anchor_path)
            base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
            model, text = SingleModel(base.to(device)), AutoTokenizer.from_pretrained(tokenizer_path)
        else:
            model, text = load(composition, anchor, listed, tokenizer, dtype, device, own)
        runner = Runner.in_process(model, pad_token_id(text), text.eos_token_id)
        return cls(runner, text, model.anchor.config, **settings)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CalmLM:
        """`--model calm --model_args composition=PATH,...` (the harness also passes batch_size, device)."""
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        args.pop("max_batch_size", None)  # batch sizes here are fixed, never searched for
        if "composition" not in args:
            raise ValueError("calm model: --model_args needs composition=PATH (a composition folder)")
        if "batch_size" in args:
            size = str(args["batch_size"])
            if not size.isdigit():
                raise ValueError(f"calm model: batch_size={size}: give a number (no automatic search)")
            args["batch_size"] = int(size)
        known = {"composition", "anchor", "augmenting", "tokenizer", "augmenting_tokenizer", "anchor_only",
                 "augmenting_only", "dtype", "device", "batch_size", "max_length", "max_gen_toks", "add_bos_token",
                 "prefix_token_id"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"calm model: unknown model_args {unknown}; known: {sorted(known)}")
        return cls.from_composition(args.pop("composition"), **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CalmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ----------------------------------------------------------------------------------------------
    # Text, as the harness's hf model reads it

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = {} if add_special_tokens is None and self.add_bos_token is None else {
            "add_special_tokens": self.add_bos_token if add_special_tokens is None else add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}  # the text brings its own BOS
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ----------------------------------------------------------------------------------------------
    # The three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context tokens, continuation tokens)."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"calm model: a request with {len(context)} context and {len(continuation)} "
                                 f"continuation tokens (each must be 1..{self.max_length})")
            rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        answers = self.runner.continuation_logprobs(rows, self.batch_size)
        for (strings, _, _), answer in zip(requests, answers, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings decode together, in the order they come (every
        rank sees the same requests, so every rank forms the same groups)."""
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(index)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            settings = dict(normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks))
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_gen_toks = settings.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"calm model: max_gen_toks={max_gen_toks} leaves no room for the context in "
                                 f"max_length={self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                       for i in indices]
            do_sample = bool(settings.get("do_sample"))
            rows = self.runner.continuations(
                prompts, max_new_tokens=max_gen_toks, stops=until, text=self.tokenizer.decode,
                batch_size=self.batch_size, do_sample=do_sample,
                temperature=float(settings.get("temperature") or 1.0) if do_sample else 1.0,
                top_k=int(settings.get("top_k") or 0), top_p=float(settings.get("top_p") or 1.0))
            for i, row in zip(indices, rows, strict=True):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main() -> None:
    """lm_eval's own command line, with `calm` among its models (the `calm-lm-eval` script)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()


def evaluate_tasks(lm, tasks: HarnessTasks) -> dict:
    """The harness's results (its simple_evaluate) of `lm` on the tasks; "samples" too with log_samples."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks.tasks, num_fewshot=tasks.num_fewshot, limit=tasks.limit,
                                   log_samples=tasks.log_samples, batch_size=lm.batch_size,
                                   task_manager=TaskManager(include_defaults=tasks.builtin))
