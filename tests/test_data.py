import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvray.train.data import (
    Document,
    TokenBatcher,
    eval_batches,
    load_documents,
    piece_spans,
    split_holdout,
)
from rwkvray.errors import UserError
from rwkvray.text.chat import render_chat
from rwkvray.text.tokenizer import get_tokenizer
from tests.helpers import write_binidx

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "rwkvray" / "sample_data"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def text_line(text: str) -> str:
    return json.dumps({"text": text}, ensure_ascii=False)


def token_docs(*lengths: int) -> list[Document]:
    """Documents whose tokens count up from 1, so every position is recognizable."""
    docs, next_token = [], 1
    for n in lengths:
        docs.append(Document(np.arange(next_token, next_token + n, dtype=np.int64), np.ones(n, dtype=np.float32)))
        next_token += n
    return docs


def masked_runs(tokenizer, doc: Document) -> list[str]:
    """Decode each maximal run of mask == 1 tokens."""
    runs, current = [], []
    for token, counted in zip(doc.tokens.tolist(), doc.mask.tolist()):
        if counted:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# ---------------------------------------------------------------- bad data


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=f"^data file not found: {re.escape(str(missing))}$"):
        load_documents(str(missing))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [text_line("fine"), '{"text": oops}'])
    expected = f"{path}:2: not valid JSON (Expecting value at column 10)"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_documents(path)


def test_line_without_text_or_messages(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [text_line("fine"), "", '{"prompt": "x"}'])
    expected = f'{path}:3: expected a JSON object with exactly one of "text" or "messages"'
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_documents(path)


def test_text_that_is_not_a_string(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": 5}'])
    with pytest.raises(UserError, match=f'^{re.escape(path)}:1: "text" must be a string \\(got int\\)$'):
        load_documents(path)


def test_bad_message_role_names_key_path(tmp_path):
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
    path = write_lines(tmp_path / "d.jsonl", [line])
    expected = f"{path}:1: messages[1].role must be one of system, user, assistant (got 'bot')"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_documents(path)


def test_empty_data(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", "   "])
    with pytest.raises(UserError, match=f"^{re.escape(path)}: no documents \\(the file has no non-blank lines\\)$"):
        load_documents(path)


def test_qa_line_without_assistant_turn(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [text_line("User: a\n\nAssistant: b"), text_line("just prose")])
    expected = f"{path}:2: loss_mask 'qa' needs an assistant turn ('Assistant:') and this line has none"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_documents(path, loss_mask="qa")


def test_unknown_options():
    with pytest.raises(UserError, match=r"^data_type must be one of jsonl, binidx, sft, utf-8, utf-16le, numpy, "
                                        r"uint16, dummy \(got 'csv'\)$"):
        load_documents("x", data_type="csv")
    with pytest.raises(UserError, match=r"^loss_mask must be one of none, qa, se \(got 'all'\)$"):
        load_documents("x", loss_mask="all")


def test_bad_binidx_magic(tmp_path):
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX\x00" + bytes(30))
    (tmp_path / "d.bin").write_bytes(b"")
    expected = f"{tmp_path / 'd.idx'}: not a Megatron binidx index (bad magic b'NOTANIDX\\x00')"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_documents(str(tmp_path / "d"), data_type="binidx")


def test_missing_binidx(tmp_path):
    with pytest.raises(UserError, match=f"^binidx file not found: {re.escape(str(tmp_path / 'd.idx'))}$"):
        load_documents(str(tmp_path / "d.bin"), data_type="binidx")


# ---------------------------------------------------------------- chat and masks


def test_render_chat_form():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi\n\n\nthere "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "bye"},
    ]
    expected = "System: Be brief.\n\nUser: hi\nthere\n\nAssistant: Hello!\n\nUser: bye"
    assert render_chat(messages) == expected
    assert render_chat(messages, add_generation_prompt=True) == expected + "\n\nAssistant:"
    assert render_chat([], add_generation_prompt=True) == "Assistant:"


def test_plain_text_counts_every_token(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [text_line("Once upon a time 🚀")])
    (doc,) = load_documents(path, tokenizer=tok)
    assert doc.tokens.tolist() == tok.encode("Once upon a time 🚀") + [0]
    assert doc.tokens.dtype == np.int64 and doc.mask.dtype == np.float32
    assert doc.mask.tolist() == [1.0] * len(doc.tokens)


def test_qa_mask_covers_exactly_the_assistant_replies(tmp_path, tok):
    text = "User: hi there\n\nAssistant: Hello, friend! 🚀\n\nUser: and you?\n\nAssistant: Beep boop, all good."
    path = write_lines(tmp_path / "d.jsonl", [text_line(text)])
    (doc,) = load_documents(path, loss_mask="qa", tokenizer=tok)
    assert masked_runs(tok, doc) == [" Hello, friend! 🚀", " Beep boop, all good."]
    assert doc.tokens[-1] == 0 and doc.mask[-1] == 1.0  # the final eos is learned
    assert tok.decode(doc.tokens) == text


def test_qa_mask_ending_in_a_user_turn_does_not_learn_eos(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [text_line("User: a\n\nAssistant: b\n\nUser: c")])
    (doc,) = load_documents(path, loss_mask="qa", tokenizer=tok)
    assert masked_runs(tok, doc) == [" b"]
    assert doc.mask[-1] == 0.0


def test_messages_and_text_lines_give_the_same_document(tmp_path, tok):
    messages = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "It is 4! 🚀"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Anytime!"},
    ]
    lines = [json.dumps({"messages": messages}), text_line(render_chat(messages))]
    path = write_lines(tmp_path / "d.jsonl", lines)
    for loss_mask in ("none", "qa"):
        from_messages, from_text = load_documents(path, loss_mask=loss_mask, tokenizer=tok)
        assert from_messages.tokens.tolist() == from_text.tokens.tolist()
        assert from_messages.mask.tolist() == from_text.mask.tolist()
    assert masked_runs(tok, from_messages) == [" It is 4! 🚀", " Anytime!"]


def test_bundled_persona_data_loads_in_qa_mode(tok):
    train = load_documents(str(SAMPLE_DATA / "persona.jsonl"), loss_mask="qa", tokenizer=tok)
    held_out = load_documents(str(SAMPLE_DATA / "persona_eval.jsonl"), loss_mask="qa", tokenizer=tok)
    assert len(train) == 200 and len(held_out) == 20
    for doc in train + held_out:
        (reply,) = masked_runs(tok, doc)
        assert reply.startswith(" ") and reply.endswith(" 🚀")


# ---------------------------------------------------------------- binidx


def test_binidx_round_trip(tmp_path):
    docs = [[5, 6, 7, 0], [65535, 0], [], [1, 2, 3, 4, 5, 0]]
    prefix = str(tmp_path / "corpus")
    write_binidx(prefix, docs)
    idx = (tmp_path / "corpus.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<QBQQ", idx, 9) == (1, 8, 4, 5)  # version, uint16 code, sequences, doc_idx
    assert (tmp_path / "corpus.bin").stat().st_size == 2 * 12
    for path in (prefix, prefix + ".bin", prefix + ".idx"):
        loaded = load_documents(path, data_type="binidx")
        assert [d.tokens.tolist() for d in loaded] == docs
        assert [d.mask.tolist() for d in loaded] == [[1.0] * len(d) for d in docs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temp files left


def test_binidx_document_spanning_several_sequences(tmp_path):
    """Megatron groups sequences into documents with doc_idx; here 3 sequences form 2 documents."""
    tokens = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    sizes = np.array([2, 1, 3], dtype=np.int32)
    pointers = np.array([0, 8, 12], dtype=np.int64)
    doc_idx = np.array([0, 2, 3], dtype=np.int64)
    header = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 4, 3, 3)
    (tmp_path / "d.idx").write_bytes(header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    (tmp_path / "d.bin").write_bytes(tokens.tobytes())
    loaded = load_documents(str(tmp_path / "d"), data_type="binidx")
    assert [d.tokens.tolist() for d in loaded] == [[1, 2, 3], [4, 5, 6]]


def test_binidx_rejects_qa_mask(tmp_path):
    with pytest.raises(UserError, match=r"^loss_mask 'qa' does not apply to binidx data \(x\)$"):
        load_documents("x", data_type="binidx", loss_mask="qa")


# ---------------------------------------------------------------- pieces and batches


def test_long_document_is_split_without_loss():
    (doc,) = token_docs(25)
    spans = piece_spans([doc], ctx_len=8)
    assert spans.tolist() == [[0, 0, 9], [0, 8, 17], [0, 16, 25]]
    batches = list(eval_batches([doc], ctx_len=8, micro_bsz=2))
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 8), (1, 8)]
    targets = torch.cat([b.targets[b.mask > 0] for b in batches])
    assert targets.tolist() == doc.tokens[1:].tolist()  # every target exactly once, in order


def test_pieces_without_counted_targets_are_left_out():
    (doc,) = token_docs(10)
    doc.mask[:7] = 0.0  # only tokens 7..9 count: they all fall in the last piece of ctx_len 4
    assert piece_spans([doc], ctx_len=4).tolist() == [[0, 4, 9], [0, 8, 10]]


def test_batches_are_deterministic_and_stateless():
    docs = token_docs(5, 30, 12)
    first = TokenBatcher(docs, ctx_len=8, seed=3)
    second = TokenBatcher(docs, ctx_len=8, seed=3)
    late = second.batch(step=500, rank=1, world_size=2, micro_bsz=4)  # a resumed run starts here
    for step in range(3):
        first.batch(step, rank=1, world_size=2, micro_bsz=4)
    again = first.batch(step=500, rank=1, world_size=2, micro_bsz=4)
    for name in ("input_ids", "targets", "mask"):
        assert torch.equal(getattr(late, name), getattr(again, name))
    other_rank = first.batch(step=500, rank=0, world_size=2, micro_bsz=4)
    other_seed = TokenBatcher(docs, ctx_len=8, seed=4).batch(step=500, rank=1, world_size=2, micro_bsz=4)
    assert not torch.equal(other_rank.input_ids, late.input_ids)
    assert not torch.equal(other_seed.input_ids, late.input_ids)


def test_few_documents_serve_many_steps(tmp_path, tok):
    lines = [text_line(f"User: q{i}\n\nAssistant: a{i}") for i in range(3)]
    docs = load_documents(write_lines(tmp_path / "d.jsonl", lines), loss_mask="qa", tokenizer=tok)
    batcher = TokenBatcher(docs, ctx_len=64, seed=0)
    seen = set()
    for step in range(1000):
        batch = batcher.batch(step, rank=0, world_size=1, micro_bsz=2)
        assert batch.input_ids.shape[0] == 2 and batch.mask.sum() > 0
        seen.update(tuple(row) for row in batch.input_ids.tolist())
    assert len(seen) == 3


def test_padding_uses_token_zero_and_mask_zero():
    docs = token_docs(4, 9)
    docs[1].mask[:3] = 0.0  # the targets at positions 1 and 2 do not count
    batch = next(eval_batches(docs, ctx_len=16, micro_bsz=2))
    assert batch.input_ids.dtype == torch.int64 and batch.targets.dtype == torch.int64
    assert batch.mask.dtype == torch.float32
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch.targets.tolist() == [[2, 3, 4, 0, 0, 0, 0, 0], [6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]


def test_no_trainable_pieces_is_a_user_error():
    docs = token_docs(1, 1)
    with pytest.raises(UserError, match="^no training pieces: every document is shorter than 2 tokens"):
        TokenBatcher(docs, ctx_len=8, seed=0)


def test_split_holdout():
    docs = token_docs(*range(2, 12))
    train, val = split_holdout(docs, fraction=0.2, seed=7)
    assert (len(train), len(val)) == (8, 2)
    assert sorted(id(d) for d in train + val) == sorted(id(d) for d in docs)
    assert [id(d) for d in split_holdout(docs, 0.2, seed=7)[1]] == [id(d) for d in val]
    assert [id(d) for d in train] == [id(d) for d in docs if any(d is t for t in train)]  # order kept
    tiny_train, tiny_val = split_holdout(docs[:2], fraction=0.01, seed=0)
    assert (len(tiny_train), len(tiny_val)) == (1, 1)
    with pytest.raises(UserError, match=r"^holdout fraction must be between 0 and 1 \(got 1.5\)$"):
        split_holdout(docs, 1.5, seed=0)


def test_scan_streams_with_progress_and_accepts_good_files(tmp_path):
    from rwkvray.train.data import scan_jsonl
    data = tmp_path / "big.jsonl"
    data.write_text('{"text": "User: hi\\n\\nAssistant: hello"}\n' * 1000)
    said = []
    assert scan_jsonl(str(data), "qa", say=lambda line, flush: said.append(line), progress_from=1) == []
    size = data.stat().st_size
    assert said == [f"checking big.jsonl: {p}% of {size / 2**20:.0f} MiB" for p in range(10, 101, 10)]
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert scan_jsonl(str(blank), "none") == [f"{blank}: no documents (the file has no non-blank lines)"]
