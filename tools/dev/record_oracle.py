"""A record's train_gpt.py, imported unmodified on a CPU: PyTorch stand-ins for its GPU-only pieces
(FlashAttention 3's `flash_attn_interface`, the Triton kernels of the softcapped cross-entropy and the
fused LeakyReLU(0.5)^2 MLP, the compiled Polar-Express iteration), and the run configuration its log
prints. tools/dev/record_fidelity.py compares our trainer against the record with these."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tools.common import REPO

RECORDS = REPO / "tests" / "fixtures" / "real_records"
RECORD_1061 = RECORDS / "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"
RECORD_10614 = RECORDS / "2026-04-29_SmearGateBOSFix_3Seed_1.06141"


# ---- FlashAttention 3 on SDPA: (batch, time, heads, head_dim) layout, causal, grouped-query ----------
def _check_window(window_size) -> None:
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"the SDPA stand-in has no sliding window (window_size={window_size})")


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """q (B, T, H, D); k, v (B, T, H_kv, D) -> (B, T, H, D), as flash_attn_interface.flash_attn_func."""
    _check_window(window_size)
    # (B, T, H, D) -> (B, H, T, D) for SDPA and back
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
):
    """q (total, H, D); k, v (total, H_kv, D); segment i is rows cu_seqlens[i]:cu_seqlens[i+1] and attends
    only to itself. Repeated trailing offsets (the record pads cu_seqlens to a bucket) are empty segments."""
    _check_window(window_size)
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the SDPA stand-in needs the same segments for queries and keys")
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        if end - start > max_seqlen_q:
            raise ValueError(f"segment {start}:{end} is longer than max_seqlen {max_seqlen_q}")
        seg = flash_attn_func(
            q[None, start:end], k[None, start:end], v[None, start:end], softmax_scale, causal
        )
        out[start:end] = seg[0]
    return out


def flash_attn_module() -> types.ModuleType:
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


# ---- The softcapped cross-entropy kernels' math, row by row in fp32 --------------------------------
# The kernels softcap with z = 2c * sigmoid(2x / c) = c * tanh(x / c) + c: the constant c cancels in the
# loss, so the loss is the cross-entropy of the softcapped logits.
def softcapped_ce_rows(logits: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """(losses, lse) per row, as _softcapped_ce_fwd_kernel stores them."""
    z = 2.0 * softcap * torch.sigmoid(logits.float() * (2.0 / softcap))
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(1, targets[:, None]).squeeze(1), lse


def softcapped_ce_grad_rows(
    logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor, softcap: float
) -> Tensor:
    """d loss / d logits, as _softcapped_ce_bwd_kernel writes it (in the logits' dtype)."""
    s = torch.sigmoid(logits.float() * (2.0 / softcap))
    probs = torch.exp(2.0 * softcap * s - lse[:, None])
    onehot = F.one_hot(targets, logits.size(1)).float()
    grad_z = grad_losses.float()[:, None] * (probs - onehot)
    return (grad_z * (4.0 * s * (1.0 - s))).to(logits.dtype)


class SoftcappedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, softcap):
        losses, lse = softcapped_ce_rows(logits, targets, softcap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.softcap = softcap
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, targets, lse = ctx.saved_tensors
        return softcapped_ce_grad_rows(logits, targets, lse, grad_losses, ctx.softcap), None, None


def softcapped_cross_entropy(logits: Tensor, targets: Tensor, softcap: float, reduction: str = "mean"):
    losses = SoftcappedCE.apply(logits.contiguous(), targets.long(), float(softcap))
    reducers = {"none": lambda t: t, "sum": torch.sum, "mean": torch.mean}
    if reduction not in reducers:
        raise ValueError(f"Unsupported reduction={reduction!r}")
    return reducers[reduction](losses)


# ---- The fused LeakyReLU(0.5)^2 matmul kernel: fp32 accumulation, outputs in the input dtype --------
def linear_leaky_relu_square(a: Tensor, b: Tensor, aux: Tensor | None = None):
    """Forward (aux None): c = a b^T and post = leaky_relu(c, 0.5)^2. Backward (aux = the forward's c):
    c = a b^T times the activation's derivative at aux (2 x above zero, 0.5 x below)."""
    c = (a.float() @ b.float().T).to(a.dtype)
    if aux is None:
        return c, torch.where(c > 0, c, 0.5 * c).square()
    return c * torch.where(aux > 0, 2.0 * aux, 0.5 * aux)


# ---- Triton, only where it is not installed: enough to define (never launch) the record's kernels --
class _Anything(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object()


def _triton_placeholders() -> dict[str, types.ModuleType]:
    triton = _Anything("triton")
    triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: (a + b - 1) // b
    language = _Anything("triton.language")
    triton.language = language
    tools = _Anything("triton.tools")
    descriptor = _Anything("triton.tools.tensor_descriptor")
    return {
        "triton": triton,
        "triton.language": language,
        "triton.tools": tools,
        "triton.tools.tensor_descriptor": descriptor,
    }


def _install_standins() -> None:
    sys.modules.setdefault("flash_attn_interface", flash_attn_module())
    try:
        import triton.language  # noqa: F401
        import triton.tools.tensor_descriptor  # noqa: F401
    except ImportError:
        for name, module in _triton_placeholders().items():
            sys.modules.setdefault(name, module)


_LOADED: dict[Path, types.ModuleType] = {}


def load_record(folder: Path) -> types.ModuleType:
    """The folder's train_gpt.py as a module, its file unmodified; its GPU-only functions are swapped for
    the stand-ins above once imported, and its compiled Polar-Express function for the function itself."""
    folder = Path(folder)
    if folder in _LOADED:
        return _LOADED[folder]
    _install_standins()
    name = "record_" + "".join(ch if ch.isalnum() else "_" for ch in folder.name)
    spec = importlib.util.spec_from_file_location(name, folder / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    replacements = {
        "softcapped_cross_entropy": softcapped_cross_entropy,
        "linear_leaky_relu_square": linear_leaky_relu_square,
    }
    for attr, standin in replacements.items():
        if hasattr(module, attr):
            setattr(module, attr, standin)
    for attr in ("zeropower_via_newtonschulz5", "zeropower_via_newtonschulz"):
        fn = getattr(module, attr, None)
        if fn is not None:
            setattr(module, attr, inspect.unwrap(fn))
    if getattr(module, "BOS_ID", 0) is None:  # its loader sets this on reading the first shard
        module.BOS_ID = 1
    _LOADED[folder] = module
    return module


# ---- The run configuration: the "Hyperparameters:" block its log prints ---------------------------
def _typed(raw: str):
    if raw in ("True", "False"):
        return raw == "True"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def logged_hparams(log_path: Path) -> dict:
    """name -> value of the run configuration a record's log prints, typed as Python literals."""
    values, inside = {}, False
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if line.startswith("Hyperparameters:"):
            inside = True
            continue
        if inside:
            if not line.startswith("  "):
                break
            key, _, raw = line.strip().partition(": ")
            values[key.rstrip(":")] = _typed(raw.strip())
    if not values:
        raise ValueError(f"{log_path}: no 'Hyperparameters:' block")
    return values


def record_logs(folder: Path) -> list[Path]:
    folder = Path(folder)
    logs = sorted(folder.glob("*.log")) + sorted((folder / "logs").glob("*.txt"))
    return [
        p
        for p in logs
        if any(line.startswith("Hyperparameters:") for line in p.read_text(errors="replace").splitlines())
    ]


def logged_model_params(log_path: Path) -> int | None:
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if line.startswith("model_params:"):
            return int(line.split(":", 1)[1])
    return None


def record_hparams(folder: Path, **overrides) -> types.SimpleNamespace:
    """The configuration the record ran (its first log), with `overrides` (e.g. a smaller shape)."""
    logs = record_logs(folder)
    if not logs:
        raise FileNotFoundError(f"{folder}: no log with a 'Hyperparameters:' block")
    values = logged_hparams(logs[0])
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"not in the record's configuration: {sorted(unknown)}")
    values.update(overrides)
    values.update(distributed=False, rank=0, world_size=1, local_rank=0)
    return types.SimpleNamespace(**values)
