"""A jsonl line as training reads it: bytes -> JSON record -> the text it trains on, as (text, is_reply) segments
for the loss masks. Shared by training data (data.py), the data checks before Ray and `rwkvray prepare-data`
(jsonl_tokens.py); light to import (no torch), so prepare-data's Ray workers start fast."""
import json

from rwkvray.errors import UserError
from rwkvray.text.chat import REPLY_START, chat_segments, text_segments


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{where}: not valid UTF-8") from None


def parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or ("text" in record) == ("messages" in record):
        raise UserError(f'{where}: expected a JSON object with exactly one of "text" or "messages"')
    if "text" in record and not isinstance(record["text"], str):
        raise UserError(f'{where}: "text" must be a string (got {type(record["text"]).__name__})')
    return record



def document_text(record: dict, where: str) -> str:
    """The text a jsonl line trains on: its "text", or its "messages" in the chat template (`rwkvray
    prepare-data` tokenizes this same text)."""
    return "".join(text for text, _ in line_segments(record, "none", where))


def line_segments(record: dict, loss_mask: str, where: str) -> list[tuple[str, bool]]:
    try:
        segments = text_segments(record["text"]) if "text" in record else chat_segments(record["messages"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if loss_mask == "qa" and not any(is_reply for _, is_reply in segments):
        raise UserError(f"{where}: loss_mask 'qa' needs an assistant turn ('{REPLY_START}') and this line has none")
    return segments
