"""The text encoder against the machine's own matrix-multiply rate (issue 27), in one run:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/encoder_benchmark.py --data ../shared/data/anime_catalog.csv

1. The machine: CPU model, torch version and threads; the fp32 and bf16 rates of a 2048² matmul and
   of the encoder's own layer shapes (16 texts × 137 tokens through 384→1536, 1536→384, 384→384).
2. The encoder (FrozenTextEncoder, no cache) on --texts synopses of titles from --since on (the time
   split's validation rows), after a warm-up pass over the same texts, fp32 and bf16 alternated in
   --rounds rounds (the best round counts): texts/s, GFLOP/s and that as a share of the same
   precision's 2048² matmul rate. FLOPs come from the real (unpadded) token counts: per token and
   layer 2·(4h² + 2h·i) for the projections and the feed-forward, plus 4·L·h for attention
   (h = hidden size, i = intermediate size, L = the text's tokens).
3. A profile split (torch.profiler, self CPU time of one pass): matrix multiplies, attention,
   everything else (layer norms, GELU, adds, casts, copies, Python).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections import defaultdict

import numpy as np
import polars as pl
import torch

from anime_udf.catalog import read_catalog
from anime_udf.features import clean_text
from anime_udf.text import FrozenTextEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn", "onednn")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::_efficient_attention", "aten::softmax")


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {' '.join(isa) or 'no AVX-512'}"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, linear: bool, repeats: int = 7) -> float:
    """GFLOP/s of an [m, k] × [k, n] matrix multiply (``linear``: as ``nn.Linear`` runs it, a weight
    [n, k] and a bias), the best of ``repeats`` (after one warm-up)."""
    x = torch.randn(m, k, dtype=dtype)
    if linear:
        weight, bias = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
        op = lambda: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
    else:
        y = torch.randn(k, n, dtype=dtype)
        op = lambda: x @ y  # noqa: E731
    calls = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP per timing, so that small shapes time well

    def run():
        for _ in range(calls):
            op()

    run()
    return 2 * m * k * n * calls / min(seconds(run) for _ in range(repeats)) / 1e9


def synopses(path: str, since: int, count: int) -> list[str]:
    rows = read_catalog(path).filter(pl.col("year") >= since)
    texts = [clean_text(t) for t in rows["synopsis"].to_list()]
    return [t for t in texts if t][:count]


def encoder_gflop(encoder: FrozenTextEncoder, texts: list[str]) -> float:
    """FLOPs of encoding ``texts`` from their real token counts (see the module docstring)."""
    encoder._load()
    config = encoder._model.config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = np.array([len(x) for x in encoder._tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]])
    per_layer = tokens * 2 * (4 * h * h + 2 * h * i) + tokens * 4 * tokens * h
    return float(layers * per_layer.sum() / 1e9)


def profile_split(encoder: FrozenTextEncoder, texts: list[str]) -> dict[str, float]:
    """Share of self CPU time in matrix multiplies, attention and the rest, over one pass."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder.embed(texts)
    split = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        kind = ("matmul" if any(op in name for op in MATMUL_OPS)
                else "attention" if any(op in name for op in ATTENTION_OPS) else "other")
        split[kind] += event.self_cpu_time_total
    total = sum(split.values())
    return {kind: split[kind] / total for kind in ("matmul", "attention", "other")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/anime_catalog.csv")
    parser.add_argument("--since", type=int, default=2017, help="titles from this year on")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-texts", type=int, default=100)
    args = parser.parse_args()

    print(f"CPU: {cpu_model()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})")
    texts = synopses(args.data, args.since, args.texts)
    encoders = {p: FrozenTextEncoder(cache=None, device="cpu", precision=p) for p in DTYPES}
    gflop = encoder_gflop(encoders["fp32"], texts)
    print(f"encoder batches: {encoders['fp32'].batch_size} texts")
    print(f"{len(texts)} synopses from {args.since} on: {gflop / len(texts):.2f} GFLOP per text")

    print("\nmatmul GFLOP/s (best of 7)             fp32     bf16")
    tokens = 16 * 137
    shapes = {"2048² × 2048²": (2048, 2048, 2048, False),
              f"[{tokens}, 384] × [384, 1536]": (tokens, 384, 1536, False),
              f"Linear 384 → 1536 on {tokens} tokens": (tokens, 384, 1536, True),
              f"Linear 1536 → 384 on {tokens} tokens": (tokens, 1536, 384, True),
              f"Linear 384 → 384 on {tokens} tokens": (tokens, 384, 384, True)}
    peak = {}
    for label, shape in shapes.items():
        rates = {p: matmul_rate(*shape[:3], dtype, linear=shape[3]) for p, dtype in DTYPES.items()}
        peak.setdefault("fp32", rates["fp32"]), peak.setdefault("bf16", rates["bf16"])
        print(f"  {label:<36} {rates['fp32']:7.0f}  {rates['bf16']:7.0f}")

    first = {p: seconds(lambda e=e: e.embed(texts)) for p, e in encoders.items()}  # loads; warm-up
    print("\nfirst pass (loading the model and any compiling): "
          + ", ".join(f"{p} {s:.1f} s" for p, s in first.items()))
    best = {p: float("inf") for p in DTYPES}
    for _ in range(args.rounds):
        for p, e in encoders.items():
            best[p] = min(best[p], seconds(lambda e=e: e.embed(texts)))
    print(f"\nencoder, best of {args.rounds} rounds   texts/s   GFLOP/s   share of the 2048² matmul rate")
    for p in DTYPES:
        rate = gflop / best[p]
        print(f"  {p:<30} {len(texts) / best[p]:7.1f}   {rate:7.0f}   {rate / peak[p]:6.1%}")

    print(f"\nprofile split over {args.profile_texts} texts (self CPU time)   matmul  attention  other")
    for p, e in encoders.items():
        split = profile_split(e, texts[: args.profile_texts])
        print(f"  {p:<45} {split['matmul']:6.1%}  {split['attention']:8.1%}  {split['other']:6.1%}")


if __name__ == "__main__":
    main()
