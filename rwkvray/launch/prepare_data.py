"""`rwkvray prepare-data`: jsonl files (local or s3://, gs://) -> one RWKV-LM binidx pair, tokenized on Ray Data.

The inputs are listed and checked here; each file is cut into byte ranges (train/jsonl_tokens.py), one Ray Data
block each; map_batches tokenizes a range per task on any CPU of the cluster; the results come back in input order
(preserve_order) and the driver appends them to a temp .bin, then writes the .idx and puts both in place (or
uploads them), the .idx last. A bad line stops everything before the output is touched, named by file and line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from rwkvray.errors import UserError
from rwkvray.files.atomic import atomic_path
from rwkvray.files.storage import filesystem, is_uri
from rwkvray.launch.ray_session import ray_session
from rwkvray.train.binidx import BinidxWriter, binidx_prefix, index_bytes, shuffle_order, write_shuffled
from rwkvray.train.jsonl_tokens import byte_ranges, read_range, tokenize_lines

MIN_RANGE_BYTES = 64 * 2**10  # ranges: about 4 per CPU, within these bounds
MAX_RANGE_BYTES = 16 * 2**20
PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often


@dataclass(frozen=True)
class InputFile:
    path: str  # a local path or a URI
    size: int


def prepare_data(inputs: list[str], out: str, address: str | None = None, shuffle_seed: int | None = None,
                 num_cpus: int | None = None, overwrite: bool = False) -> str:
    """Tokenize `inputs` into OUT.bin and OUT.idx; the summary line."""
    if num_cpus is not None and num_cpus < 1:
        raise UserError(f"--num-cpus: must be at least 1 (got {num_cpus})")
    if shuffle_seed is not None and shuffle_seed < 0:
        raise UserError(f"--shuffle-seed: must be 0 or more (got {shuffle_seed})")
    files = input_files(inputs)
    prefix = binidx_prefix(out)
    check_output(prefix, overwrite)
    with staged_output(prefix) as (bin_tmp, idx_tmp), ray_session(address, num_cpus=num_cpus):
        with open(bin_tmp, "wb") as bin_file:
            writer = BinidxWriter(bin_file)
            cpus, seconds = collect(files, writer, num_cpus)
        sizes = writer.sizes()
        if not len(sizes):
            raise UserError(f"{', '.join(inputs)}: no documents (only blank lines)")
        if shuffle_seed is not None:
            sizes = shuffle_in_place(bin_tmp, sizes, shuffle_seed)
        with open(idx_tmp, "wb") as f:
            f.write(index_bytes(sizes))
    return (f"wrote {prefix}.bin and {prefix}.idx: {len(sizes)} documents, {writer.tokens} tokens; "
            f"tokenized in {seconds:.1f} s on {cpus_text(cpus)} ({writer.tokens / seconds:,.0f} tokens/s)")


def cpus_text(cpus: int) -> str:
    return f"{cpus} CPU" + ("s" if cpus > 1 else "")


# ---------------------------------------------------------------- inputs and output


def input_files(inputs: list[str]) -> list[InputFile]:
    """Each input as given, a folder as the .jsonl files under it (sorted by path)."""
    import pyarrow.fs
    files = []
    for given in inputs:
        fs, inner = filesystem(given)
        try:
            info = fs.get_file_info(inner)
            if info.type == pyarrow.fs.FileType.Directory:
                found = [f for f in fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
                         if f.type == pyarrow.fs.FileType.File and f.base_name.endswith(".jsonl")]
                if not found:
                    raise UserError(f"{given}: a folder with no .jsonl files")
                files += [InputFile(path_of(given, f.path), f.size) for f in sorted(found, key=lambda f: f.path)]
            elif info.type == pyarrow.fs.FileType.File:
                files.append(InputFile(given, info.size))
            else:
                raise UserError(f"{given}: no such file or folder")
        except OSError as err:
            raise UserError(f"{given}: cannot read it ({err})") from None
    return files


def path_of(given: str, inner: str) -> str:
    """A path found under the input `given`, in the same form (a URI stays a URI)."""
    return f"{given.split('://', 1)[0]}://{inner}" if is_uri(given) else inner


def check_output(prefix: str, overwrite: bool) -> None:
    import pyarrow.fs
    fs, inner = filesystem(prefix)
    try:
        if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
            raise UserError(f"--out {prefix}: is a folder; give a file prefix (PREFIX.bin and PREFIX.idx are written)")
        for extension in (".bin", ".idx"):
            if fs.get_file_info(inner + extension).type != pyarrow.fs.FileType.NotFound and not overwrite:
                raise UserError(f"--out {prefix}: {prefix}{extension} exists; add --overwrite to replace it")
    except OSError as err:
        raise UserError(f"--out {prefix}: cannot check it ({err})") from None


@contextlib.contextmanager
def staged_output(prefix: str):
    """Temp paths for the .bin and the .idx; when the block succeeds the .bin goes in place, then the .idx
    (a URI: uploaded from a local temp folder), and on an error nothing is left."""
    if not is_uri(prefix):
        with atomic_path(prefix + ".idx") as idx_tmp, atomic_path(prefix + ".bin") as bin_tmp:
            yield bin_tmp, idx_tmp
        return
    import pyarrow.fs
    with tempfile.TemporaryDirectory(prefix="rwkvray-prepare-data-") as folder:
        bin_tmp, idx_tmp = os.path.join(folder, "out.bin"), os.path.join(folder, "out.idx")
        yield bin_tmp, idx_tmp
        fs, inner = filesystem(prefix)
        for local, extension in ((bin_tmp, ".bin"), (idx_tmp, ".idx")):
            print(f"uploading {prefix}{extension}", file=sys.stderr)
            pyarrow.fs.copy_files(local, inner + extension, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)


def shuffle_in_place(bin_path: str, sizes: np.ndarray, seed: int) -> np.ndarray:
    shuffled = bin_path + ".shuffled"
    try:
        with open(shuffled, "wb") as f:
            sizes = write_shuffled(bin_path, sizes, shuffle_order(len(sizes), seed), f)
        os.replace(shuffled, bin_path)
    finally:
        if os.path.exists(shuffled):
            os.remove(shuffled)
    return sizes


# ---------------------------------------------------------------- tokenizing on Ray Data


def tokenize_ranges(batch: dict) -> dict:
    """A map_batches function: each row a byte range of a file, tokenized into its documents."""
    from rwkvray.text.tokenizer import get_tokenizer
    tokens, sizes, lines, problem_lines, problems = [], [], [], [], []
    for path, start, end in zip(batch["path"], batch["start"], batch["end"]):
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            result = tokenize_lines(read_range(f, int(start), int(end)), path, get_tokenizer())
        tokens.append(result.tokens.tobytes())
        sizes.append(result.sizes.tobytes())
        lines.append(result.lines)
        problem_lines.append(result.problem_line)
        problems.append(result.problem)
    return {**batch, "tokens": np.array(tokens, dtype=object), "sizes": np.array(sizes, dtype=object),
            "lines": np.array(lines), "problem_line": np.array(problem_lines), "problems": np.array(problems)}


def collect(files: list[InputFile], writer: BinidxWriter, num_cpus: int | None) -> tuple[int, float]:
    """Tokenize every range on Ray Data and append the documents to `writer` in input order; the CPU count and
    the seconds it took."""
    import ray.data
    placement, cpus = task_placement(files, num_cpus)
    total = sum(f.size for f in files)
    range_bytes = min(MAX_RANGE_BYTES, max(MIN_RANGE_BYTES, total // (4 * cpus)))
    ranges = [{"file": i, "path": f.path, "start": start, "end": end}
              for i, f in enumerate(files) for start, end in byte_ranges(f.size, range_bytes)]
    if not ranges:
        return cpus, 0.0
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # ours counts bytes and tokens
    pool = ray.data.TaskPoolStrategy(size=min(cpus, len(ranges)))
    dataset = ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
        tokenize_ranges, batch_size=1, compute=pool, **placement)
    progress = Progress(total, cpus)
    file_index, lines_before = -1, 0
    with quiet_ray_data():
        for row in dataset.iter_rows():
            if row["file"] != file_index:
                file_index, lines_before = row["file"], 0
            if row["problem_line"] >= 0:
                raise UserError(f"{row['path']}:{lines_before + row['problem_line'] + 1}: {row['problems']}")
            lines_before += row["lines"]
            writer.add(np.frombuffer(row["tokens"], np.uint16), np.frombuffer(row["sizes"], np.int32))
            progress.advance(row["end"] - row["start"], writer.tokens)
    progress.close()
    return cpus, time.monotonic() - progress.started


def task_placement(files: list[InputFile], num_cpus: int | None) -> tuple[dict, int]:
    """Where the tokenizing tasks run (map_batches arguments) and on how many CPUs: anywhere in the cluster when
    every input is a URI; on this node when one is a local file, since only this node may have it."""
    import ray
    local = next((f.path for f in files if not is_uri(f.path)), None)
    if local is None:
        placement, available = {}, int(ray.cluster_resources().get("CPU", 0))
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = ray.get_runtime_context().get_node_id()
        available = int(next(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["NodeID"] == here))
        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    if available < 1 and local:
        raise UserError(f"{local}: a local file is read on this node, which has no CPU for Ray tasks; put the input "
                        "in a bucket (s3://, gs://) that every node reads")
    if available < 1:
        raise UserError("the Ray cluster has no CPU for tasks; tokenizing needs at least one")
    return placement, min(num_cpus or available, available)


@contextlib.contextmanager
def quiet_ray_data():
    """Ray Data's start and finish lines (and its note that its bars are off) stay in its log files."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Progress:
    """A tqdm bar over the input bytes on a terminal, else a line every PROGRESS_EVERY_S."""

    def __init__(self, total_bytes: int, cpus: int):
        self.total = total_bytes
        self.done = 0
        self.started = self.last_line = time.monotonic()
        print(f"prepare-data: {total_bytes / 2**20:.1f} MiB of jsonl on {cpus_text(cpus)}", file=sys.stderr)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True)

    def advance(self, size: int, tokens: int) -> None:
        self.done += size
        rate = tokens / max(time.monotonic() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(size)
            self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            print(f"prepare-data: {100 * self.done // max(self.total, 1)}% of the input, {tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
