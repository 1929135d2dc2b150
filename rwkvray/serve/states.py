"""The registry of mounted states: which names can be served, and the tensors behind them.

Semantics:
- *known*: every `NAME.pth` in states_dir (looked up on demand, so a file dropped there needs no restart).
  states_dir is a local folder or a URI (s3://, gs://; rwkvray/files/storage.py): every read, listing and write
  goes through storage, so with a bucket a restart, another application or another node sees every state.
- *mounted*: held in memory here, ready to serve. A state gets mounted by `POST /v1/states` (by name from
  states_dir, or uploaded), or automatically on its first request when it is known.
- *unmounted*: `DELETE /v1/states/NAME` drops it and blocks automatic mounting, so requests for it get 404
  until it is mounted again by POST. Mounting again re-reads the file (the way to pick up a retrained state).
- Uploads and blends are checked fully, then written whole into states_dir (temp file and rename on disk, one
  object put in a bucket; the card first), so a restart or a second replica sees them: they become known states
  like any dropped-in file.
- Nothing is overwritten silently: writing to a name that has a file answers 409 unless the body says
  `"replace": true`; then the old file and its card are kept as `NAME.prev.pth` / `NAME.prev.json`
  (rwkvray/files/versions.py), a known state of its own. A blend may not name itself among its parents.
- A state whose card (NAME.json, see rwkvray/model/state_card.py) names another base model than the loaded one is
  refused with 409 unless the mount asks for `force`; a state without a card is served with a warning.

Each mount gets a new version; replicas cache states under the id `NAME@VERSION`, so a replaced or re-mounted
state is never served from a stale cache entry, and a request that raced an unmount gets 404, not old data.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

from rwkvray import __version__
from rwkvray.files import storage
from rwkvray.files.publish import STATE_NAME
from rwkvray.files.versions import PREVIOUS_MARK, NameTaken, write_new_version
from rwkvray.model.dims import RWKVDims
from rwkvray.errors import UserError
from rwkvray.serve.api import ApiError, bad_request, not_found
from rwkvray.model.state_card import card_bytes, card_path, read_card
from rwkvray.model.state_file import state_bytes, state_from_bytes
from rwkvray.model.tuned_state import TunedState, blend

STATE_SUFFIX = ".pth"
VERSION_MARK = "@"  # not a name character, so NAME@VERSION splits unambiguously


def check_name(name: str, param: str = "name") -> str:
    if not isinstance(name, str) or not STATE_NAME.fullmatch(name):
        raise bad_request(f"invalid state name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with '.')",
                          param, "invalid_state_name")
    return name


def state_path(states_dir: str, name: str) -> str:
    """The file of a state, refusing anything (a symlink included) that resolves outside states_dir. In a bucket
    a checked name (no "/", no leading ".") is a key right in the folder."""
    file = check_name(name) + STATE_SUFFIX
    if storage.is_uri(states_dir):
        return storage.join(states_dir, file)
    root = os.path.realpath(states_dir)
    path = os.path.realpath(os.path.join(root, file))
    if os.path.dirname(path) != root:
        raise bad_request(f"state {name!r} resolves outside the states folder", "name", "invalid_state_name")
    return path


def model_id(name: str, version: int) -> str:
    return f"{name}{VERSION_MARK}{version}"


def split_model_id(mid: str) -> tuple[str, int]:
    name, _, version = mid.rpartition(VERSION_MARK)
    return name, int(version)


@dataclass
class Mounted:
    name: str
    version: int
    source: str  # "states_dir", "upload" or "blend"
    state: TunedState  # fp32, CPU; never written to
    warning: Optional[str] = None
    card: Optional[dict] = None
    base_match: Optional[bool] = None  # does the card's base sha256 equal the loaded base's? None: unknown

    def describe(self) -> dict:
        out = {"name": self.name, "source": self.source, "shape": list(self.state.time_state.shape),
               "token_shift": self.state.has_shift, "card": self.card, "base_match": self.base_match}
        if self.warning:
            out["warning"] = self.warning
        return out


class StateStore:
    """Mounted states of one application. Thread-safe; every public method raises ApiError on bad input.

    `base` is the loaded model's card entry (state_card.base_fingerprint); None skips the base check."""

    def __init__(self, states_dir: str, dims: RWKVDims, base_name: str, max_upload_bytes: int,
                 base: Optional[dict] = None):
        self.states_dir = states_dir
        self.dims = dims
        self.base_name = base_name
        self.base = base
        self.max_upload_bytes = max_upload_bytes
        self.mounted: dict[str, Mounted] = {}
        self.unmounted: set[str] = set()
        self.next_version = time.time_ns() // 1000  # unique across restarts: a stale NAME@VERSION never matches
        self.lock = threading.Lock()
        if not storage.is_uri(states_dir):  # a bucket has no folders to make
            os.makedirs(states_dir, exist_ok=True)

    def resolve(self, name: str) -> str:
        """The cache id for a request's state, mounting a known state on first use."""
        check_name(name, "model")
        with self.lock:
            if name in self.mounted:
                return model_id(name, self.mounted[name].version)
            if name in self.unmounted:
                raise not_found(f"state '{name}' is not mounted (it was unmounted; POST /v1/states to mount it again)")
            path = state_path(self.states_dir, name)
            data = storage.read_bytes(path)
            if data is None:
                raise not_found(f"the model '{name}' does not exist: it is neither the base model "
                                f"'{self.base_name}' nor a state in the states folder")
            card = read_state_card(path, name)
            warning = self._check_card(name, card, force=False)
            entry = self._add(name, "states_dir", self._parse(data, name), warning, card)
            return model_id(name, entry.version)

    def fetch(self, mid: str) -> TunedState:
        """The state behind a cache id from `resolve`; 404 if it was unmounted or replaced since."""
        name, version = split_model_id(mid)
        with self.lock:
            entry = self.mounted.get(name)
            if entry is None or entry.version != version:
                raise not_found(f"state '{name}' is not mounted (it was unmounted or replaced during the request)")
            return entry.state

    def mount(self, name: str, force: bool = False) -> dict:
        """Mount (or re-read) NAME.pth from states_dir."""
        self._check_not_base(name)
        path = state_path(self.states_dir, name)
        data = storage.read_bytes(path)
        if data is None:
            raise not_found(f"no state file '{name}{STATE_SUFFIX}' in the states folder", "state_not_found")
        card = read_state_card(path, name)
        warning = self._check_card(name, card, force)
        tuned = self._parse(data, name)
        with self.lock:
            return self._add(name, "states_dir", tuned, warning, card).describe()

    def upload(self, name: str, data: bytes, card: Optional[dict] = None, force: bool = False,
               replace: bool = False) -> dict:
        """Check a state file sent by a client fully (weights_only load, keys, shapes, its card's base), write it
        (and its card) whole into states_dir, and mount it. See `_write_version` for `replace`."""
        self._check_not_base(name)
        if len(data) > self.max_upload_bytes:
            raise upload_too_large(self.max_upload_bytes)
        warning = self._check_card(name, card, force)
        path = state_path(self.states_dir, name)
        tuned = self._parse(data, name)
        with self.lock:
            self._write_version(name, path, data, card, replace)
            return self._add(name, "upload", tuned, warning, card).describe()

    def blend(self, name: str, weights: dict[str, float], replace: bool = False) -> dict:
        """Mount NAME as the weighted sum of mounted (or known) states, and keep it in states_dir with a card
        that records the recipe. See `_write_version` for `replace`."""
        self._check_not_base(name)
        if not weights:
            raise bad_request("`blend` needs at least one state", "blend")
        if name in weights:
            raise bad_request(f"the blend '{name}' names itself among its states; give the result a new name",
                              "blend", "blend_names_itself")
        parents = {parent: self.fetch(self.resolve(parent)) for parent in weights}
        blended = blend([(weight, parents[parent]) for parent, weight in weights.items()])
        if not blended.is_finite():
            raise bad_request(f"the blend of {sorted(weights)} is not finite", "blend")
        path = state_path(self.states_dir, name)
        card = {"method": "blend", "blend": dict(weights), "rwkvray_version": __version__}
        unknown = sorted(parent for parent in weights if not self._matches_base(parent))
        if not unknown:  # only when every part was tuned on the loaded base is the blend's base known
            card = {"base": self.base, **card}
        warning = f"blended from {unknown}, whose base model is unknown" if unknown else None
        with self.lock:
            self._write_version(name, path, state_bytes(blended), card, replace)
            return self._add(name, "blend", blended, warning, card).describe()

    def _matches_base(self, name: str) -> bool:
        with self.lock:
            entry = self.mounted.get(name)
        return entry is not None and entry.base_match is True

    def unmount(self, name: str) -> dict:
        check_name(name)
        with self.lock:
            was_mounted = self.mounted.pop(name, None) is not None
            if not was_mounted and (name in self.unmounted or not self._known(name)):
                raise not_found(f"state '{name}' is not mounted", "state_not_found")
            self.unmounted.add(name)
        return {"name": name, "mounted": False}

    def listing(self) -> dict:
        with self.lock:
            return {"object": "state_list",
                    "mounted": [entry.describe() for entry in self.mounted.values()],
                    "known": self.known_names(),
                    "unmounted": sorted(self.unmounted)}

    def info(self, name: str) -> dict:
        """One state, mounted or only in states_dir, with its card (`GET /v1/states/{name}`)."""
        check_name(name)
        with self.lock:
            if name in self.mounted:
                return {**self.mounted[name].describe(), "mounted": True}
        if not self._known(name):
            raise not_found(f"no state '{name}': it is neither mounted nor a file in the states folder",
                            "state_not_found")
        card = read_state_card(state_path(self.states_dir, name), name)
        return {"name": name, "mounted": False, "source": "states_dir", "card": card,
                "base_match": self._base_match(card)}

    def servable_names(self) -> list[str]:
        """Names a request may use as `model` right now: mounted, or known and not unmounted."""
        with self.lock:
            return sorted(set(self.mounted) | (set(self.known_names()) - self.unmounted))

    def known_names(self) -> list[str]:
        files = storage.list_files(self.states_dir)
        stems = (f[: -len(STATE_SUFFIX)] for f in files if f.endswith(STATE_SUFFIX))
        return sorted(stem for stem in stems if STATE_NAME.fullmatch(stem) and stem != self.base_name)

    def _known(self, name: str) -> bool:
        return storage.is_file(state_path(self.states_dir, name))

    def _check_not_base(self, name: str) -> None:
        if check_name(name) == self.base_name:
            raise bad_request(f"'{name}' is the base model's name; pick another state name", "name",
                              "invalid_state_name")

    def _check_card(self, name: str, card: Optional[dict], force: bool) -> Optional[str]:
        """409 when the card names another base than the loaded one (unless forced); the listing's warning."""
        if card is None:
            return "no state card: the base model it was tuned on is unknown"
        theirs = card.get("base") if isinstance(card.get("base"), dict) else {}
        if "sha256" not in theirs:
            return "the state card names no base model (base.sha256)"
        if self.base is None or theirs["sha256"] == self.base["sha256"]:
            return None
        mismatch = (f"state '{name}' was tuned on base {describe_base(theirs)}, but this server loaded "
                    f"{describe_base(self.base)}")
        if force:
            return f"mounted with force: {mismatch}"
        raise ApiError(409, f"{mismatch}; a state works only on the model it was tuned on "
                            "(mount it with \"force\": true to serve it anyway)",
                       "invalid_request_error", "name", "base_mismatch")

    def _base_match(self, card: Optional[dict]) -> Optional[bool]:
        theirs = (card or {}).get("base")
        if self.base is None or not isinstance(theirs, dict) or "sha256" not in theirs:
            return None
        return theirs["sha256"] == self.base["sha256"]

    def _write_version(self, name: str, path: str, data: bytes, card: Optional[dict], replace: bool) -> None:
        """Write NAME's file with its card (or no card: an old one would lie); an existing file is a 409 unless
        `replace`, and then kept as NAME.prev with its card."""
        card_file = card_path(path)
        try:
            write_new_version(path, data, replace, {card_file: None if card is None else card_bytes(card)})
        except NameTaken:
            raise ApiError(409, f"state '{name}' already exists; send \"replace\": true to replace it (the current "
                                f"one is then kept as '{name}{PREVIOUS_MARK}')", "invalid_request_error", "name",
                           "state_exists") from None

    def _parse(self, data: bytes, name: str) -> TunedState:
        """load_state's checks (weights_only, exact keys, [H,N,N] and [C] per layer, finite, fits the model) as a
        400."""
        try:
            return state_from_bytes(data, name, self.dims)
        except UserError as err:
            message = str(err).removeprefix(f"{name}: ")
            raise bad_request(f"state '{name}': {message}", "state", "invalid_state") from None

    def _add(self, name: str, source: str, tuned: TunedState, warning: Optional[str],
             card: Optional[dict]) -> Mounted:
        entry = Mounted(name, self.next_version, source, tuned, warning, card, self._base_match(card))
        self.next_version += 1
        self.mounted[name] = entry
        self.unmounted.discard(name)
        return entry


def read_state_card(path: str, name: str) -> Optional[dict]:
    """The card beside a state; a bad one is a 400 naming the state (never the server's own path)."""
    try:
        return read_card(path)
    except ValueError as err:
        problem = str(err).removeprefix(f"{card_path(path)}: ")
        raise bad_request(f"state '{name}': its card {name}.json is {problem}", "name",
                          "invalid_state_card") from None


def describe_base(base: dict) -> str:
    return f"'{base.get('file', '?')}' (sha256 {str(base.get('sha256', '?'))[:16]}…)"


def upload_too_large(limit: int) -> ApiError:
    return ApiError(413, f"upload exceeds the limit of {limit / 2**20:g} MiB", "invalid_request_error",
                    "file", "upload_too_large")
