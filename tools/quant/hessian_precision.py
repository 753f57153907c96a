"""How precise must GPTQ's Hessian accumulation be? The same trained checkpoint quantized three times, its
Hessians summed from inputs at fp32 (exact), rounded to TF32 (10 mantissa bits, what a GPU's TF32 matmul
reads) and rounded to bf16 (8 bits: a bf16 matmul with fp32 sums), each artifact read back and evaluated.

    python3 -m tools.quant.hessian_precision CHECKPOINT_fp.pt KEY=VALUE ...   # the run's knobs (shape, data)

The rounding is emulated on the CPU (inputs rounded, products and sums in fp32), as the GPU kernels do it.
Prints, per precision: the Hessians' relative difference from exact, the share of stored integers that
differ from the exact run's, the artifact's bytes and the round-trip val_loss / val_bpb.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from tools.common import import_trainer

train_gpt = import_trainer()


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 x rounded to `bits` explicit mantissa bits (round half to even on the dropped bits)."""
    if bits >= 23:
        return x
    drop = 23 - bits
    i = x.float().contiguous().view(torch.int32)
    half = (1 << (drop - 1)) - 1 + ((i >> drop) & 1)  # ties to even
    return ((i + half) & ~((1 << drop) - 1)).view(torch.float32)


def hessians_at(model, batches, bits: int) -> dict:
    addmm = torch.Tensor.addmm_

    def rounded(t, a, b, **kwargs):
        return addmm(t, round_mantissa(a, bits), round_mantissa(b, bits), **kwargs)

    torch.Tensor.addmm_ = rounded
    try:
        with train_gpt.exact_fp32_matmuls():
            return train_gpt.collect_hessians(model, batches, 1)[0]
    finally:
        torch.Tensor.addmm_ = addmm


def main(argv: list[str]) -> int:
    checkpoint, env = argv[0], dict(item.split("=", 1) for item in argv[1:])
    h = train_gpt.load_config(env)
    saved = torch.load(checkpoint, map_location="cpu")
    model = train_gpt.GPT(h.model)
    model.load_state_dict(saved["state"])
    model.eval()
    loader = train_gpt.TrainLoader(
        train_gpt.check_shards(train_gpt.shard_files(h.data.data_path, "train"), h.data.vocab_size),
        0,
        1,
        h.data.train_seq_len,
        h.data.micro_batch_tokens,
        1,
        torch.device("cpu"),
        h.data.vocab_size,
    )
    batches = [loader.next_step()[0] for _ in range(h.quant.gptq_calibration_batches)]
    rt = train_gpt.Runtime(0, 1, torch.device("cpu"), lambda *a, **k: None)
    rt.log.event = lambda *a, **k: None
    val = train_gpt.load_validation(h.data, h.evaluation, rt.log)
    spec = train_gpt.WindowSpec(h.evaluation.eval_seq_len, 0, h.evaluation.eval_batch_seqs)
    rows, exact, exact_q = [], None, None
    for name, bits in (("fp32", 23), ("tf32", 10), ("bf16", 7)):
        hess = hessians_at(model, batches, bits)
        exact = exact or hess
        diff = max(((hess[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact)
        path = str(Path(tempfile.mkdtemp()) / f"{name}.ptz")
        with train_gpt.exact_fp32_matmuls():
            size = train_gpt.export_artifact(model, h.quant, path, train_gpt.code_bytes(), rt.log, hess)
        _, state = train_gpt.unpack_artifact(path)
        ints = {k: tensors[0] for k, (bits, tensors) in state.items() if bits < 16}  # integers first
        exact_q = exact_q or ints
        differ = sum((ints[k] != exact_q[k]).sum().item() for k in ints if k in exact_q)
        total = sum(exact_q[k].numel() for k in exact_q)
        qmodel = train_gpt.load_artifact_model(path, torch.device("cpu"))[0].eval()
        loss, bpb = train_gpt.evaluate(qmodel.logits, val.tokens, val.tables, spec, rt)
        rows.append(
            dict(
                accumulation=name,
                hessian_max_rel_diff=diff,
                integers_changed=differ / max(total, 1),
                artifact_bytes=size,
                val_loss=loss,
                val_bpb=bpb,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
