"""Differential harness: our train_gpt.py against a record's own train_gpt.py (imported unmodified, with
the CPU stand-ins of tools/record_oracle.py), component by component, and docs/record_fidelity.md.

    python3 tools/record_fidelity.py            # writes docs/record_fidelity.md (CPU, a few minutes)
    python3 tools/record_fidelity.py --check    # exits 1 when the written file is out of date

Each comparison maps the record's tensors onto ours by name and shape, gives both models the same
weights and tokens and reports the largest difference. tests/test_record_fidelity.py asserts them."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import types
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record_oracle as oracle  # noqa: E402
from common import REPO, import_trainer  # noqa: E402

DOC = REPO / "docs" / "record_fidelity.md"

# The small shape both sides are scaled to: the default stack's layer structure (11 layers, loop 3-5 twice,
# lanes from layer 8, XSA everywhere) with narrow layers, a 32-wide head (partial RoPE over 16 channels)
# and a small vocabulary.
SMALL = {
    "num_layers": 11,
    "model_dim": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 512,
    "train_seq_len": 64,
    "eval_seq_len": 64,
}


def record_small(folder=oracle.RECORD_1061, **overrides) -> types.SimpleNamespace:
    return oracle.record_hparams(folder, **{**SMALL, **overrides})


def ours_small(**env) -> types.SimpleNamespace:
    tg = import_trainer()
    base = {k.upper(): str(v) for k, v in SMALL.items() if k != "eval_seq_len"}
    base["EVAL_SEQ_LEN"] = str(SMALL["eval_seq_len"])
    return tg.load_config(environ={**base, **{k: str(v) for k, v in env.items()}})


# ---- Parameters: every record tensor onto one of ours -----------------------------------------------
def parameter_map(record_model, our_names: set[str]) -> list[dict]:
    """One row per record tensor (a bank's matrices one by one): its name and shape, our tensor it maps to
    (or None) and why. `transpose` marks the lane weights we store with the (lane, branch) axes swapped."""
    n = record_model.num_layers
    rows = []

    def row(rec, shape, ours, note="", transpose=False):
        hit = ours if ours in our_names else None
        if ours is not None and hit is None and not note:
            note = f"ours has no {ours}"
        rows.append(dict(record=rec, shape=tuple(shape), ours=hit, note=note, transpose=transpose))

    sd = {k: v for k, v in record_model.named_parameters()}
    banks = {
        "qo_bank": [("attn.c_q.weight", 0), ("attn.proj.weight", n)],
        "kv_bank": [("attn.c_k.weight", 0), ("attn.c_v.weight", n)],
        "mlp_up_bank": [("mlp.fc.weight", 0)],
        "mlp_down_bank": [("mlp.proj.weight", 0)],
    }
    psl = record_model.parallel_start_layer
    for name, t in sd.items():
        if name in banks:
            for ours, offset in banks[name]:
                for i in range(n):
                    row(f"{name}[{offset + i}]", t.shape[1:], f"blocks.{i}.{ours}")
        elif name in ("parallel_post_lambdas", "parallel_resid_lambdas"):
            ours_leaf = "lane_post" if name == "parallel_post_lambdas" else "lane_resid"
            for i in range(n):
                if 0 < psl <= i:
                    row(
                        f"{name}[{i}]",
                        t.shape[1:],
                        f"blocks.{i}.{ours_leaf}",
                        transpose=ours_leaf == "lane_post",
                    )
                else:
                    row(
                        f"{name}[{i}]",
                        t.shape[1:],
                        None,
                        "never read: the record runs lanes from layer "
                        f"{psl} only; ours creates lane weights for lane layers only",
                    )
        elif name.endswith("attn.attn_gate_w"):
            row(name, t.shape, name.replace("attn_gate_w", "attn_gate"))
        elif name in ("smear_gate.weight", "smear_lambda"):
            row(name, t.shape, {"smear_gate.weight": "smear.weight", "smear_lambda": "smear.lam"}[name])
        elif name == "skip_gates":
            row(name, t.shape, "skip_gates")
        else:
            row(name, t.shape, name)
    return rows


def map_state(record_model, our_model) -> dict[str, torch.Tensor]:
    """Our state dict holding the record model's weights (our own tensors where the record has none)."""
    state = our_model.state_dict()
    names = set(state)
    rec = dict(record_model.named_parameters())
    for r in parameter_map(record_model, names):
        if r["ours"] is None:
            continue
        base, _, idx = r["record"].partition("[")
        t = rec[base][int(idx[:-1])] if idx else rec[base]
        t = t.detach().transpose(0, 1) if r["transpose"] else t.detach()
        if tuple(state[r["ours"]].shape) != tuple(t.shape):
            raise ValueError(f"{r['record']} {tuple(t.shape)} -> {r['ours']} {tuple(state[r['ours']].shape)}")
        state[r["ours"]] = t.clone().to(state[r["ours"]].dtype)
    return state


def randomize(model, seed: int = 0) -> None:
    """Every parameter away from its initial value (zero-initialised projections and gates included), so a
    tensor either side ignores or misplaces changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and p.shape[-1] >= 64:  # matrices: scaled like an orthogonal init
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:  # control tensors: their init plus a perturbation
                p.add_(0.3 * noise)


# Overrides of each side's configuration for a comparison: none, every feature is compared as run.
RECORD_ALIGNED: dict = {}
OURS_ALIGNED: dict = {}


def paired_models(record_overrides=RECORD_ALIGNED, our_env=OURS_ALIGNED, seed=0, folder=oracle.RECORD_1061):
    """(record module, record model, our model) at the small shape with the same random weights."""
    rec = oracle.load_record(folder)
    tg = import_trainer()
    torch.manual_seed(seed)
    rmodel = rec.GPT(record_small(folder, **(record_overrides or {}))).float()
    randomize(rmodel, seed)
    ours = tg.GPT(tg.model_config(ours_small(**(our_env or {}))))
    ours.load_state_dict(map_state(rmodel, ours))
    return rec, rmodel, ours


def tokens(batch=2, seq=64, seed=1, bos_every=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(2, SMALL["vocab_size"], (batch, seq + 1), generator=gen)
    x[:, 0] = 1
    if bos_every:
        x[:, ::bos_every] = 1
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def set_looping(rmodel, ours, on: bool) -> None:
    rmodel.looping_active = on
    ours.set_looping(on)


@torch.no_grad()
def forward_gap(rmodel, ours, x, looping: bool) -> float:
    rmodel.eval()
    ours.eval()
    set_looping(rmodel, ours, looping)
    return (rmodel.forward_logits(x) - ours.logits(x)).abs().max().item()


def backward_gaps(rmodel, ours, x, y, looping: bool) -> tuple[float, dict[str, float], list[str]]:
    """(loss gap, per-tensor max gradient gap relative to the gradient's scale, tensors with no gradient)."""
    rmodel.train()
    ours.train()
    set_looping(rmodel, ours, looping)
    rmodel.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    rloss = rmodel(x, y)
    rloss.backward()
    oloss, _ = ours(x, y)
    oloss.backward()
    rgrads = types.SimpleNamespace(
        named_parameters=lambda: [
            (n, p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in rmodel.named_parameters()
        ],
        num_layers=rmodel.num_layers,
        parallel_start_layer=rmodel.parallel_start_layer,
    )
    mapped = map_state(rgrads, ours)
    gaps, silent = {}, []
    for name, p in ours.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = max(g.abs().max().item(), mapped[name].abs().max().item())
        if scale == 0:
            silent.append(name)
            continue
        gaps[name] = (g - mapped[name]).abs().max().item() / scale
    return abs(rloss.item() - oloss.item()), gaps, silent


# ---- Optimizer: one step each from the same weights and gradients -----------------------------------
@contextlib.contextmanager
def cpu_streams():
    """The record's Optimizers overlap the Adam steps on a CUDA side stream: on a CPU, no streams."""
    no_stream = types.SimpleNamespace(wait_stream=lambda other: None)
    with (
        mock.patch.object(torch.cuda, "Stream", lambda *a, **k: no_stream),
        mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: no_stream),
        mock.patch.object(torch.cuda, "stream", lambda s: contextlib.nullcontext()),
    ):
        yield


def record_nested(rec, outer: str, inner: str, **cells):
    """A function defined inside one of the record's functions (e.g. train_model's lr_mul), rebuilt from its
    own code object with its free variables bound to `cells`: the record's code, callable on its own."""
    code = next(
        c
        for c in getattr(rec, outer).__code__.co_consts
        if isinstance(c, types.CodeType) and c.co_name == inner
    )
    closure = tuple(types.CellType(cells[name]) for name in code.co_freevars)
    return types.FunctionType(code, rec.__dict__, inner, None, closure)


class _Batches:
    def __init__(self, x, y):
        self.batch = (x, y, None, 0)

    def next_batch(self, global_tokens, grad_accum_steps):
        return self.batch


def step_gaps(frac: float, step: int, x, y, seed=0, muon: str = "fp64") -> dict:
    """The record's step_fn at (step, lr_mul(frac)), its own code: forward/backward, momentum warm-up,
    learning rates, clipping and optimizer step. Ours at progress `frac` (apply_schedule, then each
    optimizer's step) from the same weights and the record's clipped gradients, so the optimizers alone are
    compared. muon="bf16": both Polar-Express iterations in bf16, as each runs on a GPU (each rounds its own
    way); "fp64": both in fp64 (the record's bf16 casts made fp64 casts), which compares the mathematics.
    Returns the largest update gap per parameter class relative to that class's largest update, the Muon
    momentum and the learning rates (peak -> applied) of each side."""
    tg = import_trainer()
    rec, rmodel, ours = paired_models(seed=seed)
    hr = record_small(**RECORD_ALIGNED)
    hr.grad_accum_steps = 1
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    set_looping(rmodel, ours, frac >= hr.enable_looping_at)
    rmodel.train()
    grads = {}
    widen = mock.patch.object(torch.Tensor, "bfloat16", lambda t: t.double())
    with cpu_streams(), widen if muon == "fp64" else contextlib.nullcontext():
        ropt = rec.Optimizers(hr, rmodel)
        launch = ropt.optimizer_muon.launch_reduce_scatters

        def snapshot_then_launch():  # the first call of the record's Optimizers.step: gradients final
            grads.update({n: p.grad.detach().clone() for n, p in rmodel.named_parameters()})
            launch()

        ropt.optimizer_muon.launch_reduce_scatters = snapshot_then_launch
        lr_mul = record_nested(rec, "train_model", "lr_mul", h=hr)
        step_fn = record_nested(
            rec,
            "train_model",
            "step_fn",
            h=hr,
            train_loader=_Batches(x, y),
            model=rmodel,
            device=torch.device("cpu"),
            optimizers=ropt,
            _clip_params=[p for p in rmodel.parameters() if p.requires_grad],
        )
        step_fn(step, lr_mul(frac))
    ho = ours_small(**OURS_ALIGNED)
    opts = tg.build_optimizers(ours, ho)
    tg.Trainer.apply_schedule(types.SimpleNamespace(h=ho, optimizers=opts, model=ours), frac)
    grad_model = types.SimpleNamespace(
        named_parameters=lambda: list(grads.items()),
        num_layers=rmodel.num_layers,
        parallel_start_layer=rmodel.parallel_start_layer,
    )
    mapped_grads = map_state(grad_model, ours)
    for name, p in ours.named_parameters():
        p.grad = mapped_grads[name].clone()
    dtype = {"bf16": lambda t: torch.bfloat16, "fp64": lambda t: torch.float64}[muon]
    with mock.patch.object(tg, "muon_dtype", dtype):
        for opt in opts:
            opt.step()
    mapped = map_state(rmodel, ours)
    gaps: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for name, p in ours.named_parameters():
        cls = tg.param_class(name, p)
        rec_update = mapped[name] - before[name]
        gap = (p.detach() - before[name] - rec_update).abs().max().item()
        gaps[cls] = max(gaps.get(cls, 0.0), gap)
        sizes[cls] = max(sizes.get(cls, 0.0), rec_update.abs().max().item())
    momenta = (ropt.optimizer_muon.param_groups[0]["momentum"], opts[-1].param_groups[0]["momentum"])
    lrs = (
        sorted((g["base_lr"], g["lr"], g["weight_decay"]) for o in ropt for g in o.param_groups),
        sorted((g["base_lr"], g["lr"], g["weight_decay"]) for o in opts for g in o.param_groups),
    )
    return dict(gaps={c: gaps[c] / max(sizes[c], 1e-30) for c in gaps}, momenta=momenta, lrs=lrs)


def schedule_rows(fracs=(0.0, 0.1, 0.15, 0.2, 0.3, 0.35, 0.5, 0.9, 0.99)) -> list[tuple]:
    """(fraction, record lr_mul, our lr_scale, record momentum at its step, ours, record looping, ours) at
    the default configuration, the record's step being the fraction of its logged 4,931-step runs."""
    tg = import_trainer()
    rec = oracle.load_record(oracle.RECORD_1061)
    hr = oracle.record_hparams(oracle.RECORD_1061)
    ho = tg.load_config(environ={})
    lr_mul = record_nested(rec, "train_model", "lr_mul", h=hr)
    rows = []
    for f in fracs:
        step = round(f * RECORD_STEPS)
        warm = min(step / hr.muon_momentum_warmup_steps, 1.0)
        rec_mom = (1 - warm) * hr.muon_momentum_warmup_start + warm * hr.muon_momentum
        stage = tg.schedule(f, ho)
        rows.append(
            (
                f,
                lr_mul(f),
                stage.lr_scale,
                rec_mom,
                stage.muon_momentum,
                f >= hr.enable_looping_at,
                stage.looping,
            )
        )
    return rows


RECORD_STEPS = 4931  # the logged runs' mean step count (README: 4931 +- 14 steps in 600 s)


# ---- Configuration: the record's run against our defaults, knob by knob ----------------------------
# Record names whose knob we spell differently (our name), and record settings that are no knob here.
RENAMED = {"smear_gate_enabled": "SMEAR_GATE"}
NOT_KNOBS = {
    "data_dir",
    "datasets_dir",
    "train_files",
    "val_files",
    "val_bytes_files",
    "tokenizer_path",
    "logfile",
    "model_path",
    "quantized_model_path",
    "artifact_dir",
    "run_id",
    "rank",
    "local_rank",
    "world_size",
    "distributed",
    "is_main_process",
    "grad_accum_steps",
    "seed",
}


NO_KNOB = "-"


def config_rows(folder) -> list[tuple[str, object, object]]:
    """(record setting, its value in the record's run, our default, or NO_KNOB where we have no such knob)
    for every setting whose value differs or that we lack."""
    tg = import_trainer()
    ours = tg.load_config(environ={})
    rows = []
    for name, value in oracle.logged_hparams(oracle.record_logs(folder)[0]).items():
        if name in NOT_KNOBS:
            continue
        knob = RENAMED.get(name, name.upper())
        mine = getattr(ours, knob.lower()) if knob in tg.KNOBS else NO_KNOB
        if mine != value:
            rows.append((name, value, mine))
    return rows


def full_param_counts(folder) -> tuple[int, int | None]:
    """(the record's model built at its run configuration, the model_params its log printed)."""
    rec = oracle.load_record(folder)
    torch.manual_seed(0)
    model = rec.GPT(oracle.record_hparams(folder))
    return sum(p.numel() for p in model.parameters()), oracle.logged_model_params(
        oracle.record_logs(folder)[0]
    )


def ours_full_count(**env) -> int:
    tg = import_trainer()
    return sum(p.numel() for p in tg.GPT(tg.model_config(tg.load_config(environ=env))).parameters())


def count_difference(folder, our_env=None) -> tuple[int, list[tuple[str, int]]]:
    """At the full run shape: (record minus ours, [(what, record minus ours) per unmatched tensor])."""
    rec = oracle.load_record(folder)
    tg = import_trainer()
    torch.manual_seed(0)
    rmodel = rec.GPT(oracle.record_hparams(folder))
    ours = tg.GPT(tg.model_config(tg.load_config(environ=our_env or {})))
    names = {n for n, _ in ours.named_parameters()}
    rows = parameter_map(rmodel, names)
    mapped = {r["ours"] for r in rows if r["ours"] is not None}
    diff = []
    for r in rows:
        if r["ours"] is None:
            diff.append((f"record `{r['record']}` {r['shape']}: {r['note']}", math.prod(r["shape"])))
    for name, p in ours.named_parameters():
        if name not in mapped:
            diff.append((f"ours `{name}` {tuple(p.shape)}: the record has no such tensor", -p.numel()))
    total = sum(p.numel() for p in rmodel.parameters()) - sum(p.numel() for p in ours.parameters())
    return total, diff


# ---- docs/record_fidelity.md ---------------------------------------------------------------------
def _fmt(v) -> str:
    return (
        f"{v:.1e}"
        if isinstance(v, float) and v and (abs(v) < 1e-3 or abs(v) >= 1e4)
        else (f"{v:.3f}" if isinstance(v, float) else str(v))
    )


def _grouped(diff: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Rows of the same kind (a tensor name with its layer index dropped) merged: (what, count, params)."""
    merged: dict[str, list[int]] = {}
    for what, n in diff:
        merged.setdefault(re.sub(r"\[\d+\]", "[i]", what), []).append(n)
    return [(k, len(v), sum(v)) for k, v in merged.items()]


def report() -> str:
    torch.set_num_threads(1)
    lines = []
    add = lines.append
    add("# Our default against the records' own code\n")
    add(
        "Written by `python3 tools/record_fidelity.py` (CPU); asserted by "
        "`tests/test_record_fidelity.py`. The"
    )
    add(
        "record's `train_gpt.py` is imported unmodified; `tools/record_oracle.py` supplies CPU "
        "stand-ins for its"
    )
    add("GPU-only pieces: FlashAttention 3 (`flash_attn_func`, `flash_attn_varlen_func`) on SDPA, the Triton")
    add(
        "softcapped cross-entropy and fused LeakyReLU(0.5)^2 matmul as PyTorch functions of the kernels' math"
    )
    add(
        "(checked against that math in the test file), and its `torch.compile`d Polar-Express "
        "function run eagerly."
    )
    add("Its configuration is the `Hyperparameters:` block of its first log (the run, not the script's bare")
    add("defaults: the README's command sets nine more). The small shape is that configuration with")
    add(", ".join(f"`{k}={v}`" for k, v in SMALL.items()) + ": the same 11-layer structure (loop 3-5")
    add("twice, lanes from layer 8, XSA in every layer, partial RoPE over 16 of 32 head channels), random")
    add("weights on every tensor.\n")

    add("## 1.0611 record (2026-04-27): parameters\n")
    rec_count, logged = full_param_counts(oracle.RECORD_1061)
    ours_count = ours_full_count()
    total, diff = count_difference(oracle.RECORD_1061)
    add(
        f"At the full run shape: record model {rec_count:,} parameters (its log: "
        f"`model_params:{logged}`), ours"
    )
    add(f"{ours_count:,}; the record has {total:,} more. Every record tensor (each bank split into its")
    add(
        "per-layer matrices) maps onto ours by name and shape except these rows, which sum to the "
        "difference:\n"
    )
    add("| tensor(s) | how many | record minus ours |")
    add("|---|---|---|")
    for what, n, params in _grouped(diff):
        add(f"| {what} | {n} | {params:+,} |")
    add(f"| **total** | | **{sum(n for _, n in diff):+,}** |\n")

    add("## Forward and backward (small shape, same weights, same tokens)\n")
    rec, rmodel, ours = paired_models()
    x, y = tokens(bos_every=17)
    add("Every feature on, on both sides, as each record run configures it; no document boundaries (row 1).")
    add("Tokens: 2 x 64 with a BOS every 17 positions. Gaps are max |record - ours|.\n")
    add("| loops | logits, fp32 | final hidden, fp64 | loss | gradient (max over tensors, / tensor's max) |")
    add("|---|---|---|---|---|")
    for looping in (False, True):
        fwd = forward_gap(rmodel, ours, x, looping)
        loss_gap, gaps, silent = backward_gaps(rmodel, ours, x, y, looping)
        hid = hidden_gap64(looping)
        add(
            f"| {'on' if looping else 'off'} | {_fmt(fwd)} | {_fmt(hid)} | {_fmt(loss_gap)} | "
            f"{_fmt(max(gaps.values()))} ({len(gaps)} tensors, {len(silent)} without gradient) |"
        )
    add("\nIn fp64 the hidden states agree to ~1e-14: the same function. The fp32 gaps are round-off of")
    add("different operation orders through 11-17 layers of random weights.\n")

    add("## Optimizer step and schedule\n")
    add("The record's own `step_fn` (rebuilt from `train_model`'s code object: forward/backward, momentum")
    add(
        "warm-up, learning rates, clipping, `Optimizers.step`) against ours "
        "(`Trainer.apply_schedule`, then each"
    )
    add("optimizer's step) from the same weights and the record's clipped gradients. Gap: max |update")
    add("difference| / max |record update| per parameter class.\n")
    add(
        "| fraction (record step) | Muon precision | control (Adam) | embed (Adam) | attn (Muon) | "
        "mlp (Muon) |"
        " lr, wd per group | Muon momentum record / ours |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for frac in (0.0, 0.2, 0.9):
        step = round(frac * RECORD_STEPS)
        for muon in ("fp64", "bf16"):
            r = step_gaps(frac, step, x, y, muon=muon)
            g = r["gaps"]
            same = "equal" if r["lrs"][0] == r["lrs"][1] else f"{r['lrs'][0]} vs {r['lrs'][1]}"
            add(
                f"| {frac} ({step}) | {muon} | {_fmt(g['control'])} | {_fmt(g['embed'])} | "
                f"{_fmt(g['attn'])} | "
                f"{_fmt(g['mlp'])} | {same} | {r['momenta'][0]:.5f} / {r['momenta'][1]:.5f} |"
            )
    add("\nWith both Polar-Express iterations in fp64 the updates agree to fp32 storage round-off: the same")
    add(
        "Muon (Nesterov, row normalisation, 5 Polar-Express steps, shape scale, decoupled weight "
        "decay) and the"
    )
    add(
        "same Adam groups. In bf16, as each runs on a GPU, single elements differ by up to ~15% of "
        "the largest"
    )
    add("update: bf16 itself (the record's bf16 iteration against an fp64 one differs by ~7% on a random")
    add("matrix; ours rounds differently). Ours keeps the momentum buffer in fp32, the record in bf16.\n")
    add("Schedule at the default configuration (record: its logged 4,931-step runs):\n")
    add("| fraction | lr_mul record | ours | momentum record | ours | looping record | ours |")
    add("|---|---|---|---|---|---|---|")
    for row in schedule_rows():
        add("| " + " | ".join(f"{v:.5f}" if isinstance(v, float) else str(v) for v in row) + " |")
    add("")
    add(DIFFERENCES)
    for folder in (oracle.RECORD_1061, oracle.RECORD_10614):
        add(f"## Configuration: {folder.name} against our defaults\n")
        add(
            "Settings of the record's logged run whose value differs from our default, or that we have "
            "no knob"
        )
        add("for (`-`); paths, ranks and the seed left out.\n")
        add("| record setting | record run | our default |")
        add("|---|---|---|")
        for name, value, mine in config_rows(folder):
            add(f"| `{name}` | {value} | {mine} |")
        add("")
    add("## Other fixtures (part 3: how far each is from ours)\n")
    add("| fixture | loads on CPU | model parameters (log) | record minus ours | tensors we lack / add |")
    add("|---|---|---|---|---|")
    for folder in sorted(p for p in oracle.RECORDS.iterdir() if (p / "train_gpt.py").exists()):
        add(fixture_row(folder))
    add("")
    return "\n".join(lines)


def fixture_row(folder) -> str:
    source = (folder / "train_gpt.py").read_text(errors="replace")
    if source.startswith("import lzma"):
        return f"| {folder.name} | no: self-extracting (lzma) script | | | |"
    if not oracle.record_logs(folder):
        return f"| {folder.name} | no: no log with its configuration | | | |"
    try:
        count, logged = full_param_counts(folder)
        total, diff = count_difference(folder)
    except Exception as err:  # reported in the table: which fixture the harness cannot run, and why
        return f"| {folder.name} | no: {type(err).__name__}: {str(err)[:80]} | | | |"
    lacks = sum(1 for what, n in diff if what.startswith("record"))
    extra = sum(1 for what, n in diff if what.startswith("ours"))
    return f"| {folder.name} | yes | {count:,} ({logged}) | {total:+,} | {lacks} / {extra} |"


DIFFERENCES = """## Differences, row by row

| # | what | how large | status |
|---|---|---|---|
| 1 | **Document isolation.** The record trains with `DocumentPackingLoader` + `flash_attn_varlen_func` \
(a segment per document, cut at `TRAIN_SEQ_LEN`); ours attends causally across the packed row. | \
unmeasured here | **pending the attention change** (done on another branch); every comparison above runs \
without document boundaries on both sides (the record's `cu_seqlens=None` path = plain causal); the \
test `test_document_isolated_forward_matches` is an expected failure for this reason only |
| 2 | **Gated U-Net skips.** The record's run has `SKIP_GATES_ENABLED=1`: a decoder input becomes \
`lerp(w * skip, x, sigmoid(g))` (8 x 512 gates, zero init = half skip, half stream); ours adds `w * skip` \
and rejects `SKIP_GATES_ENABLED` as another script's knob. | 4,096 parameters; logits differ (test \
`test_record_defaults_differ_where_documented`) | ours differs from the record: **not fixed** on this \
branch (a model change: a knob, the artifact's tensors, MoE paths) |
| 3 | **SmearGate form.** Record: `x_t += lambda * sigmoid(W . x_t[:12]) * x_(t-1)` on the raw embedding, \
before its RMSNorm, zero at a BOS (13 parameters, lambda = 0: identity at init). Ours: `x + sigmoid(g) * \
(x_(t-1) - x)` per channel after the RMSNorm (512 parameters, g = 0: half of the previous embedding at \
init). | 499 parameters fewer in the record; a different function | ours differs: **not fixed** (same \
reason as row 2) |
| 4 | Lane weights of layers 0-7: the record allocates `parallel_*_lambdas` for all 11 layers and reads \
only layers 8-10. | 48 parameters, never read | deliberate: no effect on any output |
| 5 | Lane weight layout: our `lane_post[j, k]` (lane j, branch k) is the record's \
`parallel_post_lambdas[i, k, j]`. | none (a transpose) | deliberate: layout only |
| 6 | RoPE inverse frequencies: ours computed `base ** (-i/d)`, the record `1 / base ** (i/d)`. | 1 ulp \
(3.7e-9) in fp32 | **fixed** on this branch (`test_rope_frequencies_are_the_records`) |
| 7 | Muon precision: the record's momentum buffer and Polar-Express iteration in bf16; ours keeps the \
buffer in fp32 and iterates in bf16 on a GPU (fp32 on a CPU). | table above | deliberate (more precise) |
| 8 | Muon momentum warm-up: ours over the first 30% of the run (`MUON_MOMENTUM_WARMUP_FRAC`), the \
record over 1,500 steps (30.4% of its 4,931). | momentum table above (< 5e-4) | deliberate: fractions of \
the run, so short runs are miniatures |
| 9 | EMA: the record decays 0.9965 per step from the initial weights; ours (`EMA_DECAY` unset) \
`exp(-step share / 0.058)`, 0.99650 at 4,931 steps, from the weights after the first step. | read from \
both codes, not run here | deliberate: fractions of the run |
| 10 | Training data order: not compared (the record's loader packs from the first BOS of each shard, \
one 98,304-token row per rank; ours: see `TrainLoader`). | not measured | **not done** |
| 11 | Quantization (GPTQ + SDClip + LQER codes and scales on the same weights and Hessians) and the \
compressed size: not compared. The record's run uses asymmetric LQER (`LQER_ASYM_ENABLED`, groups of 64), \
an int8 attention-gate store (`GATED_ATTN_QUANT_GATE`) and its `pergroup` compressor; ours has none of \
these knobs (configuration table). | not measured | **not done** |
| 12 | Evaluation (sliding window, phased TTT: val_bpb and per-token losses): not compared. | not \
measured | **not done** |
| 13 | Tokenizer: the record's run uses the CaseOps lossless-caps SP8192 tokenizer and its byte sidecar \
(`CASEOPS_ENABLED=1`); ours reads the plain SP8192 export. | a different dataset and byte count: its \
1.0611 \
is not a number our default can reproduce | not reproducible here |
"""


def hidden_gap64(looping: bool) -> float:
    """Final hidden states in fp64 (each side's rotary table in fp32, as each builds it)."""
    _, rmodel, ours = paired_models()
    x, _ = tokens(bos_every=17)
    rmodel.double().eval()
    ours.double().eval()
    for block in ours.blocks:
        block.attn.rotary.inv_freq = block.attn.rotary.inv_freq.float()
    set_looping(rmodel, ours, looping)
    with torch.no_grad():
        return (rmodel._forward_hidden(x) - ours.hidden(x)).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/record_fidelity.md is out of date"
    )
    args = parser.parse_args()
    text = report()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"error: {DOC.relative_to(REPO)} is out of date: run python3 tools/record_fidelity.py")
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
