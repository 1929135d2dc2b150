"""`rwkvray prepare-data`: jsonl (text and chat rows, several files, local or in a moto S3 bucket) tokenized on Ray
Data into a binidx pair byte-identical to a one-process tokenization written here from RWKV-LM's make_data.py
rules; the pair reads back as training data; bad lines are one line naming file and line; the range reader
holds every line exactly once however the file is cut."""
import json
import os
import random
import struct

import numpy as np
import pytest

from rwkvray.cli import main
from rwkvray.text.chat import render_chat
from rwkvray.text.tokenizer import get_tokenizer
from rwkvray.train.data import load_documents
from rwkvray.train.jsonl_tokens import byte_ranges, document_tokens, read_range, split_lines, tokenize_lines

pytestmark = pytest.mark.ray
WORDS = ["state", "tuning", "RWKV", "数据", "模型", "naïve", "émoji 🙂", "tabs\t", "quotes \"x\"", "new\nline"]


def text_row(rng: random.Random) -> dict:
    return {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))}


def chat_row(rng: random.Random) -> dict:
    turns = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns += [{"role": "user", "content": text_row(rng)["text"]},
                  {"role": "assistant", "content": text_row(rng)["text"]}]
    return {"messages": turns}


def write_corpus(folder) -> list:
    """Three jsonl files (one spans several of prepare-data's 64 KiB ranges), blank lines, a last line without a
    newline, and a file that is not jsonl; the files in the order a folder input lists them."""
    rng = random.Random(0)
    lines = {"a/part-0.jsonl": [json.dumps(text_row(rng)) for _ in range(3000)],
             "a/part-1.jsonl": [json.dumps(chat_row(rng), ensure_ascii=False) for _ in range(40)],
             "b.jsonl": [json.dumps(text_row(rng)), "", "  ", json.dumps({"text": "User: hi\n\nAssistant: hello"})]}
    for name, rows in lines.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        ending = "" if name == "b.jsonl" else "\n"
        (folder / name).write_text("\n".join(rows) + ending, encoding="utf-8")
    (folder / "a" / "notes.txt").write_text("not data\n")
    return [folder / name for name in sorted(lines)]


def make_data_reference(paths) -> tuple[list[np.ndarray], bytes, bytes]:
    """One process, as RWKV-LM's make_data.py: each row's text (chat rows in our template) tokenized, then token
    0; uint16 tokens in .bin; Megatron's index (one sequence per document) in .idx."""
    tokenizer = get_tokenizer()
    documents = []
    for path in paths:
        for line in open(path, encoding="utf-8"):
            if line.strip():
                row = json.loads(line)
                text = row["text"] if "text" in row else render_chat(row["messages"])
                documents.append(np.array(tokenizer.encode(text) + [0], dtype=np.uint16))
    sizes = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * 2)]).astype(np.int64)
    index = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sizes), len(sizes) + 1) + sizes.tobytes()
             + pointers.tobytes() + np.arange(len(sizes) + 1, dtype=np.int64).tobytes())
    return documents, b"".join(d.tobytes() for d in documents), index


@pytest.fixture(scope="module")
def ray_with_bucket(s3_server):
    """One Ray instance (2 CPUs) for the module, started with the moto bucket's AWS_* settings."""
    import ray
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(folder)
    return folder, paths, make_data_reference(paths)


def prepare(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare-data", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ray_data_output_is_byte_identical_to_one_process_and_trains(ray_with_bucket, corpus, tmp_path, capsys):
    folder, paths, (documents, bin_bytes, idx_bytes) = corpus
    assert (folder / "a" / "part-0.jsonl").stat().st_size > 3 * 64 * 2**10  # several ranges, cut mid-line
    code, out, _ = prepare(capsys, folder / "a", folder / "b.jsonl", "--out", tmp_path / "out" / "corpus")
    assert code == 0
    assert out.startswith(f"wrote {tmp_path}/out/corpus.bin and {tmp_path}/out/corpus.idx: {len(documents)} "
                          f"documents, {len(bin_bytes) // 2} tokens; tokenized in ")
    assert (tmp_path / "out" / "corpus.bin").read_bytes() == bin_bytes
    assert (tmp_path / "out" / "corpus.idx").read_bytes() == idx_bytes
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]
    read_back = load_documents(str(tmp_path / "out" / "corpus"), "binidx")
    assert [d.tokens.tolist() for d in read_back] == [d.tolist() for d in documents]
    jsonl_training = load_documents(str(paths[1]), "jsonl")  # the chat rows train as the same tokens from jsonl
    first_chat = sum(1 for line in open(paths[0]) if line.strip())
    assert [d.tokens.tolist() for d in jsonl_training] == [d.tolist() for d in documents[first_chat:][:40]]

    code, _, err = prepare(capsys, folder / "b.jsonl", "--out", tmp_path / "out" / "corpus")
    assert (code, err) == (2, f"error: --out {tmp_path}/out/corpus: {tmp_path}/out/corpus.bin exists; "
                              "add --overwrite to replace it\n")


def test_shuffle_seed_permutes_documents_deterministically(ray_with_bucket, corpus, tmp_path, capsys):
    folder, paths, (documents, _, _) = corpus
    assert prepare(capsys, *paths, "--out", tmp_path / "s", "--shuffle-seed", 7, "--num-cpus", 1)[0] == 0
    order = np.random.default_rng(7).permutation(len(documents))
    read_back = load_documents(str(tmp_path / "s"), "binidx")
    assert [d.tokens.tolist() for d in read_back] == [documents[i].tolist() for i in order]


def test_bucket_in_bucket_out(ray_with_bucket, corpus, tmp_path, capsys):
    import pyarrow.fs
    folder, paths, (_, bin_bytes, idx_bytes) = corpus
    fs, _ = pyarrow.fs.FileSystem.from_uri("s3://runs/x")
    for path in paths:
        with fs.open_output_stream(f"runs/corpus/{path.relative_to(folder)}") as f:
            f.write(path.read_bytes())
    code, out, _ = prepare(capsys, "s3://runs/corpus", "--out", "s3://runs/prepared/corpus")
    assert code == 0 and out.startswith("wrote s3://runs/prepared/corpus.bin and s3://runs/prepared/corpus.idx")
    for extension, expected in ((".bin", bin_bytes), (".idx", idx_bytes)):
        with fs.open_input_stream(f"runs/prepared/corpus{extension}") as f:
            assert f.read() == expected

    code, _, err = prepare(capsys, "s3://runs/nothing-here", "--out", tmp_path / "x")
    assert (code, err) == (2, "error: s3://runs/nothing-here: no such file or folder\n")


def test_a_bad_line_deep_in_a_file_is_named_by_file_and_line(ray_with_bucket, corpus, tmp_path, capsys):
    _, paths, _ = corpus
    rows = paths[0].read_text().splitlines()
    rows[2500] = '{"txt": "typo"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    code, out, err = prepare(capsys, paths[2], bad, "--out", tmp_path / "p")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == f'error: {bad}:2501: expected a JSON object with exactly one of "text" or "messages"'
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written, no temp file left


def test_refusals_before_ray_starts(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "folder").mkdir()
    for args, line in (([tmp_path / "none.jsonl"], f"{tmp_path}/none.jsonl: no such file or folder"),
                       ([tmp_path / "folder"], f"{tmp_path}/folder: a folder with no .jsonl files"),
                       ([tmp_path / "d.jsonl", "--out", tmp_path / "folder"],
                        f"--out {tmp_path}/folder: is a folder; give a file prefix (PREFIX.bin and PREFIX.idx are "
                        "written)"),
                       ([tmp_path / "d.jsonl", "--num-cpus", 0], "--num-cpus: must be at least 1 (got 0)")):
        out_args = [] if "--out" in args else ["--out", tmp_path / "o"]
        assert prepare(capsys, *args, *out_args)[1:] == ("", f"error: {line}\n")


# ---------------------------------------------------------------- without Ray


def test_every_line_is_in_exactly_one_range_however_the_file_is_cut(tmp_path):
    rng = random.Random(1)
    lines = [b"x" * rng.choice([0, 1, 2, 5, 40, 300]) for _ in range(200)]
    for ending in (b"", b"\n"):
        path = tmp_path / "f"
        path.write_bytes(b"\n".join(lines) + ending)
        size = path.stat().st_size
        for range_bytes in (1, 2, 3, 7, 64, 299, 301, 4096, size):
            with open(path, "rb") as f:
                pieces = [split_lines(read_range(f, start, end)) for start, end in byte_ranges(size, range_bytes)]
            assert [line for piece in pieces for line in piece] == lines, range_bytes


def test_bad_rows_are_refused_with_the_reason():
    tokenizer = get_tokenizer()
    cases = {b'{"id": 3}': 'expected a JSON object with exactly one of "text" or "messages"',
             b'{"text": ""}': 'no text (an empty "text", or "messages" that render to nothing)',
             b'{"messages": []}': 'no text (an empty "text", or "messages" that render to nothing)',
             b'{"text": "ok \\ud800 then"}': "the text does not round-trip through the World tokenizer (character "
                                             "4, '\\ud800', decodes as '�')",
             b'{"text": 5}': '"text" must be a string (got int)',
             b'{"messages": [{"role": "robot", "content": "x"}]}':
                 "messages[0].role must be one of system, user, assistant (got 'robot')",
             b"\xff": "not valid UTF-8"}
    for raw, reason in cases.items():
        result = tokenize_lines(b'{"text": "fine"}\n\n' + raw + b"\n", "f.jsonl", tokenizer)
        assert (result.lines, result.problem_line, result.problem) == (3, 2, reason), raw
        with pytest.raises(Exception, match=rf"^f\.jsonl:9: "):
            document_tokens(raw, "f.jsonl:9", tokenizer)
