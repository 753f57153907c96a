"""Routing of a trained MoE artifact on validation data, per layer, expert and token class.

    python3 -m tools.routing.routing_analysis logs/RUN_model.ptz --data data/sample --tokenizer
    data/sample/tokenizer.model

Computed after the run from the artifact alone (its stored knobs rebuild the model), so none of this
is counted in train_gpt.py. Writes a JSON report (default: the artifact's name with _routing.json)
that tools/routing/routing_report.py plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.common import import_trainer

tg = import_trainer()

TOKEN_KINDS = ("word_start", "continuation", "digit", "punct", "byte", "control")


def token_classes(sp, val_tokens: torch.Tensor) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Kind of every token id (an index into TOKEN_KINDS) and whether it is frequent (among the ids
    covering half of the validation tokens) or rare."""
    kind = np.zeros(sp.vocab_size(), np.int64)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        bare = piece.removeprefix("\u2581")
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            kind[i] = TOKEN_KINDS.index("control")
        elif sp.is_byte(i):
            kind[i] = TOKEN_KINDS.index("byte")
        elif bare.isdigit():
            kind[i] = TOKEN_KINDS.index("digit")
        elif not any(ch.isalnum() for ch in bare):
            kind[i] = TOKEN_KINDS.index("punct")
        else:
            kind[i] = TOKEN_KINDS.index("word_start" if piece.startswith("\u2581") else "continuation")
    counts = np.bincount(val_tokens.numpy(), minlength=sp.vocab_size())
    by_count = np.argsort(-counts, kind="stable")
    frequent = np.zeros(sp.vocab_size(), np.bool_)
    half = int(np.searchsorted(np.cumsum(counts[by_count]), counts.sum() / 2)) + 1
    frequent[by_count[:half]] = True
    return list(TOKEN_KINDS), kind, frequent


@torch.no_grad()
def record_routing(model: torch.nn.Module, x: torch.Tensor) -> list[tuple]:
    """Runs the model eagerly on x; -> (layer, pass, router probabilities, chosen experts) per MoE layer
    and, for a layer with one router per pass of the loop, per pass (else pass None: a looped layer's
    passes pooled); sorted by layer and pass, every token of every pass counted.

    Hooks capture each call's input and pass; the routing is recomputed from it with that pass's router.
    """
    layer_of = {id(m): layer for layer, m in tg.moe_layers(model)}
    calls: list[tuple] = []

    def capture(m, args, kwargs):
        calls.append((m, kwargs.get("pass_index", 0), args[0].detach()))

    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for _, m in tg.moe_layers(model)]
    model.eval()
    try:
        with tg.autocast(x.device):
            model.logits(x)
    finally:
        for hook in hooks:
            hook.remove()
    pooled: dict[tuple, list] = {}
    for m, pass_index, layer_input in calls:
        tokens = layer_input.reshape(-1, layer_input.size(-1))
        if isinstance(m, tg.RoutedMoE):
            _, scores, choice, _ = m.route(tokens, pass_index)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(m.router_logits(tokens, pass_index), dim=-1)
            choice = probs.argmax(-1, keepdim=True)
        key = (layer_of[id(m)], pass_index if m.passes > 1 else None)
        pooled.setdefault(key, []).append((probs.float().cpu(), choice.cpu()))
    return [
        (layer, p, torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts]))
        for (layer, p), parts in sorted(pooled.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    ]


def routing_report(model, x: torch.Tensor, sp, val_tokens: torch.Tensor) -> dict:
    """Routing statistics of one validation batch, per layer, expert and token class (JSON-ready)."""
    names, kind, frequent = token_classes(sp, val_tokens)
    ids = x.reshape(-1).cpu().numpy()
    classes = {n: kind[ids] == j for j, n in enumerate(names)}
    classes.update(frequent=frequent[ids], rare=~frequent[ids])
    report = dict(tokens=int(ids.size), classes={n: int(m.sum()) for n, m in classes.items()}, layers=[])
    modules = dict(tg.moe_layers(model))
    for layer, pass_index, probs, choice in record_routing(model, x):
        m = modules[layer]
        calls = probs.size(0) // ids.size  # a looped layer's pooled passes: the batch's tokens once per pass
        share = probs if isinstance(m, tg.SoftMoE) else F.one_hot(choice, m.E).float().mean(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / max(math.log(m.E), 1e-12)
        load = share.mean(0)
        class_load = {
            n: share[torch.from_numpy(mask).repeat(calls)].mean(0).tolist()
            for n, mask in classes.items()
            if mask.any()
        }
        report["layers"].append(
            dict(
                layer=layer,
                **{"pass": pass_index},
                load=load.tolist(),
                entropy=entropy.mean().item(),
                dead=int((load < tg.DEAD_LOAD_SHARE / m.E).sum()),
                class_load=class_load,
            )
        )
    return report


def plot_pass_load(report: dict, path: Path) -> bool:
    """One panel per layer with routers per pass: each pass's load share per expert, side by side, so a
    reader sees whether the passes route differently. False (nothing written) without such layers."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    per_pass: dict[int, list[dict]] = {}
    for entry in report["layers"]:
        if entry.get("pass") is not None:
            per_pass.setdefault(entry["layer"], []).append(entry)
    if not per_pass:
        return False
    fig, axes = plt.subplots(1, len(per_pass), figsize=(3.6 * len(per_pass), 3.2), squeeze=False)
    for ax, (layer, entries) in zip(axes[0], sorted(per_pass.items())):
        E, width = len(entries[0]["load"]), 0.8 / len(entries)
        for i, entry in enumerate(entries):
            ax.bar(
                np.arange(E) + (i - (len(entries) - 1) / 2) * width, entry["load"], width, label=f"pass {i}"
            )
        ax.axhline(1 / E, color="grey", lw=0.8, ls="--")
        ax.set(title=f"layer {layer}", xlabel="expert", xticks=range(E), ylim=(0, 1))
    axes[0, 0].set_ylabel("load share")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("load per expert, per pass of the loop (dashed: uniform)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def analyse_artifact(
    artifact: str,
    data_path: str,
    tokenizer_path: str,
    token_limit: int = 0,
    batch_seqs: int = 32,
    seq_len: int = 1024,
) -> dict:
    """Rebuilds the model from the artifact and reports the routing of the first validation batch."""
    device = torch.device("cpu")
    model, h = tg.load_artifact_model(artifact, device)
    if not tg.moe_layers(model):
        raise tg.ConfigError(f"{artifact}: a dense model (MOE_MODE=none) has no routing to analyse")
    sp = tg.load_tokenizer(tokenizer_path, h.data.vocab_size)
    val_tokens = tg.load_val_tokens(data_path, h.data.vocab_size, token_limit)
    seq_len = min(seq_len, val_tokens.numel())  # the artifact stores model knobs only
    n_seqs = max(1, min(batch_seqs, val_tokens.numel() // seq_len))
    x = val_tokens[: n_seqs * seq_len].long().view(n_seqs, seq_len).to(device)
    report = routing_report(model, x, sp, val_tokens)
    report.update(
        artifact=str(artifact),
        moe_mode=h.model.moe_mode,
        num_experts=h.model.num_experts,
        top_k=h.model.top_k,
    )
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="logs/<RUN_ID>_model.ptz written by train_gpt.py")
    parser.add_argument("--data", required=True, help="folder with fineweb_val_*.bin shards")
    parser.add_argument("--tokenizer", required=True, help="the SentencePiece model of the run")
    parser.add_argument("--token-limit", type=int, default=0, help="use only the first N validation tokens")
    parser.add_argument("--batch-seqs", type=int, default=32, help="sequences in the analysed batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per analysed sequence")
    parser.add_argument("--out", help="JSON report path (default: <artifact stem>_routing.json beside it)")
    parser.add_argument(
        "--pass-plot", help="also write this PNG: per-pass load of layers with routers per pass (if any)"
    )
    args = parser.parse_args(argv)
    out = (
        Path(args.out)
        if args.out
        else Path(args.artifact).with_name(Path(args.artifact).stem.removesuffix("_model") + "_routing.json")
    )
    if out.exists():
        print(f"error: {out} already exists; choose another --out", file=sys.stderr)
        return 2
    try:
        report = analyse_artifact(
            args.artifact, args.data, args.tokenizer, args.token_limit, args.batch_seqs, args.seq_len
        )
    except (tg.ConfigError, tg.DataError, tg.ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.write_text(json.dumps(report, indent=1))
    print(f"routing statistics: {out}")
    if args.pass_plot and plot_pass_load(report, Path(args.pass_plot)):
        print(f"per-pass load plot: {args.pass_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
