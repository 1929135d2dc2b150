"""The bodies of `POST /v1/states`: the same keys in JSON and multipart, and their checks (unknown keys are
refused, as the spec loader refuses them)."""
from rwkvray.serve.api import bad_request, json_object
from rwkvray.serve.states import check_name

STATES_BODY_KEYS = ("name", "data", "card", "force", "blend", "replace")


def refuse_unknown_keys(payload: dict) -> None:
    unknown = sorted(set(payload) - set(STATES_BODY_KEYS))
    if unknown:
        raise bad_request(f"unknown key '{unknown[0]}' in the /v1/states body (allowed: "
                          f"{', '.join(STATES_BODY_KEYS)})", unknown[0])


def multipart_payload(fields: dict[str, bytes]) -> dict:
    """A multipart upload as the JSON body's keys: `file` is `data`, `card` is JSON text, `force` and `replace`
    true/false."""
    known = {"name", "file", "card", "force", "replace"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise bad_request(f"unknown field '{unknown[0]}' in the multipart upload (allowed: file, name, card, force, "
                          "replace)", unknown[0])
    if "file" not in fields:
        raise bad_request("multipart upload needs a `file` field", "file")
    payload = {"name": fields.get("name", b"").decode("utf-8", "replace"), "data": fields["file"]}
    if "card" in fields:
        payload["card"] = json_object(fields["card"], "the multipart field `card`", "card")
    for flag in ("force", "replace"):
        if flag in fields:
            payload[flag] = {"true": True, "false": False}.get(fields[flag].decode("latin-1").strip().lower(),
                                                               fields[flag])
    return payload


def check_mount_options(data, card, force, blend, replace=False) -> None:
    for flag, value in (("force", force), ("replace", replace)):
        if not isinstance(value, bool):
            raise bad_request(f"`{flag}` must be true or false", flag)
    if replace and data is None and blend is None:
        raise bad_request("`replace` goes with an upload (`data`) or a `blend`: mounting by name writes nothing",
                          "replace")
    if card is not None and (data is None or not isinstance(card, dict)):
        raise bad_request("`card` must be a JSON object, sent with `data`", "card")
    if blend is None:
        return
    if data is not None or force:
        raise bad_request("`blend` mounts a mix of mounted states: send it without `data` and `force`", "blend")
    if not isinstance(blend, dict) or not blend:
        raise bad_request("`blend` must be an object of state names and weights, like {\"a\": 0.7, \"b\": 0.3}",
                          "blend")
    for parent, weight in blend.items():
        check_name(parent, "blend")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise bad_request(f"blend weight of '{parent}' must be a number", "blend")
