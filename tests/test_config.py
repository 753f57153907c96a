"""The run configuration: knobs read once into frozen groups; each function receives the groups it reads."""

import ast
import dataclasses

import pytest

import train_gpt as tg
from conftest import REPO


def whole_config_parameters() -> dict[str, list[str]]:
    """{function (Class.method for methods): its parameters named `h` or annotated Config} in train_gpt.py."""
    tree = ast.parse((REPO / "train_gpt.py").read_text())
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                whole = [
                    a.arg
                    for a in params
                    if a.arg == "h" or (a.annotation is not None and ast.unparse(a.annotation) == "Config")
                ]
                if whole:
                    found[f"{prefix}{child.name}"] = whole
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return found


def test_only_the_named_entry_points_receive_the_whole_config():
    found = whole_config_parameters()
    assert sorted(set(found) - set(tg.WHOLE_CONFIG_READERS)) == []  # any other function: give it its groups
    # the list names functions that exist and take the config (main loads its own)
    assert sorted(set(tg.WHOLE_CONFIG_READERS) - set(found)) == ["main"]


def test_every_knob_lives_in_one_group_with_the_declared_derived_values():
    h = tg.load_config({})
    for name, cls in tg.GROUP_CLASSES.items():
        knobs = [k.name.lower() for k in tg.KNOB_ROWS.values() if k.group == name]
        assert [f.name for f in dataclasses.fields(cls)] == knobs + list(tg.DERIVED_FIELDS.get(name, {}))
        assert isinstance(getattr(h, name), cls)
    for derived in tg.DERIVED_FIELDS.values():
        for _, sources in derived.values():
            assert set(sources) <= set(tg.KNOB_ROWS)
    model_fields = {f.name for f in dataclasses.fields(tg.ModelConfig)}
    for knob in tg.KNOB_ROWS.values():
        assert knob.group in (*tg.CONFIG_GROUPS, "model"), knob.name
        if knob.group == "model" or knob.model:  # the artifact's knobs are read from the model contract
            assert knob.name.lower() in model_fields, knob.name
    assert list(tg.knob_values(h)) == list(tg.KNOBS)
    assert tg.stored_knobs(h.model) == tg.knob_values(h, tg.MODEL_KNOBS)


def test_derived_values_are_computed_once_at_load():
    h = tg.load_config(
        {"TRAIN_BATCH_TOKENS": "65536", "MAX_WALLCLOCK_SECONDS": "100", "GPTQ_RESERVE_SECONDS": "7"}
    )
    assert h.data.micro_batch_tokens == 8192 and "TRAIN_BATCH_TOKENS=65536 / 8" in h.data.micro_batch_source
    assert h.optim.calibration_reserve_seconds == 7 and h.optim.train_wallclock_seconds == 93
    assert h.quant.calibrate and h.evaluation.eval_seq_len == h.data.train_seq_len
    assert h.run.moe_dispatch_given is False
    assert tg.load_config({"MOE_MODE": "topk", "MOE_DISPATCH": "grouped"}).run.moe_dispatch_given is True


def test_the_config_is_frozen_and_changed_only_by_replacement():
    h = tg.load_config({})
    for target in (h, h.data, h.optim, h.quant, h.evaluation, h.run, h.model):
        first = dataclasses.fields(target)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, first, None)
    named = dataclasses.replace(h, run=dataclasses.replace(h.run, run_id="x"))
    assert (named.run.run_id, h.run.run_id) == ("x", "") and named.data is h.data
