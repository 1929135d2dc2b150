"""Eval rows: one jsonl line is one item, and its keys say its kind.

- multiple choice `{"prompt", "choices", "answer"}`: each choice scored by the summed log-probability of its
  tokens (the choice string encoded alone) after the prompt's tokens; metric `mc_acc`;
- generation `{"prompt", "reference"}` (a string or a list): greedy text, cut at the first blank line and
  stripped; metrics `exact` and `contains`;
- text `{"text"}`: metric `loss`, the mean next-token NLL over every token after the first;
- chat `{"messages"}`: metric `loss` over the assistant replies only, exactly as `loss_mask: qa` trains.

Every bad row is refused with one line naming the file and line, before any model is loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rwkvray.errors import UserError
from rwkvray.text.chat import chat_segments
from rwkvray.train.data import segmented_document

KIND_KEYS = {"choice": ("prompt", "choices", "answer"), "generate": ("prompt", "reference"),
             "text": ("text",), "chat": ("messages",)}
KIND_METRICS = {"choice": ("mc_acc",), "generate": ("exact", "contains"), "text": ("loss",), "chat": ("loss",)}
ROW_FORMS = ('{"prompt", "choices", "answer"}, {"prompt", "reference"}, {"text"} or {"messages"}')


@dataclass
class Scored:
    """A token sequence whose log-probabilities count where `mask[i]` (tokens[i] predicted from tokens[:i])."""
    tokens: list[int]
    mask: list[bool]


@dataclass
class Item:
    data: str    # the file's name
    index: int   # the item's place in its file, from 0
    kind: str    # choice, generate, text or chat
    prompt: list[int] = field(default_factory=list)       # choice, generate
    scored: list[Scored] = field(default_factory=list)    # one per choice (choice); one sequence (text, chat)
    answer: int = -1                                      # choice
    references: list[str] = field(default_factory=list)   # generate, stripped

    @property
    def metrics(self) -> tuple[str, ...]:
        return KIND_METRICS[self.kind]


def read_items(path: str, tokenizer) -> list[Item]:
    """The items of one eval file, named by its file name."""
    if not os.path.isfile(path):
        raise UserError(f"eval data file not found: {path}")
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    items = parse_rows(lines, os.path.basename(path), lambda lineno: f"{path}:{lineno}", tokenizer)
    if not items:
        raise UserError(f"{path}: no eval rows (the file has no non-blank lines)")
    return items


def parse_rows(lines: list, data: str, label, tokenizer) -> list[Item]:
    """Items from jsonl lines (bytes or str, or already-parsed dicts); `label(n)` names line n (from 1) in errors."""
    items = []
    for lineno, line in enumerate(lines, start=1):
        where = label(lineno)
        row = decoded(line, where)
        if row is not None:
            items.append(make_item(row, data, len(items), where, tokenizer))
    return items


def decoded(line, where: str):
    if isinstance(line, dict):
        return line
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not valid UTF-8") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def row_kind(row, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, one of {ROW_FORMS}")
    if "choices" in row or "answer" in row:
        kind = "choice"
    elif "reference" in row:
        kind = "generate"
    elif "prompt" in row:
        raise UserError(f'{where}: a row with "prompt" needs "choices" and "answer" (multiple choice) or '
                        '"reference" (generation)')
    elif ("text" in row) == ("messages" in row):
        raise UserError(f"{where}: expected one of {ROW_FORMS}")
    else:
        kind = "text" if "text" in row else "chat"
    missing = [key for key in KIND_KEYS[kind] if key not in row]
    if missing:
        raise UserError(f'{where}: missing key "{missing[0]}" (a {kind} row has {", ".join(KIND_KEYS[kind])})')
    extra = sorted(set(row) - set(KIND_KEYS[kind]))
    if extra:
        raise UserError(f'{where}: unexpected key "{extra[0]}" in a {kind} row (it has {", ".join(KIND_KEYS[kind])})')
    return kind


def make_item(row, data: str, index: int, where: str, tokenizer) -> Item:
    kind = row_kind(row, where)
    item = Item(data, index, kind)
    if kind in ("choice", "generate"):
        prompt = string(row, "prompt", where)
        item.prompt = tokenizer.encode(prompt)
        if not item.prompt:
            raise UserError(f'{where}: "prompt" must not be empty')
    if kind == "choice":
        item.scored, item.answer = choices(row, item.prompt, where, tokenizer)
    elif kind == "generate":
        item.references = references(row["reference"], where)
    elif kind == "text":
        tokens = tokenizer.encode(string(row, "text", where))
        if len(tokens) < 2:
            raise UserError(f'{where}: "text" must hold at least 2 tokens (the loss predicts every token after '
                            "the first)")
        item.scored = [Scored(tokens, [False] + [True] * (len(tokens) - 1))]
    else:
        try:
            segments = chat_segments(row["messages"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not any(is_reply for _, is_reply in segments):
            raise UserError(f'{where}: "messages" needs an assistant reply (the loss covers the replies only)')
        document = segmented_document(segments, tokenizer)
        mask = [False] + [bool(m) for m in document.mask[1:]]  # the first token has nothing to be predicted from
        if not any(mask):
            raise UserError(f'{where}: "messages" has no reply token after the first token')
        item.scored = [Scored(document.tokens.tolist(), mask)]
    return item


def string(row: dict, key: str, where: str) -> str:
    if not isinstance(row[key], str):
        raise UserError(f'{where}: "{key}" must be a string (got {type(row[key]).__name__})')
    return row[key]


def choices(row: dict, prompt: list[int], where: str, tokenizer) -> tuple[list[Scored], int]:
    options, answer = row["choices"], row["answer"]
    if not isinstance(options, list) or len(options) < 2:
        raise UserError(f'{where}: "choices" must be a list of at least 2 strings')
    scored = []
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise UserError(f'{where}: choices[{i}] must be a string (got {type(option).__name__})')
        tokens = tokenizer.encode(option)
        if not tokens:
            raise UserError(f"{where}: choices[{i}] is empty")
        scored.append(Scored(prompt + tokens, [False] * len(prompt) + [True] * len(tokens)))
    if type(answer) is not int or not 0 <= answer < len(options):
        raise UserError(f'{where}: "answer" must be an index into choices, 0 to {len(options) - 1} (got {answer!r})')
    return scored, answer


def references(value, where: str) -> list[str]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(ref, str) for ref in refs):
        raise UserError(f'{where}: "reference" must be a string or a non-empty list of strings')
    stripped = [ref.strip() for ref in refs]
    if not all(stripped):
        raise UserError(f'{where}: "reference" must not be empty (an empty reference is contained in any text)')
    return stripped
