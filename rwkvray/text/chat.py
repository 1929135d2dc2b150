"""The RWKV chat form, `User: ...\n\nAssistant: ...`, shared by training data and Serve so that prompts look
exactly as they were learned."""
import re
from collections.abc import Sequence

from rwkvray.errors import UserError

ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"
REPLY_START = "Assistant:"
REPLY_END = "\n\nUser:"


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render chat messages in the RWKV form `User: ...\\n\\nAssistant: ...` (system as `System: ...`).

    Shared by the trainer and the Serve endpoint so prompts look exactly as they were learned. With
    add_generation_prompt the text ends with `Assistant:` (no trailing space: the reply starts with one).
    """
    text = "".join(segment for segment, _ in chat_segments(messages))
    if add_generation_prompt:
        text += (TURN_SEPARATOR if text else "") + REPLY_START
    return text


def chat_segments(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_assistant_reply) segments; their concatenation is render_chat()."""
    if not isinstance(messages, list):
        raise UserError(f"messages must be a list (got {type(messages).__name__})")
    segments: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        role, content = checked_message(message, i)
        separator = TURN_SEPARATOR if i else ""
        if role == "assistant":
            add_segment(segments, separator + REPLY_START, False)
            add_segment(segments, " " + content, True)
        else:
            add_segment(segments, f"{separator}{ROLE_PREFIX[role]}: {content}", False)
    return segments


def checked_message(message, index: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise UserError(f"messages[{index}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLE_PREFIX:
        raise UserError(f"messages[{index}].role must be one of {', '.join(ROLE_PREFIX)} (got {role!r})")
    if not isinstance(content, str):
        raise UserError(f"messages[{index}].content must be a string (got {type(content).__name__})")
    return role, normalize_content(content)


def normalize_content(content: str) -> str:
    """A blank line separates turns, so message text must not contain one (the RWKV chat convention)."""
    return re.sub(r"\n{2,}", "\n", content.replace("\r\n", "\n").strip())


def add_segment(segments: list[tuple[str, bool]], text: str, is_reply: bool) -> None:
    """Append, merging with the previous segment of the same kind (fewer cuts = more natural tokens)."""
    if segments and segments[-1][1] == is_reply:
        segments[-1] = (segments[-1][0] + text, is_reply)
    else:
        segments.append((text, is_reply))


def text_segments(text: str) -> list[tuple[str, bool]]:
    """Split `User: ...\\n\\nAssistant: ...` text: a reply runs from after each `Assistant:` up to the next
    `\\n\\nUser:` or the end."""
    segments: list[tuple[str, bool]] = []
    pos = 0
    while pos < len(text):
        start = text.find(REPLY_START, pos)
        if start < 0:
            add_segment(segments, text[pos:], False)
            break
        reply_start = start + len(REPLY_START)
        reply_end = text.find(REPLY_END, reply_start)
        reply_end = len(text) if reply_end < 0 else reply_end
        add_segment(segments, text[pos:reply_start], False)
        if reply_end > reply_start:
            add_segment(segments, text[reply_start:reply_end], True)
        pos = reply_end
    return segments
