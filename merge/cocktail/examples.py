"""LM-Cocktail's examples: the JSONL file read and checked, and an embedding model's batches drawn.

Decoder examples are (input, output) pairs; embedding examples (query, positive, negatives), as
LM_Cocktail reads them (FlagEmbedding, LM_Cocktail 0.0.4). Plain Python: no torch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from merge.merge_config import ExamplesWeights
from merge.merge_errors import ExamplesError


def read_examples(path: Path, kind: str = "decoder", negatives: int = 0) -> list:
    """Decoder examples as (input, output); embedding examples as (query, positive, negatives)."""
    examples = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ExamplesError(f"{path}: cannot read: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExamplesError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        examples.append(_decoder_example(path, number, record) if kind == "decoder" else _embedding_example(path, number, record, negatives))
    if not examples:
        raise ExamplesError(f"{path}: no examples")
    return examples


def _decoder_example(path: Path, number: int, record: object) -> tuple[str, str]:
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("input", "output")):
        raise ExamplesError(f"{path}:{number}: each line needs string fields 'input' and 'output'")
    if not record["output"]:
        raise ExamplesError(f"{path}:{number}: 'output' is empty, so there is nothing to score")
    return record["input"], record["output"]


def _embedding_example(path: Path, number: int, record: object, negatives: int) -> tuple[str, str, list[str]]:
    def texts(key: str) -> list[str] | None:
        value = record.get(key) if isinstance(record, dict) else None
        return value if isinstance(value, list) and value and all(isinstance(t, str) for t in value) else None

    if not isinstance(record, dict) or not isinstance(record.get("query"), str) or texts("pos") is None or texts("neg") is None:
        raise ExamplesError(
            f"{path}:{number}: embedding examples need 'query' (a string), 'pos' and 'neg' (lists of strings)"
        )
    if len(record["neg"]) < negatives:
        raise ExamplesError(
            f"{path}:{number}: {len(record['neg'])} negatives, fewer than weights_from_examples.negatives ({negatives})"
        )
    return record["query"], record["pos"][0], record["neg"]


def embedding_batches(examples: list[tuple[str, str, list[str]]], spec: ExamplesWeights) -> list[tuple[list[str], list[str]]]:
    """(queries, passages) per batch: per query its positive then its seeded negatives. Drawn once, so
    every candidate model sees the same negatives."""
    rng = random.Random(spec.seed)
    batches = []
    for first in range(0, len(examples), spec.batch_size):
        queries, passages = [], []
        for query, positive, negatives in examples[first : first + spec.batch_size]:
            queries.append(query)
            passages += [positive, *rng.sample(negatives, spec.negatives)]
        batches.append((queries, passages))
    return batches
