"""Quantize one checkpoint with each scheme and compressor; print bytes and round-trip val_bpb.

    python3 -m tools.quant.quant_study logs/RUN_fp.pt --data-path D --tokenizer T [--bits 6] \
        [--val-token-limit N] [--json]

The checkpoint is what SAVE_CHECKPOINT=1 writes (the EMA weights and the model knobs). Hessians come
from the first --calibration-batches batches of --batch-tokens training tokens of D (never validation
tokens). Every scheme uses train_gpt.py's own quantizer and artifact writer, so the bytes are the
bytes a run writes:
  rtn          round-to-nearest on the SDClip grid
  gptq         GPTQ on the same grid (its step widened until it costs no more bytes than rtn)
  gptq+lqer    plus the rank-LQER_RANK correction of the LQER_TOP_K worst tensors
each with zstd (the round trip is evaluated), then gptq+lqer with every other installed compressor
(same integers, so the same val_bpb; only the bytes differ). --only CLASS quantizes one tensor class
(mlp, attn, embed, bigram) and keeps the rest in fp16, to see what each class loses. --layouts
prints what grouping by role, transposing and sorting rows would save, per compressor.
"""

import argparse
import copy
import json
import sys
import time
from dataclasses import replace

import torch

from tools.common import import_trainer

train_gpt = import_trainer()

SCHEMES = {"rtn": ("rtn", False), "gptq": ("gptq", False), "gptq+lqer": ("gptq", True)}


def load_checkpoint(path: str, device: torch.device):
    """-> (model in eval mode, its config) from a SAVE_CHECKPOINT=1 file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        h = train_gpt.load_config({}, **saved["config"])
    except (OSError, RuntimeError, KeyError, TypeError) as err:
        raise SystemExit(f"error: {path}: not a train_gpt.py checkpoint ({err})") from None
    model = train_gpt.GPT(h.model).to(device)
    model.load_state_dict(saved["state"])
    return model.eval(), h


def calibration_batches(
    data_path: str, n: int, seq_len: int, batch_tokens: int, device: torch.device
) -> list:
    loader = train_gpt.TrainLoader(
        train_gpt.shard_files(data_path, "train"), 0, 1, seq_len, batch_tokens, 1, device
    )
    return [loader.next_step()[0] for _ in range(n)]


def scheme_config(h, bits: int, embed_bits: int, method: str, lqer: bool, compressor: str):
    """-> the run's quantization group with this scheme's knobs."""
    return replace(
        h.quant,
        quant_method=method,
        lqer_enabled=lqer,
        compressor=compressor,
        matrix_bits=bits,
        expert_bits=bits,  # experts follow the matrices' bits here, as by default
        embed_bits=embed_bits or bits + 1,
    )


def quantize(model, hq, hessians, only: str):
    """-> (entries, relative squared error); with `only`, the other classes stay fp16."""
    state = train_gpt.artifact_state(model)
    if not only:
        return train_gpt.quantize_state(state, hq, hessians)
    keep = {
        n: t
        for n, t in state.items()
        if train_gpt.QUANT_GROUP.get(train_gpt.param_class(n, t), "other") != only
    }
    entries, err = train_gpt.quantize_state({n: t for n, t in state.items() if n not in keep}, hq, hessians)
    entries.update({n: (16, [t.detach().float().cpu().half()]) for n, t in keep.items()})
    return entries, err


def round_trip_bpb(model, entries, shapes, evaluate) -> float:
    qmodel = copy.deepcopy(model)
    state = {n: train_gpt.dequantize_entry(bits, ts, shapes[n]) for n, (bits, ts) in entries.items()}
    qmodel.load_state_dict(state, strict=False)
    return evaluate(qmodel)


def study(args) -> list[dict]:
    device = torch.device("cpu")
    model, h = load_checkpoint(args.checkpoint, device)
    sp = train_gpt.load_tokenizer(args.tokenizer, h.data.vocab_size)
    tables = train_gpt.byte_tables(sp)
    val = train_gpt.load_val_tokens(args.data_path, h.data.vocab_size, args.val_token_limit)
    seq = min(args.seq_len, val.numel() - 1)
    runtime = train_gpt.Runtime(0, 1, device, lambda msg: None)

    def evaluate(m) -> float:
        with torch.no_grad():
            return train_gpt.evaluate(m.logits, val, tables, train_gpt.WindowSpec(seq, 0, 16), runtime)[1]

    pre = evaluate(model)
    t0 = time.perf_counter()
    batches = calibration_batches(
        args.data_path, args.calibration_batches, args.seq_len, args.batch_tokens, device
    )
    hessians, warnings = train_gpt.collect_hessians(model, batches, 1)
    for w in warnings:
        print(w, file=sys.stderr)
    seconds = time.perf_counter() - t0
    print(
        f"# {len(hessians)} Hessians from {args.calibration_batches} batches in {seconds:.1f}s",
        file=sys.stderr,
    )
    config = train_gpt.stored_knobs(h.model)
    shapes, rows = {n: list(t.shape) for n, t in train_gpt.artifact_state(model).items()}, []
    for bits in args.bits:
        for scheme, (method, lqer) in SCHEMES.items():
            hq = scheme_config(h, bits, args.embed_bits, method, lqer, "zstd")
            entries, err = quantize(model, hq, hessians, args.only)
            blob = train_gpt.serialize_artifact(entries, config, shapes, "zstd", 22)
            rows.append(
                dict(
                    scheme=f"{scheme}/zstd",
                    bits=bits,
                    bytes=len(blob),
                    pre_quant_val_bpb=pre,
                    rel_sq_error=err,
                    val_bpb=round_trip_bpb(model, entries, shapes, evaluate),
                )
            )
        for (
            compressor
        ) in train_gpt.COMPRESSORS:  # the same integers as the last scheme: only the bytes differ
            if compressor != "zstd" and not train_gpt.compressor_missing(compressor):
                blob = train_gpt.serialize_artifact(entries, config, shapes, compressor, 22)
                rows.append(dict(rows[-1], scheme=f"gptq+lqer/{compressor}", bytes=len(blob)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument(
        "--bits",
        type=lambda v: [int(b) for b in v.split(",")],
        default=[6],
        help="MATRIX_BITS, or a comma-separated list (default 6)",
    )
    parser.add_argument("--embed-bits", type=int, default=0, help="EMBED_BITS (default bits + 1)")
    parser.add_argument("--val-token-limit", type=int, default=0)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument(
        "--seq-len", type=int, default=1024, help="calibration and evaluation window (use the run's)"
    )
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per calibration batch")
    parser.add_argument("--only", choices=("mlp", "attn", "embed", "bigram"), default="")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        rows = study(args)
    except (train_gpt.ConfigError, train_gpt.DataError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    only = f" (only {args.only} quantized)" if args.only else ""
    print(f"pre-quant val_bpb {rows[0]['pre_quant_val_bpb']:.5f}{only}")
    print(f"{'bits':>4} {'scheme':<20} {'bytes':>10} {'val_bpb':>10} {'gap':>9} {'rel sq err':>11}")
    for r in rows:
        print(
            f"{r['bits']:>4} {r['scheme']:<20} {r['bytes']:>10} {r['val_bpb']:>10.5f} "
            f"{r['val_bpb'] - r['pre_quant_val_bpb']:>+9.5f} {r['rel_sq_error']:>11.3e}"
        )


if __name__ == "__main__":
    main()
