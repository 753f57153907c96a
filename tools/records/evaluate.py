"""An artifact evaluated by a record folder's own train_gpt.py on one process: the quick check pack
stores and verify repeats, and the evaluation calls the legality probes make."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tools.common import sha256_file


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    val_tokens_sha256: str
    tokenizer_sha256: str


def quiet_runtime(script, device):
    """The script's one-process Runtime with a silent log, or None for a script older than Runtime (its
    evaluation functions took the device, rank and world size as separate arguments)."""
    runtime = getattr(script, "Runtime", None)
    return runtime(0, 1, device, lambda _msg: None) if runtime is not None else None


def script_evaluate(
    script, logits_fn, tokens, tables, windows: tuple[int, int, int], device, token_losses=None
):
    """A folder's own `evaluate` on one process, whichever of its two signatures the script has.
    windows: (seq_len, stride, batch_seqs)."""
    rt = quiet_runtime(script, device)
    if rt is None:
        return script.evaluate(logits_fn, tokens, tables, *windows, device, token_losses=token_losses)
    return script.evaluate(logits_fn, tokens, tables, script.WindowSpec(*windows), rt, token_losses)


def script_ttt_evaluate(script, model, h, tokens, tables, device, token_losses):
    """A folder's own `ttt_evaluate` on one process, whichever of its two signatures the script has."""
    rt = quiet_runtime(script, device)
    if rt is None:
        return script.ttt_evaluate(
            model, h, tokens, tables, device, token_losses=token_losses, log=lambda _: None
        )
    return script.ttt_evaluate(model, h, tokens, tables, rt, token_losses)


def evaluate_artifact(
    script,
    artifact: str | Path,
    data: str,
    tokenizer: str,
    token_limit: int,
    windows: tuple[int, int, int],
    device: str,
) -> EvalResult:
    """val_loss/val_bpb of an artifact rebuilt by `script` (a loaded train_gpt module) on the first
    token_limit validation tokens (0: all), in windows (seq_len, stride, batch_seqs), plus hashes that
    identify the data the numbers came from."""
    import torch  # only pack and verify need torch; compare stays light

    dev = torch.device(device)
    model, h = script.load_artifact_model(str(artifact), dev)
    model.eval()
    tables = script.byte_tables(script.load_tokenizer(tokenizer, h.vocab_size))
    tokens = script.load_val_tokens(data, h.vocab_size, token_limit)
    val_loss, val_bpb = script_evaluate(script, model.logits, tokens, tables, windows, dev)
    tokens_sha = hashlib.sha256(tokens.numpy().astype("<u2").tobytes()).hexdigest()
    return EvalResult(val_loss, val_bpb, tokens_sha, sha256_file(tokenizer))
