"""int8 / nf4 frozen bases with bitsandbytes, on the CPU backend (bitsandbytes >= 0.48 runs both on a CPU).

Error bounds, measured on the tiny random model (2 layers, C=128, 12 quantized Linears, logits compared with the
bf16 model's as ||q - ref|| / ||ref||): int8 about 1.4%, asserted < 3%; nf4 about 14%, asserted < 25%.
(A single random Linear: int8 about 0.5%, nf4 about 9%; the model compounds twelve of them.)
"""
import sys

import pytest
import torch

from rwkvray.spec import PeftConfig
from rwkvray.errors import UserError
from rwkvray.peft import build_peft
from rwkvray.model.quant import frozen_weight, quantize_frozen_linears
from tests.helpers import TINY, random_model, train_steps

TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
ALL_LINEARS = [f"blocks.{i}.{t}" for i in range(TINY.n_layer) for t in TARGETS]


def bitsandbytes_or_skip():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        pytest.skip(f"bitsandbytes is not installed here ({err}); the quantized forward cannot be tested")


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:], torch.ones(2, 32)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind, bound, storage", [("int8", 0.03, torch.int8), ("nf4", 0.25, torch.uint8)])
def test_quantized_forward_stays_close_to_bf16(kind, bound, storage, batch):
    bitsandbytes_or_skip()
    reference, _ = random_model(dtype=torch.bfloat16)(batch[0])
    model = random_model(dtype=torch.bfloat16)
    assert quantize_frozen_linears(model, kind) == ALL_LINEARS
    with torch.no_grad():
        logits, _ = model(batch[0])
    assert logits.dtype == torch.bfloat16
    assert 0.002 < relative_error(logits, reference) < bound  # quantized for real, and still close
    weight = model.blocks[0].ffn.key.weight
    assert weight.dtype == storage
    assert weight.numel() * weight.element_size() == 4 * 128 * 128 // (1 if kind == "int8" else 2)  # bytes
    assert model.head.weight.dtype == torch.bfloat16


def test_nf4_forward_is_the_dense_forward_of_its_dequantized_weights(batch):
    bitsandbytes_or_skip()
    quantized = random_model()
    quantize_frozen_linears(quantized, "nf4")
    dense = random_model()
    with torch.no_grad():
        for name in ALL_LINEARS:
            dense.get_submodule(name).weight.copy_(frozen_weight(quantized.get_submodule(name)))
        assert relative_error(quantized(batch[0])[0], dense(batch[0])[0]) < 1e-5


@pytest.mark.parametrize("peft", [
    {"method": "state", "quant": "int8"},
    {"method": "lora", "quant": "nf4", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}},
    {"method": "lora", "quant": "int8", "combine_state": True, "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}},
    {"method": "disha", "quant": "nf4", "disha": {"mode": "bat", "r": 16}},
    {"method": "disha", "quant": "int8", "disha": {"mode": "bat", "r": 16}},
], ids=["state-int8", "qlora-nf4", "state+lora-int8", "bat-nf4", "bat-int8"])
def test_quantized_base_trains_and_stays_frozen(peft, batch):
    bitsandbytes_or_skip()
    model = build_peft(random_model(), PeftConfig.model_validate(peft))
    quantized = {name: model.base.get_submodule(name) for name in ALL_LINEARS}
    quantized = {name: module.base_layer if hasattr(module, "base_layer") else module
                 for name, module in quantized.items()}
    expected_class = "Linear8bitLt" if peft["quant"] == "int8" else "Linear4bit"
    assert {type(m).__name__ for m in quantized.values()} == {expected_class}
    before = {name: m.weight.data.clone() for name, m in quantized.items()}
    losses = train_steps(model, batch, steps=4)
    assert losses[-1] < losses[0] - (0.01 if peft["method"] == "state" else 0.5), losses
    assert all(torch.equal(before[name], m.weight.data) for name, m in quantized.items())


def test_pissa_quantizes_the_residual_not_the_full_weight():
    bitsandbytes_or_skip()
    reference = random_model()
    model = build_peft(random_model(), PeftConfig.model_validate({"method": "pissa", "quant": "int8",
                                                                   "pissa": {"r": 4, "svd_niter": 2}}))
    layer = model.base.blocks[0].att.key
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = reference.blocks[0].att.key.weight.detach()
    assert relative_error(frozen_weight(layer.base_layer) + B @ A, W) < 0.01


def test_quant_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(UserError) as err:
        build_peft(random_model(), PeftConfig.model_validate({"method": "state", "quant": "nf4"}))
    assert str(err.value) == "peft.quant: nf4 needs bitsandbytes, which is not installed (pip install bitsandbytes)"


def test_unknown_quant_kind_is_refused():
    with pytest.raises(UserError) as err:
        quantize_frozen_linears(random_model(), "fp8")
    assert str(err.value) == "peft.quant: unknown kind 'fp8' (expected none, int8 or nf4)"


def test_a_backend_that_cannot_run_the_kind_is_a_clear_error(monkeypatch):
    bitsandbytes_or_skip()
    import bitsandbytes

    def no_kernel(self, x):
        raise NotImplementedError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bitsandbytes.nn.Linear4bit, "forward", no_kernel)
    with pytest.raises(UserError) as err:
        quantize_frozen_linears(random_model(), "nf4")
    assert str(err.value) == (f"peft.quant: bitsandbytes {bitsandbytes.__version__} cannot run nf4 on cpu: "
                              "no kernel for this device")
