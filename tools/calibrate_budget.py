"""Measure compressed bits per parameter in real artifacts, to recalibrate train_gpt.BITS_PER_PARAM.

    python3 tools/calibrate_budget.py logs/RUN_model.ptz [more.ptz ...] [--level 22]

For each bit width it concatenates the stored integers of every tensor of that width (as the
artifact lays them out), compresses them alone with zstd and reports bits per parameter; likewise
for the fp16 row scales. Compare with the constants in train_gpt.py and update them (with a comment
saying which runs they came from) when real runs disagree.
"""
import argparse
import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def measure(paths: list[str], level: int) -> dict[str, tuple[int, float]]:
    """-> {bit width or 'scales': (parameter count, compressed bits per parameter)}."""
    groups: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    for path in paths:
        header, data = train_gpt.unpack_artifact(path)
        for e in header["tensors"]:
            key, start = str(e["bits"]), e["offset"]
            groups.setdefault(key, []).append(bytes(data[start:start + e["sizes"][0]]))
            counts[key] = counts.get(key, 0) + e["sizes"][0] // (2 if e["bits"] == 16 else 1)
            if e["bits"] != 16:
                groups.setdefault("scales", []).append(bytes(data[start + e["sizes"][0]:start + sum(e["sizes"])]))
                counts["scales"] = counts.get("scales", 0) + e["sizes"][1] // 2
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
