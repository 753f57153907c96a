"""GPU memory of one training rank estimated without a GPU, from a fake-tensor trace of train_gpt.py's model.

    python3 tools/gpu_memory.py                          # the default (record) shape, every loop state
    python3 tools/gpu_memory.py MOE_MODE=soft --json mem.json
    python3 tools/gpu_memory.py --check-record           # compare with the 2026-04-14 record's logged peak

The model is built on a fake `cuda` device (torch._subclasses.FakeTensorMode: shapes and dtypes, no
data) with CUDA autocast (bf16) forced on, and one micro-batch (MICRO_BATCH_TOKENS) runs forward.
Every tensor autograd saves for backward is counted once per storage (parameters excluded), in the
dtype CUDA autocast gives it. Attention is a flash-like stand-in (it saves q, k, v, the output and
an fp32 log-sum-exp per row, as FlashAttention and cuDNN do), because the backend choice of
scaled_dot_product_attention cannot be simulated. The trace is EAGER: torch.compile (inductor)
recomputes cheap elementwise ops in backward and saves fewer tensors, so a compiled run needs less
(the record check below measures by how much).

peak = weights, gradients, optimizer state, EMA and DDP buckets (fp32) + saved activations + the
backward working set of the loss (fp32 gradients of the logits: two tokens x vocab buffers).

The same helpers (fake CUDA model, forced autocast, the attention stand-in) serve the fake-CUDA
test matrix in tests/test_fake_cuda.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

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
    it. Autocast's CUDA dtype rules live in the dispatcher and need no GPU, so with them patched a fake CUDA
    trace sees the dtypes a GPU run gets."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        yield


def fake_model(h, device: str) -> train_gpt.GPT:
    """train_gpt.GPT(h) with every parameter and buffer a fake tensor on `device`; call inside a
    FakeTensorMode. Built on the meta device first (no init work), then given fake storage: values are
    never read."""
    with torch.device("meta"):
        model = train_gpt.GPT(h)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                fake = torch.empty(p.shape, dtype=p.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(fake, p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    return model


class FlashLikeAttention(torch.autograd.Function):
    """Causal attention's output shape and dtype, saving what FlashAttention saves for its backward:
    q, k, v, the output and an fp32 log-sum-exp per (batch, head, position). For fake tensors only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return FlashLikeAttention.apply(q, k, v)


@contextlib.contextmanager
def flash_like_attention():
    with mock.patch.object(F, "scaled_dot_product_attention", flash_like_sdpa):
        yield


def micro_batch(h, device: str) -> torch.Tensor:
    return torch.zeros(
        (h.micro_batch_tokens // h.train_seq_len, h.train_seq_len), dtype=torch.long, device=device
    )


def saved_activations(h, looping: bool) -> dict:
    """One eager training forward of a micro-batch on fake CUDA under bf16 autocast -> bytes saved for
    backward (total, and by dtype), counted once per storage, parameters excluded."""
    saved: dict[int, tuple[int, str]] = {}
    with FakeTensorMode(), cuda_autocast_without_gpu(), flash_like_attention():
        model = fake_model(h, "cuda").train()
        model.set_looping(looping)
        params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = StorageWeakRef(t.untyped_storage()).cdata
            if key not in params:
                saved[key] = (t.untyped_storage().nbytes(), str(t.dtype).removeprefix("torch."))
            return t

        x = micro_batch(h, "cuda")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = model(x, x)
        assert loss.dtype == torch.float32
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return dict(saved_bytes=sum(by_dtype.values()), saved_by_dtype=by_dtype, tensors=len(saved))


def static_bytes(h, world_size: int) -> dict:
    """fp32 weights, gradients, optimizer state (Muon: momentum; Adam: two moments), the EMA copy and,
    with several ranks, DDP's gradient buckets."""
    with torch.device("meta"):
        model = train_gpt.GPT(h)
    n_params = sum(p.numel() for p in model.parameters())
    muon = sum(
        p.numel()
        for n, p in model.named_parameters()
        if train_gpt.param_class(n, p) in train_gpt.MATRIX_CLASSES
    )
    states = muon + 2 * (n_params - muon)
    ema = n_params if h.ema_decay != 0 else 0
    buckets = n_params if world_size > 1 else 0
    return dict(params=n_params, static_bytes=4 * (2 * n_params + states + ema + buckets))


def estimate(h, world_size: int = 8) -> dict:
    """Per loop state: saved activations and the peak estimate of one rank, in bytes and MiB."""
    static = static_bytes(h, world_size)
    loss_grads = 2 * 4 * h.micro_batch_tokens * h.vocab_size  # fp32 logits gradients at the start of backward
    phases = []
    for looping in sorted({False, h.num_loops > 0}):
        acts = saved_activations(h, looping)
        peak = static["static_bytes"] + acts["saved_bytes"] + loss_grads
        phases.append(
            dict(
                phase="loops_on" if looping else "loops_off",
                **acts,
                saved_mib=acts["saved_bytes"] / MIB,
                peak_bytes=peak,
                peak_mib=peak / MIB,
            )
        )
    return dict(
        micro_batch_tokens=h.micro_batch_tokens,
        moe_mode=h.moe_mode,
        moe_dispatch=h.moe_dispatch,
        world_size=world_size,
        **static,
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
            raise SystemExit(f"error: {item!r}: knob overrides are KEY=VALUE")
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
        f"moe_mode {h.moe_mode} micro_batch {h.micro_batch_tokens} tokens, {result['params']} params, "
        f"static {result['static_bytes'] / MIB:.0f} MiB, "
        f"loss gradients {result['loss_grad_bytes'] / MIB:.0f} MiB"
    )
    for p in result["phases"]:
        dtypes = ", ".join(f"{k} {v / MIB:.0f}" for k, v in sorted(p["saved_by_dtype"].items()))
        print(
            f"{p['phase']}: saved for backward {p['saved_mib']:.0f} MiB ({dtypes}; {p['tensors']} tensors), "
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
