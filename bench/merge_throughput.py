"""Throughput and peak memory of `calm merge` against this machine's disk limit. Prints JSON.

For each size (1x; 2x doubles the layers and the vocabulary) it:
1. writes K synthetic Llama-shaped bf16 checkpoints in shards (random finite values),
2. measures the disk limit with caches dropped: a sequential read of every input file, and a write of
   one output-sized file with fsync, each both through the page cache and direct (O_DIRECT, as calm
   merge does), before the first merge and after each; the fastest read plus the fastest write is
   the limit,
3. `--rounds` times: drops caches, loads torch once (its libraries are not the merge's I/O), and times
   `calm merge` (`--method`, default uniform linear; METHODS gives each method's inputs and parameters)
   as a subprocess, sampling the total RSS and the anonymous memory (RssAnon + RssShmem: its own
   buffers, private or shared, not file pages the kernel can drop) of the process and its children
   every 20 ms; the fastest merge counts, the largest memory. Its startup (the interpreter and the
   imports, timed apart) is part of `wall_over_disk_limit` and not of `streaming_over_disk_limit`,
4. when mergekit is installed (`--mergekit PATH` to its mergekit-yaml, else found on PATH; never a
   dependency of this project) and the method is linear, times it in the same rounds, interleaved with
   calm merge (caches dropped before each), and compares the medians,
5. linear: checks every output tensor is bit-identical to the exact result: the mean of the inputs
   rounded once to bf16 (ties to even). The inputs' exponents lie in [-7, 0], so their sum is exact in
   float64 and one float64 division by 3 lands on a rounding boundary only when the mean does. Every
   other method (its exactness is tested against mergekit's fixtures in tests/): every round's output
   is the same, bit for bit (the seeded methods included).
The machine is shared: the load average is recorded at the start and end of each size.

Quick run: python bench/merge_throughput.py --layers 4 --vocab 8000 --sizes 1 --method ties,slerp
Every method: python bench/merge_throughput.py --sizes 1 --method all
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent

# Each method as this bench runs it: how many inputs (the base, for a method that takes one, is the first),
# and the parameters its mergekit documentation's examples use. Weights, for a method that takes them, are
# equal; passthrough assembles the output's layers from the first half of in0's and the second of in1's.
METHODS: dict[str, dict] = {
    "linear": {},
    "task_arithmetic": {"base": True, "parameters": {"lambda": 1.0}},
    "ties": {"base": True, "parameters": {"density": 0.5}},
    "dare_linear": {"base": True, "parameters": {"density": 0.5}},
    "dare_ties": {"base": True, "parameters": {"density": 0.5}},
    "della": {"base": True, "parameters": {"density": 0.5, "epsilon": 0.15}},
    "della_linear": {"base": True, "parameters": {"density": 0.5, "epsilon": 0.15}},
    "breadcrumbs": {"base": True, "parameters": {"density": 0.9, "gamma": 0.01}},
    "breadcrumbs_ties": {"base": True, "parameters": {"density": 0.9, "gamma": 0.01}},
    "sce": {"base": True, "weights": False, "parameters": {"select_topk": 0.5}},
    "model_stock": {"base": True, "weights": False, "models": 4},
    "multislerp": {},
    "nuslerp": {"models": 2},
    "karcher": {"weights": False},
    "slerp": {"base": True, "weights": False, "models": 2, "parameters": {"t": 0.5}},
    "passthrough": {"weights": False, "models": 2, "slices": True},
}


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    kv = kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], config: dict, shard_bytes: int, seed: int) -> None:
    """Sharded bf16 safetensors with random values whose exponents lie in [-7, 0] (finite, and cheap to
    generate: one random pool per model, rotated per tensor), streamed tensor by tensor."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pool = (rng.integers(0, 1 << 16, size=1 << 25, dtype=np.uint16) & 0x83FF) | 0x3C00
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            end = offset + 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / filename, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in names:
                f.write(np.resize(np.roll(pool, int(rng.integers(len(pool)))), int(np.prod(shapes[name]))).tobytes())
        weight_map |= dict.fromkeys(names, filename)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def _read_all(inputs: list[Path], direct: bool) -> float:
    """Seconds to read every input file in order, 64 MB per request."""
    buffer = mmap.mmap(-1, 64 << 20)  # page-aligned, as direct reads need
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    start = time.perf_counter()
    for path in inputs:
        fd = os.open(path, flags)
        try:
            while os.readv(fd, [buffer]) == len(buffer):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - start


def _write_all(path: Path, nbytes: int, direct: bool) -> float:
    """Seconds to write nbytes (rounded up to 4 KB) and fsync them, 16 MB per request."""
    buffer = mmap.mmap(-1, 16 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
    start = time.perf_counter()
    try:
        left = -(-nbytes // 4096) * 4096
        while left > 0:
            left -= os.write(fd, memoryview(buffer)[: min(left, len(buffer))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def disk_limit(inputs: list[Path], out_bytes: int, scratch: Path) -> dict[str, float]:
    """Seconds to read every input file sequentially and to write out_bytes with fsync, each through
    the page cache and directly (O_DIRECT, where the filesystem allows it), caches dropped before each.
    The write first: read first, the bench's first measurement read the inputs it had just written in
    2.29-2.61 s buffered (three runs, 2026-12-07) against 9.6-11.7 s in every later one, from some
    cache below this machine's that the writes since had emptied; written first, 4.55 s, 3.09 s and
    2.02 s in three runs (later ones 7.7-11.8 s buffered, 2.9-5.2 s direct): run_size now makes one
    measurement it does not count before the first method's."""
    times = {}
    for direct in (False, True):
        mode = "direct" if direct else "buffered"
        try:
            drop_caches()
            times[f"write_{mode}"] = _write_all(scratch, out_bytes, direct)
            drop_caches()
            times[f"read_{mode}"] = _read_all(inputs, direct)
        except OSError:  # no O_DIRECT here
            continue
    return times


def _memory(proc: psutil.Process) -> tuple[int, int]:
    rss = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        # Shared anonymous maps (Python's plain mmap(-1); calm merge's buffers are private maps now) are RssShmem.
        anon += sum(int(fields.get(key, "0 kB").split()[0]) * 1024 for key in ("RssAnon", "RssShmem"))
    return rss, anon


def timed(cmd: list[str]) -> dict:
    """Wall time and peak memory of a command and its children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched = psutil.Process(proc.pid)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss, anon = _memory(watched)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{output}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak_rss, "peak_anon_bytes": peak_anon}


IMPORTS = [sys.executable, "-c", "import torch, merge.job, launcher.cli"]


def warm_libraries() -> None:
    """Load the interpreter's libraries once after caches were dropped, so a timed run reads only the
    checkpoints cold, not torch's 1 GB of shared objects."""
    subprocess.run(IMPORTS, cwd=ROOT, check=True)


def startup_s() -> float:
    """What every `calm merge` spends before its first read, whatever the checkpoints' size: the
    interpreter and its imports, libraries warm (the fastest of 3). On 3 x 1.1B inputs it is a large part
    of a merge that takes a few seconds, and none of one of 70B."""
    warm_libraries()
    return min(timed(IMPORTS)["wall_s"] for _ in range(3))


def timed_merge(config: Path) -> dict:
    warm_libraries()
    result = timed([sys.executable, "-m", "launcher.cli", "merge", str(config), "--no-progress"])
    return {"merge_wall_s": result["wall_s"], "peak_rss_bytes": result["peak_rss_bytes"], "peak_anon_bytes": result["peak_anon_bytes"]}


def timed_mergekit(mergekit: str, inputs: list[Path], work: Path) -> dict:
    """mergekit's linear merge of the same inputs: weights 1 each, normalized, fp32 arithmetic, bf16 out."""
    config = work / "mergekit.yaml"
    config.write_text(json.dumps({
        "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16", "parameters": {"normalize": True},
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs],
    }))
    out = work / "mergekit-out"
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    subprocess.run([mergekit, "--help"], capture_output=True, check=False)  # its libraries, as for calm merge
    result = timed([mergekit, str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer"])
    shutil.rmtree(out, ignore_errors=True)
    return result


def merge_config(method: str, inputs: list[Path], layers: int, out: Path, args: argparse.Namespace) -> dict:
    """calm merge's config for `method` over inputs, as METHODS says."""
    preset = METHODS[method]
    names = [p.name for p in inputs]
    config: dict = {"method": method, "models": [{"path": str(p), "name": p.name} for p in inputs],
                    "output": {"path": str(out), "max_shard_size": args.output_shard_size},
                    "workers": args.workers, "memory_budget": args.memory_budget}
    if preset.get("base"):
        config["base_model"] = names[0]
    merged = len(inputs) - (1 if preset.get("base") else 0)
    if preset.get("weights", True):
        config["weights"] = [1.0 / merged] * merged
    if preset.get("parameters"):
        config["parameters"] = preset["parameters"]
    if preset.get("slices"):
        half = layers // 2
        config["slices"] = [{"sources": [{"model": names[0], "layer_range": [0, half]}]},
                            {"sources": [{"model": names[1], "layer_range": [half, layers]}]}]
    return config


def output_digest(out: Path) -> str:
    """sha256 over the output's tensors, by name: equal outputs give equal digests."""
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in sorted(f.keys()):
                digest.update(name.encode())
                digest.update(f.get_tensor(name).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def round_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """float64 values (normal range) rounded to 8 significant bits, ties to even, on their bits."""
    bits = values.view(torch.int64)
    bits = bits + (1 << 44) - 1 + ((bits >> 45) & 1)
    return (bits >> 45 << 45).view(torch.float64).to(torch.bfloat16)


def check_exact(inputs: list[Path], out: Path) -> bool:
    """Every output tensor equals the inputs' mean rounded once to bf16 (see the module docstring)."""
    def tensors(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if not index.exists():
            with safe_open(folder / "model.safetensors", "pt") as f:
                return dict.fromkeys(f.keys(), folder / "model.safetensors")
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}

    sources = [tensors(folder) for folder in inputs]
    step = 1 << 24
    for name, path in tensors(out).items():
        with safe_open(path, "pt") as f:
            merged = f.get_slice(name)
            rows = merged.get_shape()[0]
            per_row = max(1, step // max(1, int(np.prod(merged.get_shape()[1:]))))
            for r in range(0, rows, per_row):
                total = None
                for src in sources:
                    with safe_open(src[name], "pt") as g:
                        term = g.get_slice(name)[r : r + per_row].double()
                    total = term if total is None else total.add_(term)
                if not torch.equal(round_to_bf16(total / len(sources)), merged[r : r + per_row]):
                    return False
    return True


def run_size(args: argparse.Namespace, scale: int, work: Path) -> list[dict]:
    """Every method of --method on one set of inputs (written once: as many as the methods need)."""
    layers = args.layers * scale
    shapes = llama_shapes(layers, args.hidden, args.intermediate, args.vocab * scale, args.kv_heads, args.hidden // args.heads)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab * scale, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    methods = args.method.split(",")
    if work.exists():
        shutil.rmtree(work)
    inputs = []
    for k in range(max(METHODS[m].get("models", args.models) for m in methods)):
        write_checkpoint(work / f"in{k}", shapes, config, int(args.input_shard_bytes), seed=k)
        inputs.append(work / f"in{k}")
    params = sum(int(np.prod(s)) for s in shapes.values())
    # One measurement thrown away: the first buffered read of inputs just written came from some cache
    # below this machine's even with a write between (2.02 s against 7.7-10.1 s in every later one,
    # 2026-12-07 10:50), which made the first method's limit the run's fastest by far.
    settling = disk_limit(sorted(p for folder in inputs for p in folder.glob("*.safetensors")), 2 * params, work / "scratch.bin")
    print(f"size {scale}x, settling disk measurement (not counted): {json.dumps(settling)}", file=sys.stderr, flush=True)
    results = []
    for method in methods:
        results.append(run_method(args, method, inputs[: METHODS[method].get("models", args.models)], layers, params, work))
        results[-1]["scale"] = scale
        print(f"size {scale}x, {method}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)  # if a later one fails
    if not args.keep:
        shutil.rmtree(work)
    return results


def run_method(args: argparse.Namespace, method: str, inputs: list[Path], layers: int, params: int, work: Path) -> dict:
    out = work / "out"
    cfg = work / "merge.yaml"
    cfg.write_text(json.dumps(merge_config(method, inputs, layers, out, args)))
    files = sorted(p for folder in inputs for p in folder.glob("*.safetensors"))
    mergekit = (args.mergekit or shutil.which("mergekit-yaml")) if method == "linear" else None
    # The disk is shared and noisy (the same read took 4.6 s and 14.8 s minutes apart): measure its
    # limit before and after each of `rounds` merges, and keep the fastest read and the fastest write
    # of any measurement, by either way of doing them, and the fastest merge. mergekit, when timed, runs
    # in the same rounds, right after calm merge: a slow stretch of the disk meets both.
    dropped = drop_caches()
    result = {"method": method, "models": len(inputs), "params_per_model": params,
              "input_bytes": sum(p.stat().st_size for p in files), "caches_dropped": dropped,
              "loadavg_start": Path("/proc/loadavg").read_text().strip()}
    runs = [disk_limit(files, 2 * params, work / "scratch.bin")]
    merges, digests, mergekits = [], [], []
    for _ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        merges.append(timed_merge(cfg))
        if method != "linear":
            digests.append(output_digest(out))
        if mergekit:
            mergekits.append(timed_mergekit(mergekit, inputs, work))
        runs.append(disk_limit(files, 2 * params, work / "scratch.bin"))
    result |= min(merges, key=lambda m: m["merge_wall_s"])
    result["merge_walls_s"] = [m["merge_wall_s"] for m in merges]
    result["peak_rss_bytes"] = max(m["peak_rss_bytes"] for m in merges)
    result["peak_anon_bytes"] = max(m["peak_anon_bytes"] for m in merges)
    read_s = min(t for run in runs for k, t in run.items() if k.startswith("read"))
    write_s = min(t for run in runs for k, t in run.items() if k.startswith("write"))
    result |= {"disk_read_s": round(read_s, 2), "disk_write_s": round(write_s, 2), "disk_limit_s": round(read_s + write_s, 2),
               "disk_runs_s": [{k: round(t, 2) for k, t in run.items()} for run in runs]}
    result["wall_over_disk_limit"] = round(result["merge_wall_s"] / result["disk_limit_s"], 2)
    result["startup_s"] = startup_s()
    result["streaming_over_disk_limit"] = round((result["merge_wall_s"] - result["startup_s"]) / result["disk_limit_s"], 2)
    result["peak_rss_gib"] = round(result["peak_rss_bytes"] / 2**30, 3)
    result["peak_anon_gib"] = round(result["peak_anon_bytes"] / 2**30, 3)
    if method == "linear" and not args.no_check:
        result["bit_identical"] = check_exact(inputs, out)
    if digests:
        result["rounds_bit_identical"] = len(set(digests)) == 1
    if mergekits:
        calm_median = statistics.median(result["merge_walls_s"])
        result |= {"merge_median_s": round(calm_median, 2),
                   "mergekit_walls_s": [m["wall_s"] for m in mergekits],
                   "mergekit_median_s": round(statistics.median(m["wall_s"] for m in mergekits), 2),
                   "mergekit_peak_anon_gib": round(max(m["peak_anon_bytes"] for m in mergekits) / 2**30, 3)}
        result["mergekit_over_calm_medians"] = round(result["mergekit_median_s"] / calm_median, 2)
    result["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3, help="inputs, for a method whose count METHODS leaves open")
    parser.add_argument("--method", default="linear", type=_methods,
                        help=f"comma-separated, on the same inputs, or 'all': {', '.join(METHODS)}")
    # TinyLlama-1.1B's shapes.
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--sizes", default="1,2", help="comma-separated scales; 2 doubles layers and vocabulary")
    parser.add_argument("--input-shard-bytes", type=float, default=1e9)
    parser.add_argument("--output-shard-size", default="1GB")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="merges per size (the fastest counts; with mergekit, medians), each between disk measurements")
    parser.add_argument("--memory-budget", default="2GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/calm-merge-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and output")
    parser.add_argument("--no-check", action="store_true", help="skip the bit-identity check")
    parser.add_argument("--mergekit", help="mergekit-yaml to time on the same inputs (default: on PATH, if any)")
    args = parser.parse_args()
    results = []
    for scale in args.sizes.split(","):
        results += run_size(args, int(scale), args.workdir / f"x{scale}")
    summary: dict = {"runs": results}
    linear = [r for r in results if r["method"] == "linear"]
    if len(linear) > 1:
        summary["anon_growth_vs_1x"] = round(linear[-1]["peak_anon_bytes"] / linear[0]["peak_anon_bytes"], 3)
    print(json.dumps(summary, indent=1))


def _methods(value: str) -> str:
    names = list(METHODS) if value == "all" else value.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return ",".join(names)


if __name__ == "__main__":
    main()
