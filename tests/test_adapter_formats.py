"""Adapters both ways with RWKV-PEFT: --merge 1 (merged rwkv-N.pth), --merge 0 (peft save_pretrained folder),
folders written by peft itself, init_pissa.pth, training-precision files, --train_parts ln."""
import os

import pytest
import torch

from rwkvray.model.checkpoint import load_checkpoint, save_checkpoint
from rwkvray.spec import PeftConfig, spec_from_dict
from rwkvray.errors import UserError
from rwkvray.peft.merge import merge_adapter
from rwkvray.model.rwkv import load_model
from rwkvray.peft import build_peft
from rwkvray.peft.epoch_outputs import write_epoch_outputs
from tests.helpers import PEFT_CONFIGS, TINY, train_steps, two_step_run_spec

CONFIGS = {name: PEFT_CONFIGS[name] for name in ("lora", "pissa", "bone")}
NORMS = ["blocks.0.ln0", "ln_out"] + [f"blocks.{i}.{n}" for i in range(TINY.n_layer)
                                     for n in ("ln1", "ln2", "att.ln_x")]


def trained(name, base_path, batch, dtype=torch.float32, **extra):
    base, _ = load_model(base_path, dtype=dtype)
    model = build_peft(base, PeftConfig.model_validate({**CONFIGS[name], **extra}))
    train_steps(model, batch, steps=3)
    return model


def logits(model, x):
    """A peft PeftModel, a plain RWKV, or our PeftModel (from its tuned state, if it has one)."""
    with torch.no_grad():
        return model(x)[0] if not hasattr(model, "methods") else model.base(x, model.initial_state(x.shape[0]))[0]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def load_raw(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a: dict, b: dict, atol=0.0):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_0_folder_loads_in_peft_and_merges_to_merge_1s_file(name, base_path, batch, tmp_path):
    from peft import PeftModel
    model = trained(name, base_path, batch)
    files = {model.methods[0].name: model.methods[0].file_tensors()}
    for merge in (True, False):
        spec = PeftConfig.model_validate({**CONFIGS[name], "merge": merge})
        write_epoch_outputs(spec, base_path, str(tmp_path / "run"), str(tmp_path / "run-adapter"), files, epoch=0,
                            note=lambda _: None)

    folder = str(tmp_path / "run-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    x = batch[0]
    loaded = PeftModel.from_pretrained(load_model(base_path)[0], folder)
    assert relative_error(logits(loaded, x), logits(model, x)) < 1e-5

    merged_file = str(tmp_path / "run" / "rwkv-0.pth")
    load_checkpoint(merged_file)  # a full x070 checkpoint
    merge_adapter(None, base_path, folder, str(tmp_path / "from-folder.pth"))
    assert_same_tensors(load_raw(tmp_path / "from-folder.pth"), load_raw(merged_file), atol=1e-6)
    assert relative_error(logits(load_model(merged_file)[0], x), logits(model, x)) < 1e-5


@pytest.mark.ray
def test_train_loop_merge_1_writes_rwkv_0_equal_to_rwkvray_merge(make_tiny_model, tmp_path, capsys):
    from rwkvray.launch.run import run_on_ray
    base_path = make_tiny_model(1, 64)  # the sample data needs the full vocabulary
    spec = two_step_run_spec(base_path, CONFIGS["lora"], tmp_path)
    assert spec.peft.merge
    run_on_ray(spec)
    run = tmp_path / "run"
    assert load_checkpoint(str(run / "rwkv-0.pth")).dims == load_checkpoint(base_path).dims
    merge_adapter("lora", base_path, str(run / "lora-0.pth"), str(tmp_path / "merged.pth"))
    assert_same_tensors(load_raw(run / "rwkv-0.pth"), load_raw(tmp_path / "merged.pth"))
    assert not os.path.exists(str(run) + "-adapter")

    out = capsys.readouterr().out
    final = run / "lora-final.pth"
    assert (f"or with RWKV-PEFT's older scripts: python merge/merge.py --type lora --base_model {base_path} "
            f"--lora_checkpoint {final} --output {run / 'merged.pth'} --lora_alpha 8\n") in out


def test_pissa_writes_init_pissa_with_rwkv_peft_keys(base_path, batch, tmp_path):
    model = trained("pissa", base_path, batch)
    spec = PeftConfig.model_validate(CONFIGS["pissa"])
    files = {"pissa": model.methods[0].file_tensors()}
    write_epoch_outputs(spec, base_path, str(tmp_path), str(tmp_path / "adapter"), files, epoch=0, note=lambda _: None)
    init = load_raw(tmp_path / "init_pissa.pth")
    targets = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
    expected = [f"model.blocks.{i}.{t}.init_lora_{p}" for i in range(TINY.n_layer) for t in targets for p in "AB"]
    assert sorted(init) == sorted(expected)
    # RWKV-PEFT's form: the adapter file without init keys, plus init_pissa.pth
    save_checkpoint({k: v for k, v in files["pissa"].items() if ".init_" not in k}, str(tmp_path / "rwkv-0.pth"))
    merge_adapter(None, base_path, str(tmp_path / "rwkv-0.pth"), str(tmp_path / "a.pth"),
                  init_path=str(tmp_path / "init_pissa.pth"))
    merge_adapter("pissa", base_path, str(tmp_path / "rwkv-0.pth"), str(tmp_path / "b.pth"),
                  init_path=str(tmp_path / "init_pissa.pth"))
    save_checkpoint(files["pissa"], str(tmp_path / "pissa-0.pth"))
    merge_adapter("pissa", base_path, str(tmp_path / "pissa-0.pth"), str(tmp_path / "c.pth"))
    assert_same_tensors(load_raw(tmp_path / "a.pth"), load_raw(tmp_path / "c.pth"))  # told pissa by the init keys
    assert_same_tensors(load_raw(tmp_path / "b.pth"), load_raw(tmp_path / "c.pth"))


@pytest.mark.parametrize("name,mode", [("bone", "bat"), ("lora", None)])
def test_adapter_file_is_in_the_training_precision(name, mode, base_path, batch, tmp_path):
    extra = {"disha": {"mode": mode, "r": 16}} if mode else {}
    model = trained(name, base_path, batch, dtype=torch.bfloat16, **extra)
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}  # fp32 masters
    path = str(tmp_path / "adapter.pth")
    model.methods[0].save(path)
    dtypes = {key: t.dtype for key, t in load_raw(path).items() if key != "lora_alpha"}
    assert set(dtypes.values()) == {torch.bfloat16}
    bf16_base = str(tmp_path / "base-bf16.pth")
    save_checkpoint({k: v.bfloat16() for k, v in load_raw(base_path).items()}, bf16_base)
    merge_adapter(None, bf16_base, path, str(tmp_path / "merged.pth"))
    assert {t.dtype for t in load_raw(tmp_path / "merged.pth").values()} == {torch.bfloat16}


def test_train_parts_ln_trains_and_merges_the_norms_and_nothing_else(base_path, batch, tmp_path):
    model = trained("lora", base_path, batch, train_parts=["ln"], lora={"r": 4, "alpha": 8.0, "dropout": 0.0,
                                                                          "targets": ["att.key"]})
    path = str(tmp_path / "lora-0.pth")
    model.methods[0].save(path)
    saved = load_raw(path)
    assert sorted(k for k in saved if not k.endswith(("lora_A", "lora_B", "lora_alpha"))) == sorted(
        f"{n}.{p}" for n in NORMS for p in ("weight", "bias"))
    merge_adapter("lora", base_path, path, str(tmp_path / "merged.pth"))
    base, merged = load_raw(base_path), load_raw(tmp_path / "merged.pth")
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed == sorted([f"{n}.{p}" for n in NORMS for p in ("weight", "bias")]
                             + [f"blocks.{i}.att.key.weight" for i in range(TINY.n_layer)])
    x = batch[0]
    assert relative_error(logits(load_model(str(tmp_path / "merged.pth"))[0], x), logits(model, x)) < 1e-5


@pytest.mark.parametrize("kind", ["lora", "miss"])
def test_merge_reads_a_folder_peft_itself_saved_as_rwkv_peft_does(kind, base_path, batch, tmp_path):
    """Today's RWKV-PEFT: get_peft_model(RWKV7, LoraConfig|MissConfig(target_modules=[receptance, key, value,
    output])), then save_pretrained. The adapter is made non-zero so that the merge has something to do."""
    from peft import LoraConfig, MissConfig, get_peft_model
    targets = ["receptance", "key", "value", "output"]
    config = (LoraConfig(r=4, lora_alpha=24, target_modules=targets) if kind == "lora"
              else MissConfig(r=16, target_modules=targets))
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(base_path)[0], config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "miss_block" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(tmp_path / "out-adapter"))
    merge_adapter(None, base_path, str(tmp_path / "out-adapter"), str(tmp_path / "merged.pth"))
    x = batch[0]
    assert relative_error(logits(load_model(str(tmp_path / "merged.pth"))[0], x), logits(peft_model, x)) < 1e-5


def test_merge_refuses_folders_it_cannot_merge(base_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    with pytest.raises(UserError) as err:
        merge_adapter(None, base_path, str(tmp_path), str(tmp_path / "m.pth"))
    assert str(err.value) == f"{tmp_path}: no adapter_config.json: not a save_pretrained adapter folder"
    folder = str(tmp_path / "dora")
    dora = LoraConfig(r=4, target_modules=["att.key"], use_dora=True)
    get_peft_model(load_model(base_path)[0], dora).save_pretrained(folder)
    with pytest.raises(UserError) as err:
        merge_adapter(None, base_path, folder, str(tmp_path / "m.pth"))
    assert str(err.value) == f"{folder}: adapter_config.json sets use_dora (DoRA), which rwkvray merge does not support"
    folder = str(tmp_path / "lora")
    get_peft_model(load_model(base_path)[0], LoraConfig(r=4, target_modules=["att.key"])).save_pretrained(folder)
    with pytest.raises(UserError) as err:
        merge_adapter("disha", base_path, folder, str(tmp_path / "m.pth"))
    assert str(err.value) == f"--type: {folder} holds a lora adapter, not disha"
    assert not os.path.exists(tmp_path / "m.pth")


def test_merge_1_with_a_tuned_state_merges_the_state_too(base_path, batch, tmp_path):
    model = trained("lora", base_path, batch, combine_state=True)
    spec = PeftConfig.model_validate({**CONFIGS["lora"], "combine_state": True})
    files = {method.name: method.file_tensors() for method in model.methods}
    write_epoch_outputs(spec, base_path, str(tmp_path), str(tmp_path / "adapter"), files, epoch=0, note=lambda _: None)
    merged, time_state = load_model(str(tmp_path / "rwkv-0.pth"))
    torch.testing.assert_close(time_state, model.methods[1].time_state.detach())
    x = batch[0]
    with torch.no_grad():
        from_file = merged(x, model.methods[1].initial_state(merged, 2, torch.float32))[0]
    assert relative_error(from_file, logits(model, x)) < 1e-5


def test_cli_merge_of_a_folder_needs_no_type(base_path, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from rwkvray.cli import main
    folder, out = str(tmp_path / "run-adapter"), str(tmp_path / "merged.pth")
    get_peft_model(load_model(base_path)[0], LoraConfig(r=4, target_modules=["key"])).save_pretrained(folder)
    assert main(["merge", "--base", base_path, "--adapter", folder, "--out", out]) == 0
    assert capsys.readouterr().out == f"wrote {out}: {2 * TINY.n_layer} weights merged\n"
