"""Measure compressed bits per parameter in real artifacts, to check train_gpt.py's budget preview.

    python3 -m tools.gpu.calibrate_budget logs/RUN_model.ptz [more.ptz ...] [--compressor brotli] [--level 22]

For each bit width it concatenates the stored integers of every tensor of that width, compresses
them alone and reports bits per parameter; likewise for the fp16 row scales and fp16 tensors. The
preview measures each grid on a seeded Gaussian matrix at start-up (train_gpt.grid_bits_per_param)
and uses the constants SCALE_BITS and FP16_BITS for scales and fp16 tensors: compare with these.
"""

import argparse
import sys

from tools.common import import_trainer

train_gpt = import_trainer()


def measure(paths: list[str], compressor: str, level: int) -> dict[str, tuple[int, float]]:
    """-> {bit width, 'scales' or '16': (parameter count, compressed bits per parameter)}."""
    groups: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    for path in paths:
        _, entries = train_gpt.unpack_artifact(path)
        for bits, tensors in entries.values():
            parts = [(str(bits), tensors[0])] + ([("scales", tensors[1])] if bits != 16 else [])
            for key, t in parts:
                groups.setdefault(key, []).append(t.numpy().tobytes())
                counts[key] = counts.get(key, 0) + t.numel()
    compress = train_gpt.COMPRESSORS[compressor][1]
    return {
        key: (counts[key], 8 * len(compress(b"".join(parts), level)) / max(counts[key], 1))
        for key, parts in sorted(groups.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--compressor", default="brotli", choices=list(train_gpt.COMPRESSORS))
    parser.add_argument("--level", type=int, default=22, help="zstd level")
    args = parser.parse_args()
    try:
        results = measure(args.artifacts, args.compressor, args.level)
    except train_gpt.ArtifactError as err:
        sys.exit(f"error: {err}")
    print(f"{'bits':>7} {'params':>12} {'measured bits/param':>20} {'preview constant':>17}")
    for key, (n, bpp) in results.items():
        current = {"scales": train_gpt.SCALE_BITS, "16": train_gpt.FP16_BITS}.get(key, "per grid")
        print(f"{key:>7} {n:>12} {bpp:>20.3f} {current:>17}")


if __name__ == "__main__":
    main()
