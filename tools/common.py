"""Rules every tool shares, in one place: table layout, file hashes and the
MoE configurations that the study and the benchmark compare. (The score rule and the pre-quant
fallback live with the log reader, in tools/runlog.py.) Light: no torch import."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_trainer():
    """train_gpt.py as a module: the one way tools reach the trainer (it imports torch, so only on call).
    Loaded by file path under the name `train_gpt`, so it is the same module an `import train_gpt` gives."""
    if "train_gpt" in sys.modules:
        return sys.modules["train_gpt"]
    spec = importlib.util.spec_from_file_location("train_gpt", REPO / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module  # before running it: its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["train_gpt"]
        raise
    return module


# The MoE modes compared against the parameter-matched dense MLP (train_gpt.py sizes each expert
# hidden/E; shared_routed keeps a shared half plus E experts of the rest). The study trains each;
# the benchmark times each (adding its own dispatch variants).
BALANCING_OFF = {"MOE_AUX_LOSS_COEF": "0", "ROUTER_Z_COEF": "0", "ROUTER_BIAS_RATE": "0", "ROUTER_NOISE": "0"}
MOE_PRESETS: dict[str, dict[str, str]] = {
    "dense": {"MOE_MODE": "none"},
    "soft2": {"MOE_MODE": "soft", "NUM_EXPERTS": "2"},
    "soft4": {"MOE_MODE": "soft", "NUM_EXPERTS": "4"},
    "topk4": {"MOE_MODE": "topk", "NUM_EXPERTS": "4", "TOP_K": "1"},
    "shared_routed": {"MOE_MODE": "shared_routed", "NUM_EXPERTS": "4", "TOP_K": "1"},
    "topk4_nobalance": {"MOE_MODE": "topk", "NUM_EXPERTS": "4", "TOP_K": "1", **BALANCING_OFF},
    # The context arm: top-1 of 4 experts each as wide as the whole dense MLP, so the dense model's active
    # FLOPs per token with 4x its MLP bytes (the classic MoE claim, which the byte cap forbids). 2048 is
    # the dense hidden of the default stack (MODEL_DIM 512 x MLP_MULT 4); other shapes: context_arm().
    "topk4_4xbytes": {"MOE_MODE": "topk", "NUM_EXPERTS": "4", "TOP_K": "1", "EXPERT_HIDDEN": "2048"},
}
# sigma-MoE (Csordas, Irie and Schmidhuber 2023): 16 experts of 128 at the default width (MLP 2048), top-4
# sigmoid scores, no balancing bias, aux or z-loss; instead the entropy of the batch-mean selection softmax
# (maximised) and expert dropout. Parameter-matched; docs/moe.md says what of the paper it matches. Kept
# out of MOE_PRESETS so the earlier studies' arms stay as they were planned.
SIGMA_MOE: dict[str, str] = {
    "MOE_MODE": "topk",
    "NUM_EXPERTS": "16",
    "TOP_K": "4",
    "ROUTER_SCORE": "sigmoid",
    **BALANCING_OFF,
    "ROUTER_ENTROPY_COEF": "0.001",
    "EXPERT_DROPOUT": "0.05",
}
# Arms that do not hold the dense model's bytes: shown for context, never candidates for the default.
NOT_BYTE_MATCHED = ("topk4_4xbytes",)


def context_arm(model_dim: int, mlp_mult: float) -> dict[str, str]:
    """The 4x-bytes context arm at another shape: each expert as wide as that shape's dense MLP."""
    return {**MOE_PRESETS["topk4_4xbytes"], "EXPERT_HIDDEN": str(int(mlp_mult * model_dim))}


class StudyError(ValueError):
    """Bad input or a refusal of a study tool; the message names the option, file or knob."""


def cell(value, digits: int = 4) -> str:
    """One table cell: '-' for a missing value, floats to `digits` places."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns separated by two spaces, header first."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
