"""CUDA dtype paths without a GPU: the default-shape model traced on a fake `cuda` device with CUDA autocast
(bf16) forced on (tools/gpu/gpu_memory.py has the helpers). On a CPU, train_gpt's autocast() is a null
context, so only such a trace sees the dtypes a GPU run gets: e.g. square() (aten::pow) runs in fp32 under
CUDA autocast, and grouped_mm, which has no autocast kernel, rejects an fp32 operand.

To add a configuration to the matrix, add its knob overrides to MATRIX (one dict per case)."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily
from torch.utils._pytree import tree_flatten

import train_gpt
from tools.gpu import gpu_memory
from tools.common import SIGMA_MOE

# Every MLP mode and dispatch at the default shape (11 x 512, 98,304 tokens per micro-batch); each case is
# traced with the layer loops off and on.
MATRIX = [
    {"MOE_MODE": "none"},
    {"MOE_MODE": "soft"},
    {"MOE_MODE": "topk", "TOP_K": "1", "MOE_DISPATCH": "grouped"},
    {"MOE_MODE": "topk", "TOP_K": "2", "MOE_DISPATCH": "grouped"},
    {"MOE_MODE": "topk", "TOP_K": "1", "MOE_DISPATCH": "capacity"},
    {"MOE_MODE": "topk", "TOP_K": "2", "MOE_DISPATCH": "capacity"},
    {"MOE_MODE": "shared_routed", "MOE_DISPATCH": "grouped"},
    {"MOE_MODE": "shared_routed", "MOE_DISPATCH": "capacity"},
    # Per-pass routers in the looped layers only (the rest dense), soft and routed.
    {"MOE_MODE": "soft", "MOE_LAYERS": "3,4,5", "ROUTER_PER_PASS": "1"},
    {
        "MOE_MODE": "topk",
        "TOP_K": "2",
        "MOE_DISPATCH": "grouped",
        "MOE_LAYERS": "3,4,5",
        "ROUTER_PER_PASS": "1",
    },
    # sigma-MoE: 16 experts of 128, top-4 sigmoid, entropy regulariser and expert dropout (training forward)
    SIGMA_MOE,
    # Plain causal rows of TRAIN_SEQ_LEN (every case above isolates documents, the default).
    {"MOE_MODE": "none", "RESPECT_DOC_BOUNDARIES": "0"},
    {"MOE_MODE": "topk", "TOP_K": "2", "MOE_DISPATCH": "grouped", "RESPECT_DOC_BOUNDARIES": "0"},
]
FLEX_ATTENTION = train_gpt.flex_attention
MATMULS = {"aten.mm.default", "aten.bmm.default", "aten.addmm.default", "aten._grouped_mm.default"}


def case_id(env: dict) -> str:
    return "-".join(f"{k.lower()}={v}" for k, v in env.items())


class MatmulDtypes(TorchDispatchMode):
    """Records (op, input dtypes, input shapes) of every matrix product that runs, and of flex_attention
    (called with this mode set aside: flex_attention runs its operator under torch.compile, which no
    dispatch mode may watch)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in MATMULS:
            flat = tree_flatten(args)[0]  # the matrices; not grouped_mm's int32 group offsets
            tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self.calls.append((str(func), [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))

    def flex_attention(self, q, k, v, **kwargs):
        """Records the output's dtype: flex_attention casts its inputs under autocast itself (rms_norm leaves
        q and k in fp32)."""
        with _pop_mode_temporarily():
            out = FLEX_ATTENTION(q, k, v, **kwargs)
        self.calls.append(("flex_attention", [out.dtype], [tuple(q.shape), tuple(k.shape), tuple(v.shape)]))
        return out


def fake_cuda_forward(env: dict, looping: bool, monkeypatch):
    """The training forward of one default-shape micro-batch on fake CUDA under bf16 autocast, as training
    lays it out (one packed row with document-isolated attention: the flex_attention path). flex_attention
    builds its backward graph on a real device, so that path's forward is traced without autograd."""
    h = train_gpt.load_config(env)
    matmuls = MatmulDtypes()
    monkeypatch.setattr(train_gpt, "flex_attention", matmuls.flex_attention)
    no_autograd = torch.no_grad() if h.data.respect_doc_boundaries else contextlib.nullcontext()
    with FakeTensorMode(), gpu_memory.cuda_autocast_without_gpu(), no_autograd:
        model = train_gpt.fake_model(h.model, "cuda").train()
        model.set_looping(looping)
        x = torch.zeros(train_gpt.train_rows(h.data), dtype=torch.long, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16), matmuls:
            assert torch.is_autocast_enabled("cuda")  # the patch works: autocast is really on
            loss, ce = model(x, x, doc_span=h.data.train_seq_len)
    return h, loss, ce, matmuls.calls


# Loops on runs every layer and the looped passes too: loops off runs with the slow tests.
@pytest.mark.parametrize(
    "looping", [pytest.param(False, marks=pytest.mark.slow), True], ids=["loops_off", "loops_on"]
)
@pytest.mark.parametrize("env", MATRIX, ids=case_id)
def test_fake_cuda_forward(env, looping, monkeypatch):
    h, loss, ce, calls = fake_cuda_forward(env, looping, monkeypatch)
    assert loss.device.type == "cuda" and loss.dtype == ce.dtype == torch.float32 and loss.shape == ()
    assert {op for op, _, _ in calls} >= {"aten.mm.default"}
    # Every product runs in bf16 except the routers (fp32 by design: autocast off, output width E) and the
    # math attention fallback a CPU-side trace picks (fp32 bmm over (B*H, T, T) scores).
    for op, dtypes, shapes in calls:
        router = (
            op == "aten.mm.default"
            and shapes[0][-1] == h.model.model_dim
            and shapes[1] == (h.model.model_dim, h.model.num_experts)
        )
        attention_math = op == "aten.bmm.default" and shapes[0][-2] == h.data.train_seq_len
        if not (router or attention_math):
            assert set(dtypes) == {torch.bfloat16}, (op, dtypes, shapes)
    # Document isolation runs flex_attention (one packed row) in every layer pass; plain rows run SDPA.
    flex = [shapes for op, _, shapes in calls if op == "flex_attention"]
    passes = len(train_gpt.fake_model(h.model, "meta").orders[looping])
    assert len(flex) == (passes if h.data.respect_doc_boundaries else 0)
    assert all(s[0] == (1, h.model.num_heads, h.data.micro_batch_tokens, h.model.head_dim) for s in flex)
    if h.model.moe_mode in ("topk", "shared_routed") and h.model.moe_dispatch == "grouped":
        grouped = [d for op, d, _ in calls if op == "aten._grouped_mm.default"]
        passes = len(h.model.moe_layer_ids) + (
            h.model.num_loops * (h.model.loop_end - h.model.loop_start + 1) if looping else 0
        )
        assert len(grouped) == 2 * passes and all(d[0] == d[1] == torch.bfloat16 for d in grouped)


# --- the joint forward+backward: fake CPU tensors under CPU autocast with CUDA's fp32 rules --------------
# (the autograd engine cannot run on a fake CUDA device without a driver; the emulation is checked first)


def cuda_like_cpu_autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# Grouped top-2 in the inner loop; the other dispatches with the slow tests.
@pytest.mark.parametrize(
    "env",
    [
        pytest.param(MATRIX[0], marks=pytest.mark.slow),
        pytest.param(MATRIX[1], marks=pytest.mark.slow),
        MATRIX[3],
        pytest.param(MATRIX[7], marks=pytest.mark.slow),
    ],
    ids=case_id,
)
def test_cpu_emulation_saves_exactly_what_fake_cuda_saves(env, monkeypatch):
    h = train_gpt.load_config({**env, "MICRO_BATCH_TOKENS": "8192"})
    with gpu_memory.cuda_autocast_without_gpu():
        cuda = train_gpt.saved_activations(h.model, h.data, "cuda", looping=True)
    monkeypatch.setattr(train_gpt, "autocast", cuda_like_cpu_autocast)  # train_gpt's CPU autocast is off
    with gpu_memory.cpu_autocast_like_cuda():
        cpu = train_gpt.saved_activations(h.model, h.data, "cpu", looping=True)
    assert cpu == cuda and cuda["bfloat16"] > 0 and cuda["float32"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("looping", [False, True], ids=["loops_off", "loops_on"])
@pytest.mark.parametrize("env", MATRIX, ids=case_id)
def test_fake_forward_and_backward(env, looping):
    h = train_gpt.load_config(env)
    with FakeTensorMode(), gpu_memory.cpu_autocast_like_cuda():
        model = train_gpt.fake_model(h.model, "cpu").train()
        model.set_looping(looping)
        x = torch.zeros(train_gpt.train_rows(h.data), dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(x, x, doc_span=h.data.train_seq_len)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, name


@pytest.mark.slow
def test_compiled_partition_traces_a_routed_model_and_saves_less_than_eager():
    h = train_gpt.load_config(
        {
            **MATRIX[3],
            "NUM_LAYERS": "4",
            "LOOP_START": "1",
            "LOOP_END": "1",
            "PARALLEL_START_LAYER": "3",
            "MICRO_BATCH_TOKENS": "8192",
        }
    )
    compiled = gpu_memory.compiled_saved_activations(h, looping=True)
    with gpu_memory.cuda_autocast_without_gpu():
        eager = train_gpt.saved_activations(h.model, h.data, "cuda", looping=True)
    assert 0 < sum(compiled.values()) < 0.8 * sum(eager.values())
