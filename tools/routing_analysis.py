"""Routing of a trained MoE artifact on validation data, per layer, expert and token class.

    python tools/routing_analysis.py logs/RUN_model.ptz --data data/sample --tokenizer data/sample/tokenizer.model

Computed after the run from the artifact alone (its stored knobs rebuild the model), so none of this
is counted in train_gpt.py. Writes a JSON report (default: the artifact's name with _routing.json)
that tools/routing_report.py plots.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

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
def record_routing(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs the model eagerly on x; -> (router probabilities, chosen experts) per MoE layer, per token.

    Hooks capture each MoE layer's input; the routing is recomputed from it with the layer's own router.
    """
    layers = [m for _, m in tg.moe_layers(model)]
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for m in layers]
    model.eval()
    try:
        with tg.autocast(x.device):
            model.logits(x)
    finally:
        for hook in hooks:
            hook.remove()
    routing = []
    for m, layer_input in zip(layers, inputs):
        tokens = layer_input.reshape(-1, layer_input.size(-1))
        if isinstance(m, tg.RoutedMoE):
            _, scores, choice, _ = m.route(tokens)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(m.router_logits(tokens), dim=-1)
            choice = probs.argmax(-1, keepdim=True)
        routing.append((probs.float().cpu(), choice.cpu()))
    return routing


def routing_report(model, x: torch.Tensor, sp, val_tokens: torch.Tensor) -> dict:
    """Routing statistics of one validation batch, per layer, expert and token class (JSON-ready)."""
    names, kind, frequent = token_classes(sp, val_tokens)
    ids = x.reshape(-1).cpu().numpy()
    classes = {n: kind[ids] == j for j, n in enumerate(names)}
    classes.update(frequent=frequent[ids], rare=~frequent[ids])
    report = dict(tokens=int(ids.size), classes={n: int(m.sum()) for n, m in classes.items()}, layers=[])
    for (layer, m), (probs, choice) in zip(tg.moe_layers(model), record_routing(model, x)):
        share = probs if isinstance(m, tg.SoftMoE) else F.one_hot(choice, m.E).float().mean(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / max(math.log(m.E), 1e-12)
        load = share.mean(0)
        class_load = {
            n: share[torch.from_numpy(mask)].mean(0).tolist() for n, mask in classes.items() if mask.any()
        }
        report["layers"].append(
            dict(
                layer=layer,
                load=load.tolist(),
                entropy=entropy.mean().item(),
                dead=int((load < tg.DEAD_LOAD_SHARE / m.E).sum()),
                class_load=class_load,
            )
        )
    return report


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
    sp = tg.load_tokenizer(tokenizer_path, h.vocab_size)
    val_tokens = tg.load_val_tokens(data_path, h.vocab_size, token_limit)
    seq_len = min(seq_len, val_tokens.numel())  # the artifact stores model knobs only
    n_seqs = max(1, min(batch_seqs, val_tokens.numel() // seq_len))
    x = val_tokens[: n_seqs * seq_len].long().view(n_seqs, seq_len).to(device)
    report = routing_report(model, x, sp, val_tokens)
    report.update(artifact=str(artifact), moe_mode=h.moe_mode, num_experts=h.num_experts, top_k=h.top_k)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
