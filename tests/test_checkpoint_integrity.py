"""Damaged checkpoints, on a local folder and on S3 (moto on 127.0.0.1): a run resumes from the newest intact one.

A run stops after step 4 with checkpoints at steps 2 and 4 (its spec has 2 epochs of 2 steps; the rerun has 3,
allowed as a changed spec; the learning rate is constant, so the length of the run changes nothing else). Its
step-4 checkpoint is damaged (its manifest gone on a local folder, cut to half on S3); the rerun resumes from
step 2 and ends with the state of one uninterrupted 6-step run. The quick check names each kind of damage (cut
to half, manifest gone, one file gone) on a copy of a real checkpoint.
"""
import os

import pytest
import torch

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.files.manifest import MANIFEST, checkpoint_folders, storage_problem
from rwkvray.launch.run import run_on_ray
from rwkvray.model.state_file import load_state
from rwkvray.spec import spec_from_dict

pytestmark = pytest.mark.ray
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


def job(model: str, storage_path: str, name: str, epochs: int, proj_dir) -> object:
    return spec_from_dict({
        "run": {"name": name, "storage_path": storage_path, "keep_checkpoints": 1},
        "model": {"path": model},
        "data": {"file": SAMPLE, "ctx_len": 16, "loss_mask": "qa"},
        "optim": {"lr_init": 0.1, "lr_final": 0.1, "warmup_steps": 0},
        "trainer": {"epoch_count": epochs, "epoch_steps": 2, "micro_bsz": 2, "precision": "fp32", "op": "torch",
                    "seed": 5, "proj_dir": str(proj_dir)},
    }, "job.yaml")


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(1, 64)


@pytest.fixture(scope="module")
def uninterrupted(s3_ray, model, tmp_path_factory):
    """The final state of the run done in one go, and the run's checkpoint folders after it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    spec = job(model, str(folder / "runs"), "whole", 3, folder / "out")
    assert run_on_ray(spec).error is None
    fs, run = storage.filesystem(storage.run_dir(spec))
    return load_state(str(folder / "out" / "rwkv-final.pth")).time_state, fs, run


def test_keep_checkpoints_keeps_one_more_and_each_has_a_manifest(uninterrupted):
    _, fs, run = uninterrupted
    names = checkpoint_folders(fs, run)
    assert len(names) == 2  # keep_checkpoints 1, plus the newest (its manifest comes after Ray registers it)
    for name in names:
        assert storage.read_bytes(os.path.join(run, name, MANIFEST)) is not None


def truncate(fs, folder):
    for path in (f"{folder}/state.pth", largest_file(fs, f"{folder}/deepspeed")):
        with fs.open_input_stream(path) as f:
            payload = f.read()
        with fs.open_output_stream(path) as f:
            f.write(payload[: len(payload) // 2])


def drop_manifest(fs, folder):
    fs.delete_file(f"{folder}/{MANIFEST}")


def drop_rng_file(fs, folder):
    fs.delete_file(f"{folder}/rng-0.pt")


def largest_file(fs, folder) -> str:
    import pyarrow.fs
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    return max((i for i in infos if i.type == pyarrow.fs.FileType.File), key=lambda i: i.size).path


@pytest.mark.parametrize("damage, problem", [
    (truncate, "{cut} has {half} bytes, manifest.json says {size}"),
    (drop_manifest, "no manifest.json (the checkpoint was not completely written)"),
    (drop_rng_file, "rng-0.pt is missing"),
])
def test_each_kind_of_damage_is_named_by_the_quick_check(uninterrupted, tmp_path, damage, problem):
    """What a resume meets, on a copy of a real checkpoint folder: the quick check names each damage (the resume
    past it is shown below for one kind on a local folder and one on S3)."""
    import pyarrow.fs
    _, fs, run = uninterrupted
    folder, local = str(tmp_path / "checkpoint"), pyarrow.fs.LocalFileSystem()
    pyarrow.fs.copy_files(f"{run}/{checkpoint_folders(fs, run)[0]}", folder, source_filesystem=fs,
                          destination_filesystem=local)
    assert storage_problem(local, folder) is None
    cut = largest_file(local, f"{folder}/deepspeed")  # truncate cuts it and state.pth; it is listed first
    size = os.path.getsize(cut)
    damage(local, folder)
    assert storage_problem(local, folder) == problem.format(cut=os.path.relpath(cut, folder), half=size // 2,
                                                            size=size)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(uninterrupted, model, tmp_path, where, capsys):
    import pyarrow.fs
    reference, _, _ = uninterrupted
    storage_path = str(tmp_path / "runs") if where == "local" else f"s3://runs/integrity-{os.getpid()}"
    stopped = job(model, storage_path, "damaged", 2, tmp_path / "stopped")
    assert run_on_ray(stopped).error is None
    fs, run = storage.filesystem(storage.run_dir(stopped))
    newest, previous = checkpoint_folders(fs, run)
    pristine, local = str(tmp_path / "pristine"), pyarrow.fs.LocalFileSystem()
    pyarrow.fs.copy_files(run, pristine, source_filesystem=fs, destination_filesystem=local)

    def restore():
        fs.delete_dir_contents(run)
        pyarrow.fs.copy_files(pristine, run, source_filesystem=local, destination_filesystem=fs)

    capsys.readouterr()
    # a worker killed before the manifest, on a local folder; on S3 a cut file, read through the object store
    damage = drop_manifest if where == "local" else truncate
    damage(fs, f"{run}/{newest}")
    out = tmp_path / damage.__name__
    assert run_on_ray(job(model, storage_path, "damaged", 3, out), allow_changed_spec=True).error is None
    assert "resuming run 'damaged' from step 2/6\n" in capsys.readouterr().out
    assert torch.equal(load_state(str(out / "rwkv-final.pth")).time_state, reference)

    restore()
    drop_manifest(fs, f"{run}/{newest}")
    drop_rng_file(fs, f"{run}/{previous}")
    with pytest.raises(UserError) as refused:
        run_on_ray(job(model, storage_path, "damaged", 3, tmp_path / "none"), allow_changed_spec=True)
    assert str(refused.value) == (
        f"job.yaml: run 'damaged': none of its 2 checkpoint(s) in {storage.run_dir(stopped)} is intact (newest: "
        f"{newest}: no {MANIFEST} (the checkpoint was not completely written)); to start the run over, delete "
        f"{storage.run_dir(stopped)} or use a new run.name")


def test_a_data_file_broken_under_the_run_stops_it_in_one_line(s3_ray, model, tmp_path):
    """The driver's data check passed earlier (run_on_ray is what runs after it); the worker meets the bad line."""
    data = tmp_path / "changed.jsonl"
    data.write_text('{"text": "User: hi\\n\\nAssistant: hello"}\n{"text": \n')
    spec = job(model, str(tmp_path / "runs"), "changed", 1, tmp_path / "out")
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"file": str(data)})})
    with pytest.raises(UserError) as stopped:
        run_on_ray(spec)
    assert str(stopped.value) == f"a worker stopped: {data}:2: not valid JSON (Expecting value at column 9)"
