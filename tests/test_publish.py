"""Publishing a state into a Serve states_dir by name (`run.publish`, `rwkvray publish`): atomic, never a silent
overwrite, the replaced state kept as NAME.prev.pth with its card; on a folder and on S3 (moto on 127.0.0.1).
The whole path, from `rwkvray run` to a Serve request, is tests/test_readme_serving.py."""
import json
import os

import pytest
import torch

from rwkvray.cli import main
from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.files.publish import publish_state
from rwkvray.model.state_card import card_bytes
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.spec import spec_from_dict
from tests.helpers import SAMPLE


def tuned_state(folder, name: str, seed: int, card: dict | None) -> str:
    path = str(folder / f"{name}.pth")
    save_state(TunedState(torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(seed))), path)
    if card is not None:
        (folder / f"{name}.json").write_bytes(card_bytes(card))
    return path


def test_publish_command_refuses_a_different_state_and_replaces_it_only_when_asked(tmp_path, capsys):
    runs, states = tmp_path / "runs", tmp_path / "states"
    runs.mkdir()
    first = tuned_state(runs, "rwkv-final", 1, {"method": "state", "steps": 10})
    other = tuned_state(runs, "other", 2, {"method": "state", "steps": 20})
    bare = tuned_state(runs, "bare", 3, None)
    publish = ["publish", "--states-dir", str(states), "--name", "persona"]

    assert main([*publish[:1], str(runs), *publish[1:]]) == 0  # a run's folder: its rwkv-final.pth
    assert capsys.readouterr().out == f"published persona: {states / 'persona.pth'}\n"
    assert (states / "persona.pth").read_bytes() == (runs / "rwkv-final.pth").read_bytes()
    assert json.loads((states / "persona.json").read_text()) == {"method": "state", "steps": 10}
    assert main([*publish[:1], first, *publish[1:]]) == 0
    assert capsys.readouterr().out == f"persona already published: {states / 'persona.pth'}\n"

    assert main([*publish[:1], other, *publish[1:]]) == 2
    assert capsys.readouterr().err == (f"error: {states / 'persona.pth'} already holds a different state; add "
                                       "--replace to replace it (the old one is kept as persona.prev.pth), or "
                                       "publish under another name\n")
    assert (states / "persona.pth").read_bytes() == (runs / "rwkv-final.pth").read_bytes()

    assert main([*publish[:1], other, *publish[1:], "--replace"]) == 0
    assert capsys.readouterr().out == (f"published persona: {states / 'persona.pth'} "
                                       "(the state it replaced is kept as persona.prev)\n")
    assert (states / "persona.pth").read_bytes() == (runs / "other.pth").read_bytes()
    assert (states / "persona.prev.pth").read_bytes() == (runs / "rwkv-final.pth").read_bytes()
    assert json.loads((states / "persona.json").read_text())["steps"] == 20
    assert json.loads((states / "persona.prev.json").read_text())["steps"] == 10

    assert main([*publish[:1], bare, *publish[1:], "--replace"]) == 0  # no card: no stale card beside it
    assert not (states / "persona.json").exists()
    assert json.loads((states / "persona.prev.json").read_text())["steps"] == 20
    assert sorted(os.listdir(states)) == ["persona.prev.json", "persona.prev.pth", "persona.pth"]  # no temp files


def test_publish_command_refuses_what_is_not_a_state_and_bad_names(tmp_path, capsys):
    model = tmp_path / "model.pth"
    torch.save({"emb.weight": torch.zeros(4, 64)}, model)
    state = tuned_state(tmp_path, "s", 1, None)
    assert main(["publish", str(model), "--states-dir", str(tmp_path / "d"), "--name", "x"]) == 2
    assert capsys.readouterr().err == (f"error: {model}: unexpected key 'emb.weight' (a state file holds only "
                                       "'blocks.{i}.att.time_state' keys (and, from fullstate tuning, "
                                       "'blocks.{i}.att.ts_state' and 'blocks.{i}.ffn.ts_state'))\n")
    assert not (tmp_path / "d").exists()
    assert main(["publish", state, "--states-dir", str(tmp_path / "d"), "--name", "../x"]) == 2
    assert capsys.readouterr().err == ("error: state name '../x': use 1-128 of A-Z a-z 0-9 . _ - "
                                       "(not starting with '.')\n")


@pytest.mark.parametrize("blocks, message", [
    ({"peft": {"method": "lora"}}, "run.publish: publishes a state for Serve, which serves states alone: needs "
                                   "peft.method: state (without combine_state)"),
    ({"tune": {"space": {"lr_init": {"loguniform": [0.01, 0.1]}}, "metric": "train_loss"}},
     "run.publish: publishes the final state of `rwkvray run`; a sweep keeps its best trial's state as "
     "best_state.pth: publish that with `rwkvray publish`"),
])
def test_run_publish_is_refused_where_no_state_alone_comes_out(base_path, blocks, message):
    spec = {"model": {"path": base_path}, "data": {"file": SAMPLE},
            "run": {"publish": {"states_dir": "out/states", "name": "persona"}}, **blocks}
    with pytest.raises(UserError) as err:
        spec_from_dict(spec, "job.yaml")
    assert str(err.value) == f"job.yaml: {message}"


def test_run_publish_name_follows_serves_rule(base_path):
    spec = {"model": {"path": base_path}, "data": {"file": SAMPLE},
            "run": {"publish": {"states_dir": "s3://bucket/states", "name": ".hidden"}}}
    with pytest.raises(UserError) as err:
        spec_from_dict(spec, "job.yaml")
    assert str(err.value) == "job.yaml: run.publish.name: use 1-128 of A-Z a-z 0-9 . _ - (not starting with '.')"
    spec["run"]["publish"]["name"] = "persona"
    assert spec_from_dict(spec, "job.yaml").run.publish.states_dir == "s3://bucket/states"  # a URI as written


def test_publish_into_an_s3_states_dir(s3_server, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    states = "s3://runs/states"
    first, second = b"state one", b"state two"
    assert publish_state(first, b"{}", states, "p", False, "say so") == f"published p: {states}/p.pth"
    with pytest.raises(UserError, match="already holds a different state; say so to replace it"):
        publish_state(second, None, states, "p", False, "say so")
    publish_state(second, None, states, "p", True, "say so")
    assert storage.read_bytes(f"{states}/p.pth") == second and storage.read_bytes(f"{states}/p.json") is None
    assert storage.read_bytes(f"{states}/p.prev.pth") == first
    assert storage.read_bytes(f"{states}/p.prev.json") == b"{}"


