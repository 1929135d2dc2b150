"""`rwkvray convert-flags`: an RWKV-PEFT command line as a YAML spec that `rwkvray run` takes to the same run."""
import os
import shlex

import pytest
import torch

from rwkvray.cli import main
from rwkvray.compat.rwkv_peft import spec_from_train_flags
from rwkvray.spec import load_spec
from tests.test_peft_flags import DEMO_STATE_TUNING, TUTORIAL_APPENDIX, USER_SCRIPT

SAMPLE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl"))
# The README's RWKV-PEFT command ("Coming from RWKV-PEFT"), made small and CPU-only as its text says.
README_COMMAND = """--load_model {model} --proj_dir out --data_file {data} --data_type jsonl
  --vocab_size 65536 --ctx_len 32 --micro_bsz 1 --epoch_steps 2 --epoch_count 2 --epoch_save 1
  --lr_init 1e-2 --lr_final 1e-4 --warmup_steps 1 --lr_schedule cos_decay --precision fp32 --grad_cp 1
  --peft state --op torch --accelerator cpu --devices 1 --strategy deepspeed_stage_1 --loss_mask qa
  --random_seed 7"""
STATE_AND_DISHA = """--load_model model.pth --data_file chats.jsonl --train_type state --peft miss
  --miss_config '{"mode":"bat","r":32,"load":""}' --strategy deepspeed_stage_2_offload --accelerator gpu
  --devices 8 --num_nodes 2 --accumulate_grad_batches 4 --beta2 0.95 --name my-run --wandb proj"""


def convert(argv: list[str], capsys) -> tuple[str, str]:
    assert main(["convert-flags", *argv]) == 0
    printed = capsys.readouterr()
    return printed.out, printed.err


@pytest.mark.parametrize("command", [TUTORIAL_APPENDIX, DEMO_STATE_TUNING, USER_SCRIPT, STATE_AND_DISHA],
                         ids=["tutorial", "demo-state-tuning", "user-script", "state+disha"])
def test_the_yaml_loads_back_to_the_spec_of_the_flags(workdir, capsys, command):
    argv = shlex.split(command)
    text, _ = convert(argv, capsys)
    (workdir / "job.yaml").write_text(text)
    assert load_spec("job.yaml").model_dump() == spec_from_train_flags(argv).model_dump()


def test_the_yaml_holds_what_the_flags_set_as_typed(workdir, capsys):
    text, _ = convert(shlex.split(STATE_AND_DISHA), capsys)
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body.startswith("run:\n  name: my-run\nmodel:\n  path: model.pth\ndata:\n  type: jsonl\n  file: chats.jsonl\n")
    assert "peft:\n  method: disha\n  combine_state: true\n  disha:\n    mode: bat\n    r: 32\n" in body
    assert "deepspeed:\n  stage: 2\n  offload: true\nscaling:\n  num_workers: 16\n  use_gpu: true\n" in body
    assert "optim:\n  betas:\n  - 0.9\n  - 0.95\n" in body
    assert body.endswith("logging:\n  wandb_project: proj\n  wandb_mode: online\n")


def test_flags_that_change_nothing_are_warned_once_with_the_reason(workdir, capsys):
    text, err = convert(shlex.split(DEMO_STATE_TUNING + " --pre_ffn 0 --num_workers 4"), capsys)
    assert err.splitlines() == [
        "warning: --pre_ffn: no effect here: RWKV-PEFT declares it, but none of its models reads it",
        "warning: --num_workers: no effect here: a DataLoader setting, and each Ray worker makes its batches in "
        "its own process",
        "warning: --epoch_begin: no effect here: rwkvray resumes from its own checkpoints: rerun with the same "
        "--name instead",
    ]
    assert "\n# --pre_ffn: no effect here: RWKV-PEFT declares it, but none of its models reads it\n" in text


def test_a_bad_flag_prints_no_yaml(workdir, capsys):
    assert main(["convert-flags", "--load_model", "model.pth", "--data_file", "chats.jsonl", "--micro_bsz", "0"]) == 2
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", "error: train flags: --micro_bsz: must be ≥ 1\n")


@pytest.fixture
def local_ray():
    import ray
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # one instance for both runs
    yield
    ray.shutdown()


@pytest.mark.ray
def test_readme_command_trains_the_same_state_through_convert_flags_and_run(local_ray, make_tiny_model, tmp_path,
                                                                          monkeypatch, capsys):
    argv = shlex.split(README_COMMAND.format(model=make_tiny_model(2, 64), data=SAMPLE))
    (tmp_path / "flags").mkdir()
    monkeypatch.chdir(tmp_path / "flags")
    assert main(["train", *argv]) == 0
    capsys.readouterr()
    (tmp_path / "spec").mkdir()
    monkeypatch.chdir(tmp_path / "spec")
    text, _ = convert(argv, capsys)
    (tmp_path / "spec" / "job.yaml").write_text(text)
    assert main(["run", "job.yaml"]) == 0
    from_flags = torch.load(tmp_path / "flags" / "out" / "rwkv-final.pth")
    from_spec = torch.load(tmp_path / "spec" / "out" / "rwkv-final.pth")
    assert list(from_flags) == list(from_spec) == [f"blocks.{i}.att.time_state" for i in range(2)]
    for key, tensor in from_flags.items():
        assert torch.equal(tensor, from_spec[key]), key
    assert not torch.equal(from_flags["blocks.0.att.time_state"], torch.zeros_like(from_flags["blocks.0.att.time_state"]))


def test_convert_flags_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["convert-flags", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith("usage: rwkvray convert-flags --load_model PTH --data_file PATH")
    assert "Print the job spec (YAML, for `rwkvray run`)" in out


def test_every_row_of_the_table_names_a_spec_key_or_a_reason():
    from rwkvray.compat.flag_table import ROWS
    from rwkvray.compat.spec_api import TrainSpec, nested_model
    for row in ROWS:
        keys = row.key if isinstance(row.key, tuple) else (row.key,) if row.key else ()
        assert keys or row.ignored or row.name == "action", row.name
        for key in keys:
            model = TrainSpec
            for part in key.split("[")[0].split("."):
                assert model is not None and part in model.model_fields, (row.name, key)
                model = nested_model(model.model_fields[part].annotation)
