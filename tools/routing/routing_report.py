"""Plots of an MoE run's routing: load per expert, gate entropy, expert x token-class specialisation,
and (with --log) load share and entropy over training.

    python3 -m tools.routing.routing_report logs/RUN_routing.json [--log logs/RUN.txt] [--out DIR]

The JSON is the one tools/routing/routing_analysis.py writes from the run's artifact; the run's routing
telemetry gives the training history (its `routing` events in RUN.jsonl when that file is beside
the log, else its `moe layer:` lines; tools/runlog.py reads either). Prints the paths of the PNG files
it writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tools import runlog  # noqa: E402


class ReportError(ValueError):
    """Unusable input; the message names the file."""


# ---------------------------------------------------------------------------- inputs


def load_routing(path: Path) -> dict:
    """The routing JSON, checked for the fields the plots use."""
    try:
        report = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise ReportError(f"{path}: malformed JSON ({err})") from None
    layers = report.get("layers") if isinstance(report, dict) else None
    if not layers:
        raise ReportError(
            f"{path}: no MoE layers in the routing statistics (expected a non-empty 'layers' list)"
        )
    for entry in layers:
        if not isinstance(entry, dict) or not isinstance(entry.get("load"), list) or "layer" not in entry:
            raise ReportError(f"{path}: a layer entry lacks 'layer' or a 'load' list: {str(entry)[:80]}")
    return report


def load_history(path: Path) -> dict[int, list[dict]]:
    """layer -> the `moe layer:` records of the log's last run, each with its step."""
    try:
        log = runlog.read(path)
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None
    for note in log.notes:
        print(f"note: {note}", file=sys.stderr)
    history = log.moe_history()
    if not history:
        raise ReportError(
            f"{path}: no 'moe layer:' lines (not an MoE run, or it stopped before its first log step)"
        )
    return history


# ---------------------------------------------------------------------------- plots


def annotated_heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], vmax: float) -> None:
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if values.size <= 200:  # numbers stay legible only on small grids
        for (r, c), v in np.ndenumerate(values):
            ax.text(
                c,
                r,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v > 0.6 * vmax else "white",
            )
    ax.figure.colorbar(image, ax=ax)


def layer_label(entry: dict) -> str:
    """Its label: "layer 3", or "layer 3 pass 1" for a layer with one router per pass of the loop."""
    return f"layer {entry['layer']}" + ("" if entry.get("pass") is None else f" pass {entry['pass']}")


def plot_load(report: dict, path: Path) -> None:
    layers = report["layers"]
    load = np.array([entry["load"] for entry in layers])
    E = load.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.7 * E), 1.8 + 0.45 * len(layers)))
    annotated_heatmap(
        ax,
        load,
        [f"{layer_label(e)} (dead {e.get('dead', '?')})" for e in layers],
        [f"expert {e}" for e in range(E)],
        vmax=max(float(load.max()), 2.0 / E),
    )
    ax.set_title(f"{report.get('run_id', '')} load share per expert (uniform = {1 / E:.2f})", fontsize=10)
    save(fig, path)


def plot_entropy(report: dict, path: Path) -> None:
    layers = report["layers"]
    names = [str(e["layer"]) for e in layers]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(layers) + 2), 3.5))
    ax.bar(names, [e.get("entropy", math.nan) for e in layers], color="tab:blue", label="gate entropy / ln E")
    agreement = [e.get("quant_top1_agreement") for e in layers]
    if any(a is not None for a in agreement):
        ax.plot(
            names,
            [math.nan if a is None else a for a in agreement],
            "o-",
            color="tab:red",
            label="top-1 agreement, float vs quantized",
        )
    ax.set(xlabel="MoE layer", ylim=(0, 1.4), title=f"{report.get('run_id', '')} routing entropy")
    ax.legend(loc="upper left", fontsize=7)  # above the bars, which stop at 1
    save(fig, path)


def representative_layers(layers: list[dict]) -> list[dict]:
    """An early, a middle and a late MoE layer (fewer when there are fewer layers)."""
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    return [layers[i] for i in picks]


def plot_class_load(report: dict, path: Path) -> bool:
    """Expert x token-class share heatmaps; False (no file) when the JSON has no class statistics."""
    chosen = [e for e in representative_layers(report["layers"]) if e.get("class_load")]
    if not chosen:
        return False
    counts = report.get("classes", {})
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 4.0), squeeze=False)
    for ax, entry in zip(axes[0], chosen):
        classes = list(entry["class_load"])
        share = np.array([entry["class_load"][c] for c in classes]).T  # experts x classes
        annotated_heatmap(
            ax,
            share,
            [f"expert {e}" for e in range(share.shape[0])],
            [f"{c} ({counts.get(c, '?')})" for c in classes],
            vmax=1.0,
        )
        ax.set_title(f"layer {entry['layer']}: share of each class's tokens", fontsize=9)
    fig.suptitle(f"{report.get('run_id', '')} expert x token class")
    save(fig, path)
    return True


def layer_order(item: tuple) -> tuple[int, str]:
    """Sorts history keys: layers by number, a per-pass layer's series ("1 pass 2") by pass."""
    return int(str(item[0]).split()[0]), str(item[0])


def plot_training_load(history: dict[int, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(len(history), 1, figsize=(7, 2.2 * len(history)), squeeze=False, sharex=True)
    for ax, (layer, records) in zip(axes[:, 0], sorted(history.items(), key=layer_order)):
        steps = [r["step"] for r in records]
        for e, series in enumerate(np.array([r["load"] for r in records]).T):
            ax.plot(steps, series, label=f"expert {e}")
        ax.set(ylabel=f"layer {layer} load", ylim=(0, 1))
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("load share per expert over training")
    save(fig, path)


def plot_training_entropy(history: dict[int, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for layer, records in sorted(history.items(), key=layer_order):
        ax.plot([r["step"] for r in records], [r["entropy"] for r in records], label=f"layer {layer}")
    ax.set(xlabel="step", ylabel="gate entropy / ln E", ylim=(0, 1.05), title="routing entropy over training")
    ax.legend(fontsize=7)
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry point


def write_report(routing_json: Path, log: Path | None = None, out: Path | None = None) -> list[Path]:
    """Writes the PNG files and returns their paths. Inputs are all read before anything is written."""
    report = load_routing(routing_json)
    history = load_history(log) if log is not None else None
    out = out or routing_json.with_name(routing_json.stem + "_plots")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "load.png", out / "entropy.png"]
    plot_load(report, written[0])
    plot_entropy(report, written[1])
    if plot_class_load(report, out / "class_load.png"):
        written.append(out / "class_load.png")
    if history is not None:
        written += [out / "training_load.png", out / "training_entropy.png"]
        plot_training_load(history, written[-2])
        plot_training_entropy(history, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "routing_json",
        type=Path,
        help="logs/<RUN_ID>_routing.json written by tools/routing/routing_analysis.py",
    )
    parser.add_argument("--log", type=Path, help="logs/<RUN_ID>.txt: adds load and entropy over training")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: <json stem>_plots next to the JSON)"
    )
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.routing_json, args.log, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
