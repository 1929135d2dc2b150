"""LoRA, PiSSA and DiSHA (bone, bat) on a tiny random model: training, frozen base, adapter files, merge, errors."""
import os
import sys

import pytest
import torch

from rwkvray.model.checkpoint import load_checkpoint, save_checkpoint
from rwkvray.spec import PeftConfig, spec_from_dict
from rwkvray.errors import UserError
from rwkvray.model.init import default_dims
from rwkvray.peft.merge import merge_adapter
from rwkvray.model.rwkv import load_model
from rwkvray.peft import build_peft
from rwkvray.peft.registry import METHODS, method_classes
from tests.helpers import PEFT_CONFIGS, PEFT_TARGETS, SAMPLE, TINY, random_model, train_steps, two_step_run_spec

C = TINY.n_embd
SHAPES = {"att.receptance": (C, C), "att.key": (C, C), "att.value": (C, C), "att.output": (C, C),
          "ffn.key": (4 * C, C), "ffn.value": (C, 4 * C)}  # [out, in]


def peft_spec(name, **extra):
    return PeftConfig.model_validate({**PEFT_CONFIGS[name], **extra})


def frozen_tensors(model):
    """The base's non-trainable tensors under their BlinkDL names (an adapter layer keeps W as base_layer.weight)."""
    trainable = {id(p) for p in model.trainable_parameters()}
    return {name.replace(".base_layer", ""): p.detach().clone() for name, p in model.base.named_parameters()
            if id(p) not in trainable}


def logits(model, x):
    with torch.no_grad():
        return model.base(x, model.initial_state(x.shape[0]))[0]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_training_moves_only_the_adapter_and_the_merge_reproduces_it(name, base_path, batch, tmp_path):
    base, _ = load_model(base_path)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = build_peft(base, peft_spec(name))
    frozen_before = frozen_tensors(model)
    trainable_before = [p.detach().clone() for p in model.trainable_parameters()]

    losses = train_steps(model, batch, steps=6)

    assert losses[-1] < 0.75 * losses[0], losses
    assert all(torch.equal(frozen_before[k], v) for k, v in frozen_tensors(model).items())
    assert all(not torch.equal(a, p) for a, p in zip(trainable_before, model.trainable_parameters()))
    weights = {f"blocks.{i}.{t}.weight" for i in range(TINY.n_layer) for t in PEFT_TARGETS}
    residuals = weights if name == "pissa" else set()
    assert all(torch.equal(original[k], v) for k, v in frozen_before.items() if k not in residuals)
    assert set(frozen_before) == set(original)

    adapter = str(tmp_path / "adapter.pth")
    model.methods[0].save(adapter)
    merged_path = str(tmp_path / "merged.pth")
    kind = PEFT_CONFIGS[name]["method"]
    assert merge_adapter(kind, base_path, adapter, merged_path) == [f"blocks.{i}.{t}.weight"
                                                                     for i in range(TINY.n_layer) for t in PEFT_TARGETS]
    assert load_checkpoint(merged_path).dims == TINY
    merged, _ = load_model(merged_path)
    x = batch[0]
    assert relative_error(merged(x)[0].detach(), logits(model, x)) < 1e-5


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_adapter_file_uses_rwkv_peft_key_names_and_shapes(name, base_path, tmp_path):
    base, _ = load_model(base_path)
    model = build_peft(base, peft_spec(name))
    path = str(tmp_path / "adapter.pth")
    model.methods[0].save(path)
    saved = torch.load(path, weights_only=True)
    r = 4 if name in ("lora", "pissa") else 16
    expected = {}
    for i in range(TINY.n_layer):
        for target, (out_features, in_features) in SHAPES.items():
            prefix = f"blocks.{i}.{target}"
            if name in ("lora", "pissa"):
                parts = ("", "init_") if name == "pissa" else ("",)
                for init in parts:
                    expected[f"{prefix}.{init}lora_A"] = (r, in_features)
                    expected[f"{prefix}.{init}lora_B"] = (out_features, r)
            else:
                expected[f"{prefix}.disha"] = (r, out_features) if name == "bone" else (in_features // r, r, r)
    if name == "lora":
        expected["lora_alpha"] = ()
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.dtype == torch.float32 for v in saved.values())
    if name == "lora":
        assert saved["lora_alpha"].item() == 8.0


def test_pissa_initialised_model_equals_the_base(base_path, batch):
    reference, _ = load_model(base_path)
    base, _ = load_model(base_path)
    model = build_peft(base, peft_spec("pissa"))
    x = batch[0]
    assert relative_error(logits(model, x), reference(x)[0].detach()) < 1e-5
    layer = model.base.blocks[1].ffn.key
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(layer.base_layer.weight + B @ A, reference.blocks[1].ffn.key.weight, atol=1e-5)


def test_pissa_adapter_starts_as_the_principal_part():
    model = random_model()
    U, _ = torch.linalg.qr(torch.randn(4 * C, 4))
    V, _ = torch.linalg.qr(torch.randn(C, 4))
    principal = U @ torch.diag(torch.tensor([40.0, 30.0, 20.0, 10.0])) @ V.t()  # far above the noise's ~3
    with torch.no_grad():
        model.blocks[0].ffn.key.weight += principal
    model = build_peft(model, peft_spec("pissa"))
    layer = model.base.blocks[0].ffn.key
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert relative_error(B @ A, principal) < 0.1
    assert torch.linalg.matrix_norm(layer.base_layer.weight, 2) < 4.0


def test_targets_restrict_the_adapted_linears(base_path, batch, tmp_path):
    base, _ = load_model(base_path)
    spec = PeftConfig.model_validate({"method": "lora", "lora": {"r": 2, "targets": ["att.value", "ffn.key"]}})
    model = build_peft(base, spec)
    path = str(tmp_path / "adapter.pth")
    model.methods[0].save(path)
    assert sorted(torch.load(path, weights_only=True)) == sorted(
        ["lora_alpha"] + [f"blocks.{i}.{t}.lora_{p}" for i in range(2) for t in ("att.value", "ffn.key") for p in "AB"])
    assert type(model.base.blocks[0].att.key).__name__ == "Linear"
    assert model.trainable_parameters()[0].dtype == torch.float32


def test_bf16_base_keeps_fp32_adapters(base_path, batch):
    for name in ("lora", "bone"):
        base, _ = load_model(base_path, dtype=torch.bfloat16)
        model = build_peft(base, peft_spec(name))
        assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
        losses = train_steps(model, batch, steps=3)
        assert losses[-1] < losses[0]


def test_state_combined_with_lora_trains_both_and_merges(base_path, batch, tmp_path):
    base, _ = load_model(base_path)
    model = build_peft(base, peft_spec("lora", combine_state=True))
    assert [m.name for m in model.methods] == ["lora", "state"]
    losses = train_steps(model, batch, steps=6)
    assert losses[-1] < 0.75 * losses[0]
    assert model.methods[1].time_state.abs().max() > 0
    model.methods[0].save(str(tmp_path / "lora.pth"))
    merge_adapter("lora", base_path, str(tmp_path / "lora.pth"), str(tmp_path / "merged.pth"))
    merged, _ = load_model(str(tmp_path / "merged.pth"))
    x = batch[0]
    with torch.no_grad():
        merged_logits = merged(x, model.methods[1].initial_state(merged, 2, torch.float32))[0]
    assert relative_error(merged_logits, logits(model, x)) < 1e-5


@pytest.mark.ray
def test_train_loop_writes_each_methods_file(make_tiny_model, tmp_path):
    from rwkvray.launch.run import run_on_ray
    peft = {"method": "disha", "combine_state": True, "disha": {"mode": "bone", "r": 32}, "merge": False}
    spec = two_step_run_spec(make_tiny_model(1, 128), peft, tmp_path, loss_mask="qa")
    run_on_ray(spec)
    disha = torch.load(tmp_path / "run" / "disha-0.pth", weights_only=True)
    assert sorted(disha) == [f"blocks.0.{t}.disha" for t in sorted(PEFT_TARGETS)]
    assert disha["blocks.0.att.key.disha"].abs().max() > 0
    state = torch.load(tmp_path / "run" / "rwkv-0.pth", weights_only=True)
    assert sorted(state) == ["blocks.0.att.time_state"]
    assert sorted(os.listdir(tmp_path / "run-adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_every_method_is_found_by_name():
    classes = method_classes(PeftConfig.model_validate({"method": "pissa", "combine_state": True}))
    assert [c.name for c in classes] == ["pissa", "state"]
    for name in ("state", "lora", "pissa", "disha"):
        assert METHODS[name] is method_classes(PeftConfig.model_validate({"method": name}))[0]


# ---------------------------------------------------------------- bad configs


def test_lora_without_the_peft_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is absent
    with pytest.raises(UserError) as err:
        build_peft(random_model(), peft_spec("lora"))
    assert str(err.value) == ("peft.method: lora and pissa need the peft package, which is not installed "
                              "(pip install 'rwkvray[peft]')")


@pytest.mark.parametrize("peft, key", [
    ({"method": "disha", "disha": {"mode": "lokr"}}, "peft.disha.mode"),
    ({"method": "disha", "disha": {"r": 0}}, "peft.disha.r"),
    ({"method": "lora", "lora": {"r": -4}}, "peft.lora.r"),
    ({"method": "pissa", "pissa": {"r": 0}}, "peft.pissa.r"),
])
def test_spec_refuses_unknown_mode_and_non_positive_r(peft, key, base_path):
    data = {"model": {"path": base_path}, "data": {"file": SAMPLE}, "peft": peft}
    with pytest.raises(UserError) as err:
        spec_from_dict(data, "job.yaml")
    message = str(err.value)
    assert message.startswith(f"job.yaml: {key}: ") and "\n" not in message, message


@pytest.mark.parametrize("disha, message", [
    ({"mode": "bone", "r": 48},
     "peft.disha.r: bone needs r to divide every target's input size, but r=48 does not divide 128 "
     "(blocks.0.att.receptance)"),
    ({"mode": "bat", "r": 256, "targets": ["ffn.value"]},
     "peft.disha.r: bat needs r to divide every target's output size, but r=256 does not divide 128 "
     "(blocks.0.ffn.value)"),
])
def test_disha_r_must_divide_the_dims(disha, message, base_path):
    base, _ = load_model(base_path)
    with pytest.raises(UserError) as err:
        build_peft(base, PeftConfig.model_validate({"method": "disha", "disha": disha}))
    assert str(err.value) == message


def test_pissa_r_above_the_rank_is_refused(base_path):
    base, _ = load_model(base_path)
    with pytest.raises(UserError) as err:
        build_peft(base, PeftConfig.model_validate({"method": "pissa", "pissa": {"r": 129}}))
    assert str(err.value) == "peft.pissa.r: 129 exceeds the rank of blocks.0.att.receptance ([128, 128])"


# ---------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def adapters(base_path, tmp_path_factory):
    """A trained adapter file of each kind."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name in ("lora", "pissa", "bone"):
        base, _ = load_model(base_path)
        model = build_peft(base, peft_spec(name))
        for p in model.trainable_parameters():
            p.data.add_(0.01 * torch.randn_like(p))
        paths[name] = str(folder / f"{name}.pth")
        model.methods[0].save(paths[name])
    return paths


def test_merge_writes_bf16_on_request_and_the_base_dtype_otherwise(base_path, adapters, tmp_path):
    out = str(tmp_path / "merged.pth")
    merge_adapter("disha", base_path, adapters["bone"], out, dtype="bf16")
    merged = torch.load(out, weights_only=True)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert set(merged) == set(torch.load(base_path, weights_only=True))
    merge_adapter("disha", base_path, adapters["bone"], out)
    assert {v.dtype for v in torch.load(out, weights_only=True).values()} == {torch.float32}


def test_lora_merge_takes_alpha_from_the_flag_for_rwkv_peft_files(base_path, adapters, tmp_path):
    saved = torch.load(adapters["lora"], weights_only=True)
    foreign = str(tmp_path / "rwkv-peft-lora.pth")
    torch.save({k: v for k, v in saved.items() if k != "lora_alpha"}, foreign)
    out = str(tmp_path / "merged.pth")
    with pytest.raises(UserError) as err:
        merge_adapter("lora", base_path, foreign, out)
    assert str(err.value) == f"{foreign}: no 'lora_alpha' entry (RWKV-PEFT's LoRA files lack it); pass --lora-alpha"
    assert not os.path.exists(out)
    merge_adapter("lora", base_path, foreign, out, lora_alpha=8.0)
    merge_adapter("lora", base_path, adapters["lora"], str(tmp_path / "ours.pth"))
    key = "blocks.1.ffn.value.weight"
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert torch.equal(torch.load(out, weights_only=True)[key], ours[key])


@pytest.mark.parametrize("kind, adapter, message", [
    ("lora", "pissa", "{path}: unexpected key 'blocks.0.att.receptance.init_lora_A' for a lora adapter "
                      "(expected keys ending in .lora_A, .lora_B)"),
    ("disha", "lora", "{path}: unexpected key 'blocks.0.att.receptance.lora_A' for a disha adapter "
                      "(expected keys ending in .disha)"),
])
def test_merge_refuses_an_adapter_of_another_type(kind, adapter, message, base_path, adapters, tmp_path):
    out = str(tmp_path / "merged.pth")
    with pytest.raises(UserError) as err:
        merge_adapter(kind, base_path, adapters[adapter], out)
    assert str(err.value) == message.format(path=adapters[adapter])
    assert not os.path.exists(out)


def test_pissa_merge_without_the_initial_a_b_is_a_clear_error(base_path, adapters, tmp_path):
    saved = torch.load(adapters["pissa"], weights_only=True)
    trimmed = str(tmp_path / "no-init.pth")
    torch.save({k: v for k, v in saved.items() if ".init_" not in k}, trimmed)
    with pytest.raises(UserError) as err:
        merge_adapter("pissa", base_path, trimmed, str(tmp_path / "merged.pth"))
    assert str(err.value) == (f"{trimmed}: missing key 'blocks.0.att.receptance.init_lora_A' "
                              "(a PiSSA adapter needs its initial A and B: pass --init init_pissa.pth)")


def test_merge_refuses_an_adapter_for_another_model_size(base_path, adapters, tmp_path):
    other = str(tmp_path / "wide.pth")
    save_checkpoint(random_model(default_dims(2, 256, vocab_size=300)).state_dict(), other)
    with pytest.raises(UserError) as err:
        merge_adapter("disha", other, adapters["bone"], str(tmp_path / "merged.pth"))
    assert str(err.value) == (f"{adapters['bone']}: 'blocks.0.att.receptance.disha' has shape [16, 128], which fits "
                              "neither bone ([r, 256], r dividing 256) nor bat ([256/r, r, r], r dividing 256) "
                              "for a [256, 256] weight")
