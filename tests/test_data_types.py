"""RWKV-PEFT's other data types (utf-8, utf-16le, numpy, uint16, sft, dummy), loss_mask se and dataload pad/only:
each reads as RWKV-PEFT means it, trains from its flags and from a spec, and its bad input is one line before
anything starts."""
import json
import shlex

import numpy as np
import pytest
import torch

from rwkvray.compat.rwkv_peft import spec_from_train_flags
from rwkvray.errors import UserError
from rwkvray.launch.prechecks import check_data_files
from rwkvray.spec import spec_from_dict
from rwkvray.text.tokenizer import EOS_ID, get_tokenizer
from rwkvray.train.data import TokenBatcher, load_documents, marker_mask
from rwkvray.train.sft_data import PROMPT
from tests.helpers import engine_steps, write_binidx

pytest.importorskip("deepspeed")
TEXT = "The cat sat on the mat. " * 40
ROWS = [{"query": f"Add {i} and 2.", "response": f"{i + 2}"} for i in range(6)]


@pytest.fixture
def files(tmp_path):
    """One small file of each type, by type (dummy has none)."""
    tokens = np.array(get_tokenizer().encode(TEXT), dtype=np.int64)
    (tmp_path / "t8.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "t16.txt").write_bytes(TEXT.encode("utf-16le"))
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    tokens.astype("<u2").tofile(tmp_path / "tokens.u16")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"utf-8": str(tmp_path / "t8.txt"), "utf-16le": str(tmp_path / "t16.txt"),
            "numpy": str(tmp_path / "tokens.npy"), "uint16": str(tmp_path / "tokens.u16"),
            "sft": str(tmp_path / "sft.jsonl"), "dummy": None}


def test_streams_hold_the_world_tokens_of_their_file(files):
    expected = get_tokenizer().encode(TEXT)
    for data_type in ("utf-8", "utf-16le", "numpy", "uint16"):
        (document,) = load_documents(files[data_type], data_type)
        assert document.tokens.tolist() == expected, data_type
        assert document.mask.all()


def test_dummy_is_rwkv_lm_sums_text():
    (document,) = load_documents(None, "dummy")
    text = get_tokenizer().decode(document.tokens[:40].tolist())
    assert text.startswith(".0+0=0..1+1=2..2+4=6..3+9=12..4+16=20.")


def test_sft_row_is_the_instruction_prompt_with_only_the_response_counted(files):
    tokenizer = get_tokenizer()
    documents = load_documents(files["sft"], "sft")
    assert len(documents) == len(ROWS)
    prompt = tokenizer.encode(PROMPT.format(instruction="Add 0 and 2."))
    response = tokenizer.encode("2\n")
    assert documents[0].tokens.tolist() == prompt + response + [EOS_ID]
    assert documents[0].mask.tolist() == [0.0] * len(prompt) + [1.0] * (len(response) + 1)
    assert PROMPT.startswith("Below is an instruction that describes a task. Write a response that appropriately")


def test_sft_reads_a_save_to_disk_folder_and_its_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = str(tmp_path / "ds")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:2]),
                          "train": datasets.Dataset.from_list(ROWS)}).save_to_disk(folder)
    assert len(load_documents(folder, "sft", sft_split="test")) == 2
    with pytest.raises(UserError, match=f"^{folder}: no split 'dev' in this dataset folder \\(it has: test, train\\)$"):
        load_documents(folder, "sft", sft_split="dev")


def test_se_mask_counts_from_mask1_to_mask0_and_all_when_none():
    tokens = np.array([5, 1, 2, 9, 3, 4, 9, 7])
    assert marker_mask(tokens, np.array([3, 4]), np.array([9])).tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    assert marker_mask(tokens, np.array([8]), np.array([6])).tolist() == [1] * 8  # no marker: every token counts


def test_se_mask_on_jsonl_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ignore this <a> learn this <b> not this"}) + "\n")
    (document,) = load_documents(str(path), "jsonl", "se", markers=(" <b>", " <a>"))  # as tokenized in the text
    tokenizer = get_tokenizer()
    counted = tokenizer.decode([t for t, m in zip(document.tokens.tolist(), document.mask) if m])
    assert counted == " <a> learn this"


def test_dataload_pad_takes_each_documents_first_piece_only(tmp_path):
    documents = load_documents_of_binidx(tmp_path, [list(range(1, 11)), [20, 21, 22]])
    everything = TokenBatcher(documents, 4, seed=0)
    first = TokenBatcher(documents, 4, seed=0, first_only=True)
    assert everything.spans.tolist() == [[0, 0, 5], [0, 4, 9], [0, 8, 10], [1, 0, 3]]
    assert first.spans.tolist() == [[0, 0, 5], [1, 0, 3]]


def load_documents_of_binidx(tmp_path, docs):
    write_binidx(str(tmp_path / "b"), docs)
    return load_documents(str(tmp_path / "b"), "binidx")


def flag_line(data_type: str, path: str | None, model: str) -> str:
    data = f"--data_file {path} " if path else ""
    return (f"--load_model {model} {data}--data_type {data_type} --ctx_len 16 --micro_bsz 2 --epoch_steps 3 "
            "--lr_init 0.05 --lr_final 0.05 --precision fp32 --op torch --accelerator cpu --peft state")


def spec_of(data_type: str, path: str | None, model: str, **data):
    return spec_from_dict({
        "model": {"path": model},
        "data": {"type": data_type, "ctx_len": 16, **({"file": path} if path else {}), **data},
        "optim": {"lr_init": 0.05, "lr_final": 0.05},
        "trainer": {"epoch_steps": 3, "micro_bsz": 2, "precision": "fp32", "op": "torch"},
    }, "test")


def trained_losses(spec) -> list[float]:
    """Three steps of the worker loop's own data and engine, on one fixed batch of the spec's data (run in the
    `deepspeed_world` child)."""
    from rwkvray.train.loop import WorkerContext, _build_engine, _build_module, _load_data
    quiet_rank = WorkerContext(session=None, rank=1, world_size=1, device=torch.device("cpu"))
    check_data_files(spec, 65536)
    documents, _ = _load_data(spec)
    batch = TokenBatcher(documents, spec.data.ctx_len, seed=0, first_only=spec.data.dataload != "pieces").batch(0, 0, 1, 2)
    engine = _build_engine(spec, _build_module(spec, quiet_rank.device), quiet_rank)
    return engine_steps(engine, batch, 3)


@pytest.mark.parametrize("data_type", ["utf-8", "utf-16le", "numpy", "uint16", "sft", "dummy"])
def test_each_type_trains_from_flags_and_from_a_spec(deepspeed_world, tiny_model, files, data_type):
    from_flags = spec_from_train_flags(shlex.split(flag_line(data_type, files[data_type], tiny_model)))
    from_spec = spec_of(data_type, files[data_type], tiny_model)
    assert from_flags.data.model_dump() == from_spec.data.model_dump()
    losses = deepspeed_world.submit(trained_losses, from_flags).result()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_se_and_dataload_only_train_from_flags(deepspeed_world, tiny_model, tmp_path):
    write_binidx(str(tmp_path / "b"), [get_tokenizer().encode("x <a> learn this well <b> skip") + [0]] * 3)
    line = flag_line("binidx", str(tmp_path / "b"), tiny_model).replace("--micro_bsz 2", "--micro_bsz 1")
    spec = spec_from_train_flags(shlex.split(line + " --loss_mask se --mask_id '{\"mask0\": \" <b>\", \"mask1\": \" <a>\"}' --dataload only"))
    assert (spec.data.loss_mask, spec.data.mask_id.mask0, spec.data.dataload) == ("se", " <b>", "only")
    documents = load_documents(spec.data.file, "binidx", "se", markers=(" <b>", " <a>"))
    assert 0 < documents[0].mask.sum() < len(documents[0].mask)
    losses = deepspeed_world.submit(trained_losses, spec).result()
    assert losses[-1] < losses[0], losses


def precheck_error(spec) -> str:
    with pytest.raises(UserError) as caught:
        check_data_files(spec, 65536)
    return str(caught.value)


def test_bad_input_of_each_type_is_one_line_before_anything_starts(tiny_model, tmp_path):
    odd = tmp_path / "odd.u16"
    odd.write_bytes(b"\x01\x00\x02")
    assert precheck_error(spec_of("uint16", str(odd), tiny_model)) == (
        f"test: data.file: {odd}: 3 bytes, an odd length: a uint16 token file has 2 bytes per token; nothing was started")
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 70000, 3], dtype=np.int64))
    assert precheck_error(spec_of("numpy", str(big), tiny_model)) == (
        f"test: data.file: {big}: token id 70000 at position 2 is outside the model's vocabulary (0 to 65535); "
        "nothing was started")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((2, 3), dtype=np.int64))
    assert "a numpy token file holds a 1-D array of integer token ids (got a 2-D int64 array)" in precheck_error(
        spec_of("numpy", str(flat), tiny_model))
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"fine \xff text")
    assert precheck_error(spec_of("utf-8", str(bad_text), tiny_model)) == (
        f"test: data.file: {bad_text}: not valid utf-8 at byte 5 (invalid start byte); nothing was started")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    line = flag_line("sft", str(sft), tiny_model)
    assert precheck_error(spec_from_train_flags(shlex.split(line))) == (
        f"train flags: --data_file: {sft}: no column 'query' (columns: instruction, output); nothing was started")
    fixed = spec_from_train_flags(shlex.split(line + " --sft_field instruction output"))
    check_data_files(fixed, 65536)


def test_binidx_token_ids_are_checked_against_the_vocabulary(tiny_model, tmp_path):
    write_binidx(str(tmp_path / "b"), [[1, 2, 3], [4, 65535]])
    spec = spec_of("binidx", str(tmp_path / "b"), tiny_model)
    check_data_files(spec, 65536)
    with pytest.raises(UserError) as caught:
        check_data_files(spec, 65535)
    assert str(caught.value) == (f"test: data.file: {tmp_path / 'b.bin'}: token id 65535 at position 4 is outside "
                                 "the model's vocabulary (0 to 65534); nothing was started")
