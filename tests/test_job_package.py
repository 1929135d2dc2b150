"""A spec read inside a `ray job submit --working-dir` package: inputs that .gitignore kept out are named as
such, and relative output folders resolve to ~/rwkvray (the package is deleted with the job)."""
import shutil

import pytest

from rwkvray.spec import spec_from_dict
from rwkvray.errors import UserError


@pytest.fixture
def package(tmp_path, monkeypatch):
    folder = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (folder / "data").mkdir(parents=True)
    (folder / ".gitignore").write_text(".venv/\n/out/\n")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return folder


def test_missing_input_in_an_ignored_folder_names_the_rule(package, tmp_path):
    shutil.copy(__file__, package / "data" / "d.jsonl")
    with pytest.raises(UserError) as refused:
        spec_from_dict({"model": {"path": "out/tiny.pth"}, "data": {"file": "data/d.jsonl"}}, "jobs/demo.yaml")
    assert str(refused.value) == (
        f"jobs/demo.yaml: model.path: file not found: {package / 'out' / 'tiny.pth'} (Ray's --working-dir upload "
        "skips what .gitignore names, and '/out/' names this file: put it on storage every node reads and give "
        "its absolute path)")


def test_relative_outputs_outlive_the_job(package, make_tiny_model, tmp_path):
    shutil.copy(__file__, package / "data" / "d.jsonl")
    spec = spec_from_dict({"run": {"name": "demo"}, "model": {"path": make_tiny_model(1, 64)},
                           "data": {"file": "data/d.jsonl"}}, "jobs/demo.yaml")
    assert spec.run.storage_path == str(tmp_path / "home" / "rwkvray" / "runs")
    assert spec.trainer.proj_dir == str(tmp_path / "home" / "rwkvray" / "runs" / "demo")
