"""An artifact evaluated by a record folder's own train_gpt.py on one process: the quick check pack
stores and verify repeats, and the evaluation calls the legality probes make."""

from __future__ import annotations

import dataclasses
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
    """A folder's own `ttt_evaluate` on one process, whichever of its three signatures the script has."""
    rt = quiet_runtime(script, device)
    if rt is None:
        return script.ttt_evaluate(
            model, h, tokens, tables, device, token_losses=token_losses, log=lambda _: None
        )
    if dataclasses.is_dataclass(h):  # a configuration in frozen groups: the groups TTT reads
        return script.ttt_evaluate(model, h.evaluation, h.run, tokens, tables, rt, token_losses)
    return script.ttt_evaluate(model, h, tokens, tables, rt, token_losses)


def script_value(h, name: str):
    """A knob's value in a folder script's configuration: one namespace (older scripts) or frozen groups."""
    if not dataclasses.is_dataclass(h):
        return getattr(h, name)
    return next(getattr(g, name) for g in vars(h).values() if hasattr(g, name))


def with_script_values(h, values: dict):
    """A folder script's configuration with these knobs' values (lower-case names; unknown ones ignored): set
    on one namespace (older scripts), or new frozen groups."""
    if not dataclasses.is_dataclass(h):
        vars(h).update({k: v for k, v in values.items() if k in vars(h)})
        return h
    changed = {}
    for name, group in vars(h).items():
        mine = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(group)}}
        if mine:
            changed[name] = dataclasses.replace(group, **mine)
    return dataclasses.replace(h, **changed)


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
    vocab_size = script_value(h, "vocab_size")
    tables = script.byte_tables(script.load_tokenizer(tokenizer, vocab_size))
    tokens = script.load_val_tokens(data, vocab_size, token_limit)
    val_loss, val_bpb = script_evaluate(script, model.logits, tokens, tables, windows, dev)
    tokens_sha = hashlib.sha256(tokens.numpy().astype("<u2").tobytes()).hexdigest()
    return EvalResult(val_loss, val_bpb, tokens_sha, sha256_file(tokenizer))
