"""Measure compressed bits per parameter in real artifacts, to recalibrate train_gpt.BITS_PER_PARAM.

    python3 tools/calibrate_budget.py logs/RUN_model.ptz [more.ptz ...] [--level 22]

For each bit width it concatenates the stored integers of every tensor of that width (as the
artifact lays them out), compresses them alone with zstd and reports bits per parameter; likewise
for the fp16 row scales. Compare with the constants in train_gpt.py and update them (with a comment
saying which runs they came from) when real runs disagree.
"""
import argparse
import math
import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def stored_parts(path: str):
    """(bit width, parameter count, stored integers, fp16 row scales) per tensor of an artifact, read
    with the trainer's own reader (train_gpt.unpack_artifact checks the frame, magic, version and table)."""
    header, data = train_gpt.unpack_artifact(path)
    for e in header["tensors"]:
        # The table's sizes are [integer bytes, scale bytes] (fp16 tensors: [value bytes, 0]).
        stored = bytes(data[e["offset"]:e["offset"] + sum(e["sizes"])])
        numel = math.prod(header["shapes"][e["name"]])
        yield e["bits"], numel, stored[:e["sizes"][0]], stored[e["sizes"][0]:]


def measure(paths: list[str], level: int) -> dict[str, tuple[int, float]]:
    """-> {bit width or 'scales': (parameter count, compressed bits per parameter)}."""
    groups: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    for path in paths:
        for bits, numel, values, scales in stored_parts(path):
            groups.setdefault(str(bits), []).append(values)
            counts[str(bits)] = counts.get(str(bits), 0) + numel
            if scales:
                groups.setdefault("scales", []).append(scales)
                counts["scales"] = counts.get("scales", 0) + len(scales) // 2
    compressor = zstandard.ZstdCompressor(level=level)
    return {key: (counts[key], 8 * len(compressor.compress(b"".join(parts))) / max(counts[key], 1))
            for key, parts in sorted(groups.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--level", type=int, default=22)
    args = parser.parse_args()
    try:
        results = measure(args.artifacts, args.level)
    except train_gpt.ArtifactError as err:
        sys.exit(f"error: {err}")
    print(f"{'bits':>7} {'params':>12} {'measured bits/param':>20} {'in train_gpt':>13}")
    for key, (n, bpp) in results.items():
        current = train_gpt.SCALE_BITS if key == "scales" else train_gpt.BITS_PER_PARAM.get(int(key))
        print(f"{key:>7} {n:>12} {bpp:>20.3f} {current:>13}")


if __name__ == "__main__":
    main()
