"""`POST /v1/evals`: score the base model and mounted states on eval rows, on a model replica's own engine.

Body: {"states": [NAME, ...], "rows": [row, ...], "max_tokens": n, "data": NAME}. Rows are the jsonl rows of
`rwkvray eval` (rwkvray/eval/items.py), given as JSON objects; `data` names them in the results (default
"rows"). The base is always scored, as state `base`. The answer holds the same `results` rows as the command
(the same scoring code on the same engine), the paired comparisons with base and one detail row per item and
state. Limits: max_eval_rows rows, max_tokens up to max_tokens_cap, every sequence within max_prompt_tokens.
"""
from __future__ import annotations

from rwkvray.errors import UserError
from rwkvray.eval.items import parse_rows
from rwkvray.eval.metrics import BASE, compare_with_base, summarize
from rwkvray.eval.report import detail_rows
from rwkvray.eval.job import DEFAULT_MAX_TOKENS
from rwkvray.serve.api import ApiError, bad_request
from rwkvray.serve.states import check_name

BODY_KEYS = ("states", "rows", "max_tokens", "data")
MAX_EVAL_ROWS = 1000


def checked_states(states) -> list[str]:
    if states is None:
        return []
    if not isinstance(states, list) or not all(isinstance(name, str) for name in states):
        raise bad_request("states must be a list of mounted state names", "states")
    for name in states:
        check_name(name, "states")
        if name == BASE:
            raise bad_request("'base' is the base model, always scored: leave it out of states", "states")
        if states.count(name) > 1:
            raise bad_request(f"state {name!r} is listed twice", "states")
    return states


def checked_max_tokens(value, cap: int) -> int:
    if value is None:
        return min(DEFAULT_MAX_TOKENS, cap)
    if type(value) is not int or value < 1:
        raise bad_request(f"max_tokens must be a positive integer (got {value!r})", "max_tokens")
    if value > cap:
        raise bad_request(f"max_tokens is {value}, more than this server's limit of {cap}", "max_tokens")
    return value


def parse_eval_body(payload: dict, config, tokenizer, vocab_size: int):
    """(items, state names, max_tokens) of a /v1/evals body, every problem a 400 naming its field."""
    unknown = sorted(set(payload) - set(BODY_KEYS))
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r} (a /v1/evals body has {', '.join(BODY_KEYS)})", unknown[0])
    rows, data = payload.get("rows"), payload.get("data", "rows")
    if not isinstance(rows, list) or not rows:
        raise bad_request("rows must be a non-empty list of eval rows", "rows")
    if len(rows) > config.max_eval_rows:
        raise bad_request(f"{len(rows)} rows, more than this server's limit of {config.max_eval_rows}", "rows")
    if not isinstance(data, str) or not data:
        raise bad_request("data must be a non-empty string (the name results give these rows)", "data")
    try:
        items = parse_rows(rows, data, lambda n: f"rows[{n - 1}]", tokenizer)
    except UserError as err:
        raise bad_request(str(err), "rows") from None
    for item in items:
        tokens = [token for seq in item.scored for token in seq.tokens] + item.prompt
        longest = max([len(item.prompt)] + [len(seq.tokens) for seq in item.scored])
        if longest > config.max_prompt_tokens:
            raise bad_request(f"rows[{item.index}] has {longest} tokens, more than this server's limit of "
                              f"{config.max_prompt_tokens}", "rows", "context_length_exceeded")
        if any(token >= vocab_size for token in tokens):
            raise bad_request(f"rows[{item.index}] has a token outside the model's vocab of {vocab_size}", "rows")
    return items, checked_states(payload.get("states")), checked_max_tokens(payload.get("max_tokens"),
                                                                             config.max_tokens_cap)


async def run_evals(gateway, payload: dict) -> dict:
    """Resolve the states to their mounted ids, score on one model replica, and summarise as the command does."""
    items, names, max_tokens = parse_eval_body(payload, gateway.config, gateway.tokenizer, gateway.vocab_size)
    state_ids = {BASE: None}
    for name in names:
        if name not in gateway.state_ids:  # the gateway's name -> NAME@VERSION map, as completions use it
            answer = await gateway.registry.call.remote("resolve", name)
            if isinstance(answer, ApiError):
                raise answer
            gateway.state_ids[name] = answer
        state_ids[name] = gateway.state_ids[name]
    records = await gateway.model.evaluate.remote(items, state_ids, max_tokens)
    return {"object": "eval", "results": summarize(records), "comparisons": compare_with_base(records),
            "details": detail_rows(records)}
