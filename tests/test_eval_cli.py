"""`rwkvray eval` end to end on a local Ray instance, and its flags and spec block checked before Ray starts."""
import asyncio
import json
import os
import shutil

import pytest
import torch

from rwkvray.cli import build_parser, main
from rwkvray.launch.evaluate import job_from_flags, job_from_spec
from rwkvray.eval.metrics import summarize
from rwkvray.eval.job import load_states, read_all_items
from rwkvray.eval.scoring import evaluate
from rwkvray.model.rwkv import load_model
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.engine.batch_engine import BatchEngine
from rwkvray.text.tokenizer import get_tokenizer

QUIZ = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona_quiz.jsonl")


@pytest.fixture(scope="module")
def files(make_tiny_model, tmp_path_factory):
    """The model, a state file and a run folder holding another state as rwkv-final.pth."""
    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_model(1, 64)
    dims = load_model(model)[0].dims
    torch.manual_seed(5)
    save_state(TunedState(torch.randn(1, *dims.state_shape) * 2), str(root / "loud.pth"))
    (root / "run").mkdir()
    save_state(TunedState(torch.randn(1, *dims.state_shape)), str(root / "run" / "rwkv-final.pth"))
    return {"model": model, "loud": str(root / "loud.pth"), "run": str(root / "run"), "root": root}


def in_process_results(model_path, job):
    """The same evaluation without Ray or the command: the reference the command's numbers must equal. With one
    torch thread, as the command's Ray actor has (1 CPU): sums split over more threads round differently."""
    items = read_all_items(job.data, get_tokenizer())
    states = load_states(job, "--state")

    async def run():
        engine = BatchEngine(load_model(model_path)[0], get_tokenizer(), max_batch_size=job.batch_size, threads=1)
        return await evaluate(engine, items, states, job.max_tokens, job.batch_size)
    return summarize(asyncio.run(run()))


def test_eval_command_on_ray(files, capsys):
    out, details = files["root"] / "results.json", files["root"] / "details.jsonl"
    argv = ["eval", "--model", files["model"], "--state", f"loud={files['loud']}", "--state", f"run={files['run']}",
            "--data", QUIZ, "--max-tokens", "8", "--out", str(out), "--details", str(details)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["state", "persona_quiz.jsonl", "mc_acc", "%"]
    assert [line.split()[0] for line in printed[1:4]] == ["base", "loud", "run"]
    assert printed[4].startswith("loud vs base: persona_quiz.jsonl mc_acc ")
    assert " pts (95% CI " in printed[4]
    results = json.loads(out.read_text())["results"]
    assert [(r["state"], r["metric"]) for r in results] == [
        (s, m) for s in ("base", "loud", "run") for m in ("mc_acc", "exact", "contains", "loss")]
    assert {r["data"] for r in results} == {"persona_quiz.jsonl"}
    assert [r["n"] for r in results[:4]] == [10, 4, 4, 4]
    job = job_from_flags(build_parser().parse_args(argv))
    assert results == in_process_results(files["model"], job)
    assert (files["root"] / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == 3 * 18
    assert rows[0].keys() == {"state", "data", "index", "prediction", "correct"}


def test_spec_block_gives_the_same_job_as_the_flags(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files["root"])
    spec = tmp_path / "eval.yaml"
    spec.write_text(f"model:\n  path: {files['model']}\neval:\n  data: [{QUIZ}]\n  states:\n    loud: loud.pth\n"
                    "    run: run\n  max_tokens: 8\n  out: results.json\n")
    from_spec, where = job_from_spec(build_parser().parse_args(["eval", str(spec)]))
    from_flags = job_from_flags(build_parser().parse_args(
        ["eval", "--model", files["model"], "--state", f"loud={files['loud']}", "--state", f"run={files['run']}",
         "--data", QUIZ, "--max-tokens", "8", "--out", str(files["root"] / "results.json")]))
    assert from_spec.states == from_flags.states
    assert (from_spec.model, from_spec.max_tokens, from_spec.out) == (from_flags.model, 8, from_flags.out)
    assert [os.path.realpath(p) for p in from_spec.data] == [os.path.realpath(QUIZ)]
    assert where == f"{spec}: eval.states"
    assert main(["validate", str(spec)]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--state", "base=x.pth"], "error: --state base=x.pth: 'base' is the base model, always scored; name the "
     "state otherwise"),
    (["--state", "loud"], "error: --state loud: expected NAME=PATH (a state file or a run folder)"),
    (["--state", "a=nowhere.pth"], "error: --state: nowhere.pth: no such state file or run folder"),
    (["--max-tokens", "0"], "error: --max-tokens: must be 1 to 4096 (got 0)"),
    (["--data", "missing.jsonl"], "error: --data: missing.jsonl: no such file"),
])
def test_bad_flags_are_one_line_before_ray(files, capsys, extra, message):
    assert main(["eval", "--model", files["model"], "--data", QUIZ, *extra]) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_run_folder_without_a_final_state_is_refused(files, tmp_path, capsys):
    shutil.copy(files["loud"], tmp_path / "rwkv-0.pth")
    assert main(["eval", "--model", files["model"], "--data", QUIZ, "--state", f"early={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --state: {tmp_path} is a folder without rwkv-final.pth "
                                               "(give a state file or a finished run's folder)")


def test_a_state_of_another_shape_is_refused(files, make_tiny_model, capsys):
    wide = make_tiny_model(1, 128)
    assert main(["eval", "--model", wide, "--data", QUIZ, "--state", f"narrow={files['loud']}"]) == 2
    assert "state shape [1, 1, 64, 64] (L,H,N,N) does not fit the model's [1, 2, 64, 64]" in capsys.readouterr().err


def test_the_eval_block_makes_an_eval_spec_and_other_commands_say_so(files, tmp_path, capsys):
    spec = tmp_path / "eval.yaml"
    spec.write_text(f"model: {{path: {files['model']}}}\neval: {{data: [{QUIZ}], states: {{base: x.pth}}}}\n")
    assert main(["eval", str(spec)]) == 2
    assert capsys.readouterr().err == (f"error: {spec}: eval.states: 'base' is the base model, always scored; name "
                                       "the states otherwise\n")
    spec.write_text(f"model: {{path: {files['model']}}}\neval: {{data: [{QUIZ}]}}\n")
    assert main(["run", str(spec)]) == 2
    assert capsys.readouterr().err == (f"error: {spec}: data: required for rwkvray run (this is an eval spec, for "
                                       "rwkvray eval)\n")
    train = tmp_path / "train.yaml"
    train.write_text(f"model: {{path: {files['model']}}}\ndata: {{file: {QUIZ}}}\n")
    assert main(["eval", str(train)]) == 2
    assert capsys.readouterr().err == (f"error: {train}: eval: required for rwkvray eval (this is a train spec, "
                                       "for rwkvray run)\n")
    assert main(["eval", str(train), "--model", files["model"]]) == 2
    assert capsys.readouterr().err == "error: --model: give either a spec file or the flags, not both\n"
