"""RWKV-6 (x060) state tuning end to end: RWKV-PEFT command line, state file, merge-state, generate, the rwkv package."""
import os
import shlex

import pytest
import torch

from rwkvray.cli import main
from rwkvray.model.state_file import load_state
from rwkvray.text.tokenizer import get_tokenizer
from tests.helpers import greedy_tokens

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")
PROMPT = "User: hello\n\nAssistant:"


@pytest.fixture(scope="module")
def tiny_x060(make_tiny_model):
    return make_tiny_model(2, 128, "x060")


@pytest.fixture(scope="module")
def trained_state(tiny_x060, tmp_path_factory):
    """`rwkvray train --my_testing x060`, as an RWKV-PEFT user would type it."""
    out = tmp_path_factory.mktemp("x060-train")
    command = f"""--load_model {tiny_x060} --proj_dir {out} --data_file {SAMPLE} --data_type jsonl
        --vocab_size 65536 --ctx_len 32 --micro_bsz 2 --epoch_steps 4 --epoch_count 1 --epoch_save 1
        --lr_init 1e-1 --lr_final 1e-2 --warmup_steps 0 --precision fp32 --grad_cp 1
        --peft state --op torch --random_seed 3 --accelerator cpu --devices 1 --my_testing x060"""
    assert main(["train", *shlex.split(command)]) == 0
    return str(out / "rwkv-final.pth")


def greedy_with_rwkv_package(model_path: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The rwkv pip package's v6 path on 'cpu fp32', reading the state merged into the file itself."""
    with pytest.MonkeyPatch.context() as env:  # the package reads these switches at import and in forward
        env.setenv("RWKV_JIT_ON", "0")
        env.setenv("RWKV_CUDA_ON", "0")
        env.delenv("RWKV_V7_ON", raising=False)
        from rwkv.model import RWKV
        model = RWKV(model_path.removesuffix(".pth"), strategy="cpu fp32")
        return greedy_tokens(model.forward, prompt, None, max_tokens)


def test_state_file_is_rwkv_peft_v6_layout_and_exports_for_ai00(trained_state, tmp_path):
    raw = torch.load(trained_state, weights_only=True)
    assert sorted(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert all(t.shape == (2, 64, 64) and t.dtype == torch.float32 for t in raw.values())
    assert raw["blocks.1.att.time_state"].abs().max() > 0
    exported = str(tmp_path / "state.st")
    assert main(["export-state", "--state", trained_state, "--out", exported]) == 0
    from safetensors.torch import load_file
    ai00 = load_file(exported)
    assert torch.equal(ai00["blocks.1.att.time_state"], raw["blocks.1.att.time_state"].transpose(-1, -2).half())


def test_merged_state_generates_as_in_the_rwkv_package(tiny_x060, trained_state, tmp_path, capsys):
    merged = str(tmp_path / "merged.pth")
    assert main(["merge-state", "--base", tiny_x060, "--state", trained_state, "--out", merged]) == 0
    outputs = []
    for model, extra in ((tiny_x060, ["--state", trained_state]), (tiny_x060, []), (merged, [])):
        capsys.readouterr()
        assert main(["generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0",
                     "--device", "cpu", *extra]) == 0
        outputs.append(capsys.readouterr().out.removesuffix("\n"))
    tokenizer = get_tokenizer()
    theirs = greedy_with_rwkv_package(merged, tokenizer.encode(PROMPT), 12)
    assert outputs[0] == tokenizer.decode(theirs) == outputs[2]  # the merged file carries the state itself
    assert outputs[0] != outputs[1]  # the tuned state changes the text, so a wrong layout could not pass


def test_my_testing_must_match_the_checkpoint(make_tiny_model, tmp_path, capsys):
    x070 = make_tiny_model(2, 64)
    command = f"--load_model {x070} --proj_dir {tmp_path} --data_file {SAMPLE} --my_testing x060 --accelerator cpu"
    assert main(["train", *shlex.split(command)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "version=x070 but the spec expects x060" in err
    assert main(["train", *shlex.split(command.replace("x060", "x052"))]) == 2
    assert "--my_testing: must be one of x070, x060 (got 'x052')" in capsys.readouterr().err


def test_v6_state_on_a_v7_base_is_refused_naming_both(make_tiny_model, trained_state, tmp_path, capsys):
    x070 = make_tiny_model(2, 64)
    assert main(["merge-state", "--base", x070, "--state", trained_state, "--out", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[2, 2, 64, 64]" in err and "[2, 1, 64, 64]" in err
    assert not (tmp_path / "m.pth").exists()
    assert load_state(trained_state).time_state.shape == (2, 2, 64, 64)
