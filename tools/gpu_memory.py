"""GPU memory of one training rank estimated without a GPU, from a fake-tensor trace of train_gpt.py's model.

    python3 tools/gpu_memory.py                          # the default (record) shape, every loop state
    python3 tools/gpu_memory.py MOE_MODE=soft --json mem.json
    python3 tools/gpu_memory.py --check-record           # compare with the 2026-04-14 record's logged peak

The model is built on a fake `cuda` device (torch._subclasses.FakeTensorMode: shapes and dtypes, no
data) with CUDA autocast (bf16) forced on, and one micro-batch (MICRO_BATCH_TOKENS) runs forward.
Every tensor autograd saves for backward is counted once per storage (parameters excluded), in the
dtype CUDA autocast gives it (train_gpt.saved_activations, which a COMPILE=0 run on a GPU also uses
to warn about a micro-batch that cannot fit). Attention is a flash-like stand-in (it saves q, k, v,
the output and an fp32 log-sum-exp per row, as FlashAttention and cuDNN do), because the backend
choice of scaled_dot_product_attention cannot be simulated. The trace is EAGER: torch.compile
(inductor) recomputes cheap elementwise ops in backward and saves fewer tensors, so a compiled run
needs less; --check-record measures by how much.

peak = weights, gradients, optimizer state, EMA and DDP buckets (fp32) + saved activations + the
backward working set of the loss (fp32 gradients of the logits: two tokens x vocab buffers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from unittest import mock


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402

MIB = 2**20
# The 2026-04-14 record: the default shape (11 x 512, loops 3-5 twice more from 35%), 98,304 tokens per
# rank, compiled, FlashAttention 3; its three seeds log the same peak.
RECORD_DIR = "2026-04-14_MultiPhaseGlobalSGD_PhasedTTT"
RECORD_PLACES = (REPO / "tests" / "fixtures" / "real_records", Path("/work/shared/data/real_records"))
PEAK_LINE = re.compile(r"peak memory allocated: (\d+) MiB")


@contextlib.contextmanager
def cuda_autocast_without_gpu():
    """torch.autocast("cuda") turns itself off when CUDA is unavailable; these two checks are all that stop
    it. Autocast's CUDA dtype rules live in the dispatcher and need no GPU, so with them patched a fake
    CUDA trace sees the dtypes a GPU run gets."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield


def estimate(h, world_size: int = 8) -> dict:
    """Per loop state: saved activations (by dtype) and the peak estimate of one rank, in bytes and MiB."""
    static = train_gpt.static_training_bytes(h, world_size)
    loss_grads = 8 * h.micro_batch_tokens * h.vocab_size
    phases = []
    for looping in sorted({False, h.num_loops > 0}):
        with cuda_autocast_without_gpu():
            by_dtype = train_gpt.saved_activations(h, "cuda", looping)
        saved = sum(by_dtype.values())
        phases.append(
            dict(
                phase="loops_on" if looping else "loops_off",
                saved_bytes=saved,
                saved_by_dtype=by_dtype,
                saved_mib=saved / MIB,
                peak_mib=(static + saved + loss_grads) / MIB,
            )
        )
    return dict(
        micro_batch_tokens=h.micro_batch_tokens,
        moe_mode=h.moe_mode,
        moe_dispatch=h.moe_dispatch,
        world_size=world_size,
        static_bytes=static,
        loss_grad_bytes=loss_grads,
        phases=phases,
        peak_mib=max(p["peak_mib"] for p in phases),
    )


def record_peak_mib() -> tuple[int, str]:
    """The 2026-04-14 record's logged `peak memory allocated` (MiB) and the log it came from."""
    for place in RECORD_PLACES:
        for log in sorted((place / RECORD_DIR).glob("train_seed*.log")):
            match = PEAK_LINE.search(log.read_text(errors="replace"))
            if match:
                return int(match.group(1)), str(log)
    raise FileNotFoundError(f"no {RECORD_DIR}/train_seed*.log with a peak memory line in {RECORD_PLACES}")


def config(knobs: list[str]):
    env = {}
    for item in knobs:
        if "=" not in item:
            raise train_gpt.ConfigError(f"{item!r}: knob overrides are KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return train_gpt.load_config(env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("knobs", nargs="*", metavar="KEY=VALUE", help="knob overrides, as in a run")
    parser.add_argument("--world-size", type=int, default=8, help="ranks of the run (DDP buckets when > 1)")
    parser.add_argument("--check-record", action="store_true", help="compare with the 2026-04-14 record")
    parser.add_argument("--json", help="also write the estimate here")
    args = parser.parse_args(argv)
    try:
        h = config(args.knobs)
    except train_gpt.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = estimate(h, args.world_size)
    print(
        f"moe_mode {h.moe_mode} micro_batch {h.micro_batch_tokens} tokens: static "
        f"{result['static_bytes'] / MIB:.0f} MiB, loss gradients {result['loss_grad_bytes'] / MIB:.0f} MiB"
    )
    for p in result["phases"]:
        dtypes = ", ".join(f"{k} {v / MIB:.0f}" for k, v in sorted(p["saved_by_dtype"].items()))
        print(
            f"{p['phase']}: saved for backward {p['saved_mib']:.0f} MiB ({dtypes}), "
            f"peak ~{p['peak_mib']:.0f} MiB per rank (eager)"
        )
    if args.check_record:
        logged, path = record_peak_mib()
        result["record"] = dict(log=path, peak_mib=logged, ratio=result["peak_mib"] / logged)
        print(
            f"record {RECORD_DIR} (compiled): peak memory allocated {logged} MiB; this eager estimate "
            f"{result['peak_mib']:.0f} MiB is {result['peak_mib'] / logged:.2f}x of it"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
