import sys

import pytest

from rwkvray.errors import UserError
from rwkvray.text.tokenizer import EOS_ID, StreamDecoder, Tokenizer, default_vocab_path, get_tokenizer

CHAT = "User: hi\n\nAssistant:"
CHAT_IDS = [24281, 59, 4571, 261, 5585, 41693, 59]
MIXED = "Grüße, 世界! Ünïcödé 🚀👩‍🚀 tabs\t\tand  spaces\n\n\n" + "def f(x):\n    return x ** 2\r\n" * 3


@pytest.fixture(scope="module")
def rust():
    tokenizer = Tokenizer(backend="rust")
    assert tokenizer.backend == "rust"
    return tokenizer


@pytest.fixture(scope="module")
def fallback():
    """The pure-Python path, reached the way users reach it: the Rust extension cannot be imported."""
    vocab_path = default_vocab_path()
    saved = sys.modules.get("pyrwkv_tokenizer")
    sys.modules["pyrwkv_tokenizer"] = None  # makes `import pyrwkv_tokenizer` raise ImportError
    try:
        tokenizer = Tokenizer(vocab_path=vocab_path)
    finally:
        if saved is None:
            del sys.modules["pyrwkv_tokenizer"]
        else:
            sys.modules["pyrwkv_tokenizer"] = saved
    assert tokenizer.backend == "python"
    return tokenizer


@pytest.mark.parametrize("backend", ["rust", "fallback"])
def test_chat_prompt_encodes_to_known_ids(backend, request):
    assert request.getfixturevalue(backend).encode(CHAT) == CHAT_IDS


def test_fallback_matches_rust_on_mixed_text(rust, fallback):
    ids = rust.encode(MIXED)
    assert fallback.encode(MIXED) == ids
    assert len(ids) < len(MIXED.encode("utf-8"))  # real merges happened, not byte-by-byte


@pytest.mark.parametrize("backend", ["rust", "fallback"])
def test_round_trip_unicode_and_emoji(backend, request):
    tokenizer = request.getfixturevalue(backend)
    assert tokenizer.decode(tokenizer.encode(MIXED)) == MIXED


def test_decoding_a_partial_character_does_not_raise(rust):
    rocket = rust.encode("🚀")
    assert rust.decode_bytes(rocket[:1]) == b"\xf0\x9f"
    assert rust.decode(rocket[:1]) == "\ufffd"
    assert rust.decode([]) == ""


def test_eos_decodes_to_nothing_and_bad_ids_raise(rust):
    assert rust.decode([EOS_ID]) == ""
    with pytest.raises(ValueError, match="token id 65536 is outside the vocab"):
        rust.decode([65536])
    with pytest.raises(ValueError, match="token id -1 is outside the vocab"):
        rust.decode([-1])


def test_stream_decoder_yields_a_split_emoji_once(rust):
    ids = rust.encode("Hi 🚀!")
    assert len(ids) > len("Hi 🚀!")  # the rocket spans several tokens
    stream = StreamDecoder(rust)
    pieces = [stream.feed(token_id) for token_id in ids]
    assert "".join(pieces) + stream.flush() == "Hi 🚀!"
    assert pieces.count("") == 2  # the two tokens that end mid-character emit nothing
    assert sum(piece.count("🚀") for piece in pieces) == 1


def test_stream_decoder_flush_releases_an_unfinished_tail(rust):
    stream = StreamDecoder(rust)
    assert stream.feed(rust.encode("🚀")[0]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.feed(rust.encode("ok")[0]) == "ok"


def test_lone_surrogate_is_encoded_as_replacement(rust):
    assert rust.decode(rust.encode("a\ud800b")) == "a\ufffdb"


def test_missing_vocab_file_is_a_user_error(tmp_path):
    missing = tmp_path / "vocab.txt"
    with pytest.raises(UserError, match=f"^vocab file not found: {missing}$"):
        Tokenizer(vocab_path=str(missing))


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
    assert get_tokenizer().encode(CHAT) == CHAT_IDS
