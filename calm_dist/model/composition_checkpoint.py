"""Composition checkpoints: only the trained connection weights plus a JSON that names the base models.

A checkpoint is a folder with `composition.safetensors` and `composition.json`. It never contains the
frozen models; loading it onto the same base models gives back the composed model exactly. A
composition across tokenizers also records each model's tokenizer identity (name, size, hash of its
definition): the trained connections mean nothing with another tokenizer, so loading refuses one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from calm_dist.errors import CompositionError
from calm_dist.model.alignment import Aligner, tokenizer_identity
from calm_dist.model.architectures import ModelDims, model_dims
from calm_dist.model.composed import ComposedModel
from calm_dist.model.connections import Connection
from calm_dist.model.options import CompositionOptions

WEIGHTS = "composition.safetensors"
MANIFEST = "composition.json"
FORMAT_VERSION = 1


def _source(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or ""


def save_composition(
    model: ComposedModel,
    path: str | os.PathLike,
    extra: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
    augmenting_sources: list[str] | None = None,
) -> Path:
    """Write the checkpoint folder atomically: a crash never leaves a folder that looks complete.

    state: the composition tensors, when they are not in the model itself (gathered from ZeRO shards).
    augmenting_sources: the augmenting models' folders, when the model holds only their dimensions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": "calm-dist composition",
        "format_version": FORMAT_VERSION,
        "anchor": {"source": _source(model.anchor), **model.anchor_dims.to_json()},
        "augmenting": [
            {"source": _source(model.augmenting[k]) if model.augmenting else (augmenting_sources or [""] * (k + 1))[k],
             **d.to_json()}
            for k, d in enumerate(model.augmenting_dims)
        ],
        "connections": [
            {"augmenting": c.augmenting, "aug_layer": c.aug_layer, "anchor_layer": c.anchor_layer}
            for c in model.connections
        ],
        **model.options.to_manifest(),
        **({"tokenizers": model.aligner.identities()} if model.aligner is not None else {}),
        **(extra or {}),
    }
    check_replaceable(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.contiguous() for k, v in (state or model.composition_state_dict()).items()}
        save_file(tensors, staging / WEIGHTS, metadata={"format": "pt"})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def check_replaceable(path: str | os.PathLike) -> None:
    """CompositionError unless saving a composition to `path` replaces nothing but a composition: the
    folder is absent, empty, or holds exactly a composition checkpoint's files."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CompositionError(f"{path}: exists and is not a folder; a composition checkpoint is a folder, so "
                               "choose another path")
    entries = {entry.name for entry in path.iterdir()}
    if not entries:
        return
    if MANIFEST not in entries:
        raise CompositionError(f"{path}: not empty and not a composition checkpoint (no {MANIFEST}); refusing to "
                               "replace it: choose another path")
    read_manifest(path)
    others = sorted(entries - {MANIFEST, WEIGHTS})
    if others:
        raise CompositionError(f"{path}: a composition checkpoint that also holds other files ({', '.join(others[:3])}"
                               f"{', ...' if len(others) > 3 else ''}); refusing to replace it: move them or choose "
                               "another path")


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the finished folder to `path`. An existing composition there is swapped out in one atomic
    step where the filesystem can (Linux renameat2 RENAME_EXCHANGE), so `path` always holds a complete
    checkpoint; elsewhere it is renamed aside first and removed only once the new one is in place."""
    if not path.exists():
        os.replace(staging, path)
        return
    if _exchange(staging, path):
        shutil.rmtree(staging)  # now the old composition
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, aside / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(aside / path.name, path)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def read_manifest(path: str | os.PathLike) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CompositionError(f"{file}: not found; is {path} a composition checkpoint?") from None
    except json.JSONDecodeError as err:
        raise CompositionError(f"{file}: not valid JSON ({err})") from None
    if manifest.get("format") != "calm-dist composition":
        raise CompositionError(f"{file}: not a calm-dist composition manifest")
    return manifest


def check_weights_readable(path: str | os.PathLike) -> None:
    """CompositionError naming the composition's weights file unless its safetensors header and size can
    be read: the driver's check, which reads no tensor, before workers that would meet it after loading
    the base models."""
    file = Path(path) / WEIGHTS
    with _reading_weights(file), safe_open(file, "pt") as weights:
        weights.keys()


@contextmanager
def _reading_weights(file: Path) -> Iterator[None]:
    """A weights file that is missing or that safetensors cannot read, as one CompositionError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise CompositionError(f"{file}: not found") from None
    except Exception as err:  # safetensors raises its own error type for corrupt headers
        raise CompositionError(f"{file}: unreadable ({err})") from None


def _check_dims(expected: dict, model: nn.Module | ModelDims, role: str, file: Path) -> None:
    actual = (model if isinstance(model, ModelDims) else model_dims(model)).to_json()
    for key, value in actual.items():
        if expected.get(key) != value:
            raise CompositionError(
                f"{file}: {role} {key} is {expected.get(key)!r} in the checkpoint but the given {role} "
                f"has {value!r}: this composition was trained on different base models"
            )


def check_tokenizers(manifest: dict, tokenizers: list | None, count: int, file: Path) -> Aligner | None:
    """The aligner for the given tokenizers, if they are those the composition was trained with."""
    recorded = manifest.get("tokenizers")
    aligner = None
    if tokenizers is not None:
        if len(tokenizers) != count + 1 or tokenizers[0] is None:
            raise CompositionError(f"tokenizers: give the anchor's and one per augmenting model ({count + 1} in "
                                   f"all, None for one that shares the anchor's), got {len(tokenizers)}")
        aligner = Aligner(tokenizers[0], tokenizers[1:])
        aligner = aligner if aligner.cross else None
    if recorded is None:
        if aligner is not None:
            raise CompositionError(
                f"{file}: this composition was trained with every augmenting model reading the anchor's tokens, "
                f"but augmenting model {aligner.cross[0]} was given a tokenizer of its own"
            )
        return None
    if tokenizers is None:
        raise CompositionError(
            f"{file}: this composition was trained across tokenizers ({_describe(recorded)}): pass "
            "tokenizers=[the anchor's, each augmenting model's] to load it"
        )
    # Tokenizers given, but each the anchor's: every augmenting model would read the anchor's tokens.
    given = aligner.identities() if aligner is not None else {"anchor": tokenizer_identity(tokenizers[0]),
                                                               "augmenting": [None] * count}
    roles = [("anchor", recorded["anchor"], given["anchor"])] + [
        (f"augmenting model {k}", r, g) for k, (r, g) in enumerate(zip(recorded["augmenting"], given["augmenting"], strict=True))
    ]
    for role, want, got in roles:
        if (want is None) != (got is None) or (want is not None and want["sha256"] != got["sha256"]):
            raise CompositionError(
                f"{file}: {role} was trained with the tokenizer {_name(want)} but is given {_name(got)}: "
                "a composition trained with one tokenizer cannot be used with another"
            )
    return aligner


def _name(identity: dict | None) -> str:
    if identity is None:
        return "of the anchor (shared)"
    return f"{identity['name'] or 'unnamed'!r} ({identity['vocab_size']} tokens, sha256 {identity['sha256'][:12]})"


def _describe(recorded: dict) -> str:
    return ", ".join(f"augmenting model {k}: {_name(r)}" for k, r in enumerate(recorded["augmenting"]) if r is not None)


def load_composition(
    path: str | os.PathLike,
    anchor: nn.Module,
    augmenting: nn.Module | list[nn.Module] | list[ModelDims],
    tokenizers: list | None = None,
) -> ComposedModel:
    """Rebuild the composed model from a checkpoint and the (same) base models.

    augmenting: the models, or only their dimensions when their states are computed elsewhere (as on
    ZeRO-3 workers, where the augmenting models run beside the partitioned anchor).
    tokenizers: [the anchor's, each augmenting model's (None: shares the anchor's)], required for a
    composition trained across tokenizers and checked against the identities it recorded.
    """
    path = Path(path)
    manifest = read_manifest(path)
    augmenting = [augmenting] if isinstance(augmenting, nn.Module) else list(augmenting)
    file = path / MANIFEST
    if len(manifest["augmenting"]) != len(augmenting):
        raise CompositionError(
            f"{file}: the checkpoint composes {len(manifest['augmenting'])} augmenting model(s) "
            f"but {len(augmenting)} were given"
        )
    _check_dims(manifest["anchor"], anchor, "anchor", file)
    for k, model in enumerate(augmenting):
        _check_dims(manifest["augmenting"][k], model, f"augmenting model {k}", file)
    aligner = check_tokenizers(manifest, tokenizers, len(augmenting), file)
    composed = ComposedModel(
        anchor,
        augmenting,
        [Connection(**c) for c in manifest["connections"]],
        CompositionOptions.from_manifest(manifest),
        aligner=aligner,
    )
    with _reading_weights(path / WEIGHTS):
        state = load_file(path / WEIGHTS)
    try:
        missing, unexpected = composed.composition.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CompositionError(f"{path / WEIGHTS}: does not fit the connections in {MANIFEST}: {err}") from None
    if missing or unexpected:
        raise CompositionError(
            f"{path / WEIGHTS}: tensors do not match the connections in {MANIFEST} "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return composed
