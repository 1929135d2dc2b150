"""sft data: a local Hugging Face dataset (a json, jsonl or parquet file, or a `save_to_disk` folder) of
instruction/response columns, as RWKV-PEFT's `--data_type sft` reads it, tokenized offline with the World tokenizer.

Each row becomes RWKV-PEFT's instruction prompt followed by `{response}\\n` and the end token; only the response
and the end token count toward the loss. `datasets` is imported here only, when sft data is read.
"""

from __future__ import annotations

import os

from rwkvray.errors import UserError

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(path: str, split: str):
    """The split of the dataset at `path` (a file or a save_to_disk folder), as a `datasets.Dataset`."""
    try:
        import datasets
    except ImportError:
        raise UserError("sft data is read with the datasets package: pip install 'rwkvray[sft]'") from None
    datasets.disable_progress_bars()
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path}: no split {split!r} in this dataset folder (it has: {', '.join(loaded)})")
            return loaded[split]
        return loaded
    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise UserError(f"{path}: sft data is a .json, .jsonl or .parquet file, or a save_to_disk folder")
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, split=split)
    except ValueError as e:  # an unknown split, or a bad slice such as train[:x]
        raise UserError(f"{path}: split {split!r}: {str(e).splitlines()[0]}") from None
    except datasets.exceptions.DatasetGenerationError as e:
        raise UserError(f"{path}: not readable as {builder} ({e.__cause__ or e})") from None


def sft_rows(path: str, split: str, fields: list[str]) -> list[tuple[str, str]]:
    """(instruction, response) of every row, after checking that both columns exist and hold text."""
    rows = load_rows(path, split)
    missing = [name for name in fields if name not in rows.column_names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (columns: {', '.join(rows.column_names)})")
    query, response = fields
    pairs = list(zip(rows[query], rows[response]))
    for number, pair in enumerate(pairs, start=1):
        for name, value in zip(fields, pair):
            if not isinstance(value, str):
                raise UserError(f"{path}: row {number}: column {name!r} must be text (got {type(value).__name__})")
    if not pairs:
        raise UserError(f"{path}: split {split!r} has no rows")
    return pairs


def sft_segments(instruction: str, response: str) -> list[tuple[str, bool]]:
    """(text, counts toward the loss) segments of one row: the prompt does not count, the response does."""
    return [(PROMPT.format(instruction=instruction), False), (response + "\n", True)]
