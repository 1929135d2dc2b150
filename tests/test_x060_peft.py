"""LoRA, PiSSA, DiSHA and int8/nf4 bases on an RWKV-6 (x060) model: train, save, merge, reload."""
import pytest
import torch

from rwkvray.model.checkpoint import load_checkpoint
from rwkvray.spec import PeftConfig
from rwkvray.peft.merge import merge_adapter
from rwkvray.model.rwkv import load_model
from rwkvray.peft import build_peft
from tests.helpers import (PEFT_CONFIGS, PEFT_TARGETS, TINY_X060, random_model, saved_base, token_batch,
                           train_steps)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return saved_base(tmp_path_factory, random_model(TINY_X060), "x060.pth")


@pytest.fixture(scope="module")
def batch():
    return token_batch(TINY_X060.vocab_size)


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_weight_methods_train_and_merge_on_x060(name, base_path, batch, tmp_path):
    base, _ = load_model(base_path)
    model = build_peft(base, PeftConfig.model_validate(PEFT_CONFIGS[name]))
    losses = train_steps(model, batch, steps=6)
    assert losses[-1] < 0.75 * losses[0], losses
    adapter, merged_path = str(tmp_path / "adapter.pth"), str(tmp_path / "merged.pth")
    model.methods[0].save(adapter)
    merged_keys = merge_adapter(PEFT_CONFIGS[name]["method"], base_path, adapter, merged_path)
    assert merged_keys == [f"blocks.{i}.{t}.weight" for i in range(TINY_X060.n_layer) for t in PEFT_TARGETS]
    assert load_checkpoint(merged_path).dims == TINY_X060
    merged, _ = load_model(merged_path)
    x = batch[0]
    with torch.no_grad():
        expected = model.base(x, model.initial_state(x.shape[0]))[0]
        got = merged(x)[0]
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("peft", [
    {"method": "state", "quant": "int8"},
    {"method": "lora", "quant": "nf4", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}},
], ids=["state-int8", "qlora-nf4"])
def test_quantized_x060_base_trains_with_all_eight_block_linears_quantized(peft, batch):
    pytest.importorskip("bitsandbytes")
    model = build_peft(random_model(TINY_X060), PeftConfig.model_validate(peft))
    names = [f"blocks.{i}.{t}" for i in range(TINY_X060.n_layer)
             for t in PEFT_TARGETS + ("att.gate", "ffn.receptance")]
    layers = [model.base.get_submodule(name) for name in names]
    layers = [layer.base_layer if hasattr(layer, "base_layer") else layer for layer in layers]
    assert {type(layer).__name__ for layer in layers} == {"Linear8bitLt" if peft["quant"] == "int8" else "Linear4bit"}
    losses = train_steps(model, batch, steps=4)
    assert losses[-1] < losses[0] - (0.01 if peft["method"] == "state" else 0.5), losses
