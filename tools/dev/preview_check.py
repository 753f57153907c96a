"""Budget preview against the written artifact at the 1.0611 record's shape (11L 512d MLP 4x, vocab 8192,
tied embedding, no BigramHash: 35.9M parameters), briefly trained on the sample corpus on CPU.

    python3 -m tools.dev.preview_check [STEPS]      # from the repository root; ~15 minutes on a busy CPU

Prints, per compressor, the preview, the written size and the error; then the same for gptq+lqer.
Artifacts go to /tmp/qs/rec_*.ptz.
"""

import os
import sys
import time

import torch

from tools.common import REPO, import_trainer


def main(argv: list[str] | None = None) -> int:
    """Trains the record-shaped model for STEPS steps (default 3), then prints each preview against the
    written size."""
    args = sys.argv[1:] if argv is None else argv
    steps = int(args[0]) if args else 3
    tg = import_trainer()
    torch.set_num_threads(1)
    os.makedirs("/tmp/qs", exist_ok=True)
    env = {
        "DATA_PATH": str(REPO / "data" / "sample"),
        "VOCAB_SIZE": "8192",
        "NUM_LAYERS": "11",
        "MODEL_DIM": "512",
        "MLP_MULT": "4",
        "MLP_ACT": "leaky_relu2",
        "MOE_MODE": "none",
        "BIGRAM_VOCAB_SIZE": "0",
        "TRAIN_SEQ_LEN": "256",
        "TRAIN_BATCH_TOKENS": "4096",
        "MICRO_BATCH_TOKENS": "4096",
        "ITERATIONS": str(steps),
        "MAX_WALLCLOCK_SECONDS": "0",
        "WARMUP_STEPS": "0",
        "COMPILE": "0",
        "TRAIN_LOG_EVERY": "1",
        "EMA_DECAY": "0",
    }
    h = tg.load_config(env)
    torch.manual_seed(0)
    tr = tg.Trainer(h, tg.Runtime(0, 1, torch.device("cpu"), tg.Logger(None)))
    print("params", sum(p.numel() for p in tr.model.parameters()), flush=True)
    t0 = time.time()
    tr.run(lambda s: None)
    print(f"trained {steps} steps in {time.time() - t0:.0f}s", flush=True)
    model = tr.model.eval()
    for compressor in ("brotli", "zstd", "lzma"):
        hc = tg.load_config({**env, "COMPRESSOR": compressor, "QUANT_METHOD": "rtn", "LQER_ENABLED": "0"})
        est, per = tg.estimate_artifact_bytes(model, hc.quant)
        t0 = time.time()
        real = tg.export_artifact(model, hc.quant, f"/tmp/qs/rec_{compressor}.ptz", 0, print)
        error = 100 * (est - real) / real
        seconds = time.time() - t0
        print(
            f"{compressor} rtn: preview {est} real {real} error {error:+.2f}% ({seconds:.0f}s) {per}",
            flush=True,
        )
    batches = [tr.loader.next_step()[0] for _ in range(2)]
    t0 = time.time()
    hess, _ = tg.collect_hessians(model, batches, 1)
    print(f"hessians {time.time() - t0:.0f}s", flush=True)
    hc = tg.load_config({**env, "COMPRESSOR": "brotli"})
    est, per = tg.estimate_artifact_bytes(model, hc.quant)
    t0 = time.time()
    real = tg.export_artifact(model, hc.quant, "/tmp/qs/rec_gptq.ptz", 0, print, hess)
    error = 100 * (est - real) / real
    print(
        f"brotli gptq+lqer: preview {est} real {real} error {error:+.2f}% ({time.time() - t0:.0f}s) {per}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
