"""The atomic writer: whole files or none, with the permissions a plain open() would give."""
import contextlib
import os
import stat

import pytest
import torch

from rwkvray.files.atomic import atomic_path, write_atomically, write_bytes_atomically
from rwkvray.model.state_file import export_state


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_a_plain_open_gives(tmp_path, mask, expected):
    with umask(mask):
        write_bytes_atomically(str(tmp_path / "a.bin"), b"abc")
        write_atomically(str(tmp_path / "b.pt"), lambda tmp: torch.save({"x": torch.zeros(2)}, tmp))
        with atomic_path(str(tmp_path / "sub" / "c.json")) as tmp, open(tmp, "w") as f:
            f.write("{}")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    assert mode(tmp_path / "plain.txt") == expected
    for name in ("a.bin", "b.pt", "sub/c.json"):
        assert mode(tmp_path / name) == expected, name
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "state.pth"
    target.write_bytes(b"old")

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(str(target), fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.pth"]


def test_exported_state_file_is_0644_under_umask_022(tmp_path):
    from rwkvray.model.checkpoint import TIME_STATE_KEY
    state = tmp_path / "s.pth"
    torch.save({TIME_STATE_KEY.format(0): torch.zeros(1, 64, 64)}, state)
    with umask(0o022):
        export_state(str(state), str(tmp_path / "s.st"), "safetensors")
    assert mode(tmp_path / "s.st") == 0o644


def test_a_taken_name_is_refused_unless_replaced_and_then_kept_as_previous(tmp_path):
    from rwkvray.files.versions import NameTaken, previous_path, write_new_version
    state, card = tmp_path / "s1.pth", tmp_path / "s1.json"
    assert write_new_version(str(state), b"one", replace=False, companions={str(card): b"card one"}) is False
    with pytest.raises(NameTaken):
        write_new_version(str(state), b"two", replace=False, companions={str(card): b"card two"})
    assert sorted(os.listdir(tmp_path)) == ["s1.json", "s1.pth"] and card.read_text() == "card one"
    assert write_new_version(str(state), b"two", replace=True, companions={str(card): None}) is True
    assert previous_path(str(state)) == str(tmp_path / "s1.prev.pth")
    assert (tmp_path / "s1.prev.pth").read_text() == "one" and (tmp_path / "s1.prev.json").read_text() == "card one"
    assert not card.exists()  # the new version has no card: the old one would describe another state
    write_new_version(str(state), b"three", replace=True, companions={str(card): b"card three"})
    assert (tmp_path / "s1.prev.pth").read_text() == "two" and not (tmp_path / "s1.prev.json").exists()
    assert state.read_text() == "three" and card.read_text() == "card three"
    assert sorted(os.listdir(tmp_path)) == ["s1.json", "s1.prev.pth", "s1.pth"]  # no temp file left behind
