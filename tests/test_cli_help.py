"""The CLI explains itself: every option described with its default, `--version`, train's common flags first."""
import argparse
import re

import pytest
import torch

from rwkvray import __version__
from rwkvray.cli import build_parser, main
from rwkvray.errors import UserError
from rwkvray.compat.rwkv_peft import build_train_parser, spec_from_train_flags

SAMPLE = "rwkvray/sample_data/persona.jsonl"  # also stands in for the model file: flags are only mapped here


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: parser for name, parser in sub.choices.items() if name not in ("train", "convert-flags")}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_a_description_and_shows_its_default(name):
    parser = subcommands()[name]
    text = flat(parser.format_help())
    for action in options(parser):
        assert action.help and "\n" not in action.help, (name, action.dest)
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, (name, action.dest)
        assert flat(action.help) in text


def test_train_help_describes_every_flag_and_leads_with_the_common_ones():
    parser = build_train_parser()
    for action in options(parser):
        assert action.help and "\n" not in action.help, action.dest
    text = parser.format_help()
    usage, description, _, common = text.split("\n\n")[:4]
    assert usage == "usage: rwkvray train --load_model PTH --data_file PATH [--proj_dir DIR] [FLAG VALUE ...]"
    assert common.splitlines()[0] == "common flags:"
    names = re.findall(r"^  (--\w+)", common, flags=re.M)
    assert names == ["--load_model", "--data_file", "--proj_dir", "--peft", "--ctx_len", "--micro_bsz",
                     "--epoch_steps", "--epoch_count", "--epoch_save", "--lr_init", "--lr_final", "--accelerator",
                     "--devices", "--precision"]
    for shown in ("(default: state)", "(default: 512)", "(default: 1000)", "(default: 0.01)", "(default: 0.0001)",
                  "(default: bf16)", "(default: gpu if this machine has a CUDA device, else cpu)"):
        assert shown in flat(common), shown


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert (exit_.value.code, capsys.readouterr().out) == (0, f"rwkvray {__version__}\n")


def test_accelerator_defaults_to_what_this_machine_has():
    spec = spec_from_train_flags(["--load_model", SAMPLE, "--data_file", SAMPLE])
    assert spec.scaling.use_gpu == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default accelerator is gpu here")
@pytest.mark.parametrize("flags, message", [
    ("--op cuda", "--op: cuda needs a GPU, but the run is on --accelerator cpu (the default here: no CUDA device): "
                  "use --op torch, or --accelerator gpu"),
    ("--fla", "--fla: fla needs a GPU, but the run is on --accelerator cpu (the default here: no CUDA device): "
              "use --op torch, or --accelerator gpu"),
    ("--accelerator cpu --precision fp16", "--precision: fp16 needs a GPU, but the run is on --accelerator cpu: "
                                           "use --precision bf16 or fp32"),
    ("--accelerator cpu --strategy deepspeed_stage_2_offload",
     "--strategy: deepspeed_stage_2_offload moves the optimizer to CPU memory, where it already is on "
     "--accelerator cpu: use deepspeed_stage_2"),
])
def test_gpu_only_flags_on_cpu_are_refused_in_flag_terms(flags, message):
    with pytest.raises(UserError) as err:
        spec_from_train_flags(["--load_model", SAMPLE, "--data_file", SAMPLE, *flags.split()])
    assert str(err.value) == f"train flags: {message}"
