"""The Serve endpoint's parts without Ray: batching engine, state registry, request parsing."""
import asyncio
import io
import json
import os
import time

import pytest
import torch

from rwkvray.model.dims import ModelDimsX070
from rwkvray.text.generate import generate_tokens
from rwkvray.serve.api import ApiError, CompletionRequest, multipart_fields, parse_request
from rwkvray.engine.batch_engine import BatchEngine, SamplingParams
from rwkvray.engine.rows import StopScanner
from rwkvray.serve.states import StateStore, state_path
from rwkvray.spec import spec_from_dict
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.text.tokenizer import get_tokenizer
from tests.helpers import random_model

# The real tokenizer's ids reach 65535, so prompts need the full vocab; everything else is tiny.
SERVE_DIMS = ModelDimsX070(n_layer=2, n_embd=64, head_size=64, vocab_size=65536, dim_w=8, dim_a=8, dim_v=4, dim_g=16)
STATE_SCALE = 20.0  # large enough that each random state visibly changes the greedy text
PROMPTS = ["User: hi\n\nAssistant:", "Hello world", "The capital of France is", "1 2 3", "a"]


def serve_model():
    return random_model(SERVE_DIMS)


def random_state(seed: int, dims: ModelDimsX070 = SERVE_DIMS) -> TunedState:
    generator = torch.Generator().manual_seed(seed)
    return TunedState(STATE_SCALE * torch.randn(dims.n_layer, *dims.state_shape, generator=generator))


def reference_text(model, prompt: str, time_state, max_tokens: int) -> str:
    """What `rwkvray generate --temperature 0` prints for this prompt and state."""
    tokenizer = get_tokenizer()
    return tokenizer.decode(list(generate_tokens(model, tokenizer.encode(prompt), time_state, max_tokens,
                                                 temperature=0.0)))


@pytest.fixture(scope="module")
def model():
    return serve_model()


async def collect(engine, prompt: str, time_state, params: SamplingParams, state_key=None):
    tokens = get_tokenizer().encode(prompt)
    chunks = [chunk async for chunk in engine.generate(tokens, time_state, params, state_key)]
    return "".join(chunk.text for chunk in chunks), chunks[-1]


# ---------------------------------------------------------------- stop strings


def test_stop_scanner_holds_back_a_possible_stop_and_cuts_at_it():
    scanner = StopScanner(["\n\nUser:"])
    assert scanner.push("Hel") == ("Hel", False)
    assert scanner.push("lo\n\nUs") == ("lo", False)
    assert scanner.push("er: more") == ("", True)


def test_stop_scanner_releases_a_false_alarm():
    scanner = StopScanner(["\n\nUser:"])
    assert scanner.push("a\n\n") == ("a", False)
    assert scanner.push("Hi") == ("\n\nHi", False)
    assert scanner.push("\n") == ("", False)
    assert scanner.flush() == "\n"


# ---------------------------------------------------------------- sampling


def test_nucleus_matches_a_full_sort_also_when_the_first_candidates_hold_too_little():
    from rwkvray.text.generate import nucleus
    generator = torch.Generator().manual_seed(0)
    peaked = torch.softmax(torch.randn(3, 65536, generator=generator) * 8, -1)
    flat = torch.softmax(torch.randn(2, 65536, generator=generator) * 0.1, -1)  # needs far more than 64 candidates
    probs, top_p = torch.cat([peaked, flat]), torch.tensor([0.3, 0.9, 1.0, 0.5, 0.95])
    ordered, order = probs.sort(-1, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p.unsqueeze(-1)
    expected = torch.zeros_like(probs).scatter(-1, order, ordered.masked_fill(outside, 0.0))
    assert torch.equal(nucleus(probs, top_p) > 0, expected > 0)
    assert torch.equal(nucleus(probs, top_p)[2], probs[2])  # top_p 1 keeps everything


def test_the_exponential_race_draws_tokens_with_their_probabilities():
    from rwkvray.text.generate import sample
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    tokens = sample(logits, torch.ones(20000), torch.ones(20000), generator)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 20000, probs, atol=0.01)
    assert torch.equal(sample(logits[:2], torch.zeros(2), torch.ones(2)), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- engine


def test_mixed_states_decode_in_one_batch_and_match_single_generation(model):
    states = [None, random_state(1), random_state(2), random_state(3)]
    cases = [(prompt, state) for prompt in PROMPTS[:2] for state in states]
    expected = [reference_text(model, prompt, state, 8) for prompt, state in cases]

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=16, batch_wait_s=0.02)
        results = await asyncio.gather(*(collect(engine, p, s, SamplingParams(8)) for p, s in cases))
        return engine, results

    engine, results = asyncio.run(run())
    assert [text for text, _ in results] == expected
    assert len(set(expected[4:])) == 4  # the states really differ, so any cross-talk would show
    stats = engine.metrics.snapshot()
    assert stats["max_batch_rows"] == len(cases) and stats["max_states_in_step"] == len(states)
    assert stats["steps"] <= 9  # one batched step per token for all rows (+1: the longer prompts' chunk)
    assert stats["generated_tokens"] == 8 * len(cases)


LONG_PROMPTS = ["Once upon a time, in a small village by the sea, there lived an old lighthouse keeper.",
                "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes.",
                "Q: What is two plus two?\nA:"]


def test_batched_chunked_prefill_equals_single_row_prefill_across_states(model):
    states = [random_state(1), None, random_state(2), random_state(3)]
    cases = [(prompt, state) for prompt in LONG_PROMPTS for state in states]
    expected = [reference_text(model, prompt, state, 6) for prompt, state in cases]

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=len(cases), batch_wait_s=0.02,
                             prefill_chunk=8)
        results = await asyncio.gather(*(collect(engine, p, s, SamplingParams(6)) for p, s in cases))
        return engine, results

    engine, results = asyncio.run(run())
    assert [text for text, _ in results] == expected
    stats = engine.metrics.snapshot()
    assert stats["prefill_tokens"] == sum(len(get_tokenizer().encode(p)) for p, _ in cases)
    assert stats["max_states_in_step"] == len(states) and stats["max_batch_rows"] == len(cases)


def test_prefix_cache_gives_the_uncached_output_and_evicts_least_recent(model):
    tokenizer = get_tokenizer()
    prompt = tokenizer.decode(tokenizer.encode(LONG_PROMPTS[0])[:13])
    assert len(tokenizer.encode(prompt)) == 13
    entry_bytes = 2 * (2 * 64 * 4) + 2 * 64 * 64 * 4 + SERVE_DIMS.vocab_size * 4  # shifts, wkv, logits

    async def run():
        engine = BatchEngine(model, tokenizer, max_batch_size=2, prefill_chunk=4, prefix_cache_bytes=2 * entry_bytes)
        texts = [(await collect(engine, prompt, random_state(1), SamplingParams(6), "alpha@1"))[0]]
        lengths = [length for _, length, _ in engine.cache.entries]
        texts.append((await collect(engine, prompt, random_state(1), SamplingParams(6), "alpha@1"))[0])
        texts.append((await collect(engine, prompt, random_state(2), SamplingParams(6), "beta@1"))[0])
        return engine, texts, lengths

    engine, texts, lengths = asyncio.run(run())
    assert lengths == [8, 12]  # blocks at 4, 8, 12 were cached; the least recently used (4) made room
    assert engine.cache.bytes == 2 * entry_bytes
    assert texts == [reference_text(model, prompt, random_state(1), 6)] * 2 + \
        [reference_text(model, prompt, random_state(2), 6)]
    stats = engine.metrics.snapshot()
    assert stats["prefix_cache"] == {"hits": 1, "misses": 2, "bytes": 2 * entry_bytes}
    assert stats["prefill_tokens"] == 13 + 1 + 13  # the hit prefilled only the token after the 12 cached


def test_a_prompt_that_is_a_cached_prefix_needs_no_forward(model):
    tokenizer = get_tokenizer()
    prompt = tokenizer.decode(tokenizer.encode(LONG_PROMPTS[1])[:8])
    assert len(tokenizer.encode(prompt)) == 8

    async def run():
        engine = BatchEngine(model, tokenizer, max_batch_size=2, prefill_chunk=4, prefix_cache_bytes=2**24)
        first = await collect(engine, prompt, None, SamplingParams(5), "base")
        second = await collect(engine, prompt, None, SamplingParams(5), "base")
        return engine, first[0], second[0]

    engine, first, second = asyncio.run(run())
    assert first == second == reference_text(model, prompt, None, 5)
    assert engine.metrics.snapshot()["prefill_tokens"] == 8


def test_rows_join_a_running_batch_and_never_write_the_mounted_state(model):
    mounted = random_state(4)
    before = TunedState(mounted.time_state.clone())

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=8)
        first = asyncio.ensure_future(collect(engine, PROMPTS[0], mounted, SamplingParams(16)))
        while engine.metrics.snapshot()["steps"] < 4:
            await asyncio.sleep(0.001)
        later = await asyncio.gather(collect(engine, PROMPTS[1], mounted, SamplingParams(6)),
                                     collect(engine, PROMPTS[2], None, SamplingParams(6)))
        return [await first, *later], engine.metrics.snapshot()

    results, metrics = asyncio.run(run())
    texts = [text for text, _ in results]
    assert texts == [reference_text(model, PROMPTS[0], before, 16), reference_text(model, PROMPTS[1], before, 6),
                     reference_text(model, PROMPTS[2], None, 6)]
    assert metrics["max_batch_rows"] == 3  # the later rows ran in the same steps as the first one
    assert metrics["max_states_in_step"] == 2  # the mounted state and the base's zero state, in one step
    assert torch.equal(mounted.time_state, before.time_state)


def test_batch_size_is_capped_and_extra_requests_wait(model):
    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=2)
        results = await asyncio.gather(*(collect(engine, p, None, SamplingParams(4)) for p in PROMPTS))
        return engine, results

    engine, results = asyncio.run(run())
    assert [text for text, _ in results] == [reference_text(model, p, None, 4) for p in PROMPTS]
    assert engine.metrics.snapshot()["max_batch_rows"] == 2


def test_stop_string_ends_the_row_and_is_not_returned(model):
    full = reference_text(model, PROMPTS[2], random_state(1), 12)
    stop = full[6:9]
    cut = full.find(stop)
    assert cut > 0

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4)
        return await collect(engine, PROMPTS[2], random_state(1), SamplingParams(12, stop=[stop]))

    text, last = asyncio.run(run())
    assert (text, last.finish_reason) == (full[:cut], "stop")
    assert last.completion_tokens < 12


def test_length_finish_reports_token_counts(model):
    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4)
        return await collect(engine, PROMPTS[1], None, SamplingParams(5))

    _, last = asyncio.run(run())
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        "length", len(get_tokenizer().encode(PROMPTS[1])), 5)


def test_a_client_leaving_early_frees_its_row_without_disturbing_others(model):
    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4)
        stream = engine.generate(get_tokenizer().encode(PROMPTS[0]), None, SamplingParams(40))
        other = asyncio.ensure_future(collect(engine, PROMPTS[1], random_state(5), SamplingParams(10)))
        await stream.__anext__()
        await stream.aclose()
        text, _ = await other
        return engine, text

    engine, text = asyncio.run(run())
    assert text == reference_text(model, PROMPTS[1], random_state(5), 10)
    assert engine.active == [] and engine.metrics.snapshot()["steps"] < 40


def test_a_row_takes_one_step_per_token_and_none_after_its_last(model):
    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4)
        text, last = await collect(engine, PROMPTS[1], None, SamplingParams(5))
        return engine, text, last

    engine, text, last = asyncio.run(run())
    assert text == reference_text(model, PROMPTS[1], None, 5) and last.completion_tokens == 5
    assert engine.metrics.snapshot()["steps"] == 5  # the prompt's step samples the first token


def test_streamed_text_is_coalesced_to_the_interval_and_unchanged(model):
    interval = 0.05

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4, stream_interval_s=interval)
        arrivals = []
        async for chunk in engine.generate(get_tokenizer().encode(PROMPTS[0]), None, SamplingParams(40)):
            arrivals.append((time.monotonic(), chunk))
        return arrivals

    arrivals = asyncio.run(run())
    chunks = [chunk for _, chunk in arrivals]
    assert "".join(chunk.text for chunk in chunks) == reference_text(model, PROMPTS[0], None, 40)
    assert chunks[-1].completion_tokens == 40 and len(chunks) < 40
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:-1])]
    assert min(gaps) >= interval * 0.95  # the first chunk goes at once, the last as soon as the row ends


def test_a_row_that_ends_sends_its_held_text_at_once_not_a_stream_interval_later(model):
    interval = 60.0

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4, stream_interval_s=interval)
        start = time.monotonic()
        chunks = [chunk async for chunk in engine.generate(get_tokenizer().encode(PROMPTS[0]), None,
                                                           SamplingParams(12))]
        return time.monotonic() - start, chunks

    elapsed, chunks = asyncio.run(run())
    assert elapsed < interval / 2
    assert len(chunks) == 2 and chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 12
    assert "".join(chunk.text for chunk in chunks) == reference_text(model, PROMPTS[0], None, 12)


def test_many_streams_share_the_chunk_budget_and_a_plain_reply_is_one_chunk(model):
    interval, per_s, tokens = 0.01, 40.0, 30

    async def streamed(engine, prompt):
        arrivals = []
        async for chunk in engine.generate(get_tokenizer().encode(prompt), None, SamplingParams(tokens)):
            arrivals.append((time.monotonic(), chunk))
        return arrivals

    async def plain(engine, prompt):
        return [chunk async for chunk in engine.generate(get_tokenizer().encode(prompt), None,
                                                         SamplingParams(tokens), streamed=False)]

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4, batch_wait_s=0.02, stream_interval_s=interval,
                             stream_chunks_per_s=per_s)
        four = await asyncio.gather(*(streamed(engine, prompt) for prompt in PROMPTS[:4]))
        mixed = await asyncio.gather(streamed(engine, PROMPTS[0]), *(plain(engine, p) for p in PROMPTS[1:4]))
        return engine, four, mixed

    engine, four, (alone, *plains) = asyncio.run(run())
    assert engine.streaming == 0
    for prompt, arrivals in zip(PROMPTS, four):
        assert "".join(chunk.text for _, chunk in arrivals) == reference_text(model, prompt, None, tokens)
        gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:-1])]
        assert min(gaps) >= 4 / per_s * 0.95  # 4 streams at 40 chunks/s: one chunk per 0.1 s each, not 0.01
    for prompt, chunks in zip(PROMPTS[1:], plains):
        assert len(chunks) == 1 and chunks[0].completion_tokens == tokens and chunks[0].finish_reason == "length"
        assert chunks[0].text == reference_text(model, prompt, None, tokens)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(alone, alone[1:-1])]
    assert len(alone) > 4 and min(gaps) < 4 / per_s  # the plain rows left the one stream its own interval


def test_sampled_rows_do_not_change_greedy_rows(model):
    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4, batch_wait_s=0.02)
        return await asyncio.gather(collect(engine, PROMPTS[0], None, SamplingParams(8, temperature=1.0, top_p=0.9)),
                                    collect(engine, PROMPTS[1], None, SamplingParams(8)))

    (_, sampled), (greedy, _) = asyncio.run(run())
    assert sampled.finish_reason in ("stop", "length")
    assert greedy == reference_text(model, PROMPTS[1], None, 8)


def test_a_seeded_row_samples_the_same_text_alone_and_in_a_batch(model):
    from rwkvray.text.generate import generate_tokens
    seeded = SamplingParams(10, temperature=1.0, top_p=0.95, seed=1234)

    async def run(batched: bool):
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=4, batch_wait_s=0.02)
        others = [collect(engine, PROMPTS[0], random_state(3), SamplingParams(10, temperature=1.0))] if batched else []
        results = await asyncio.gather(collect(engine, PROMPTS[1], None, seeded), *others)
        return results[0][0]

    alone, batched = asyncio.run(run(False)), asyncio.run(run(True))
    cli = get_tokenizer().decode(list(generate_tokens(model, get_tokenizer().encode(PROMPTS[1]), None, 10, 1.0, 0.95, 1234)))
    assert alone == batched == cli


def test_slots_go_lowest_first_and_a_full_batch_keeps_its_new_state_without_a_copy(model):
    from rwkvray.engine.slot_pool import SlotPool, state_rows
    from rwkvray.model.rwkv import RNNState
    pool = SlotPool(model, 3)
    assert [pool.take(), pool.take(), pool.take()] == [0, 1, 2]
    pool.give_back(2)
    pool.give_back(0)
    assert pool.take() == 0
    assert pool.read([0, 1]).wkv.data_ptr() == pool.state.wkv.data_ptr()  # consecutive slots: a view
    new = RNNState(*(torch.randn_like(part) for part in (pool.state.att_shift, pool.state.wkv, pool.state.ffn_shift)))
    pool.write([1], state_rows(new, torch.tensor([1])))
    assert torch.equal(pool.state.wkv[:, 1], new.wkv[:, 1]) and not torch.equal(pool.state.wkv[:, 0], new.wkv[:, 0])
    pool.write([0, 1, 2], new)
    assert pool.state.wkv.data_ptr() == new.wkv.data_ptr() and torch.equal(pool.state.ffn_shift, new.ffn_shift)


def test_the_engine_worker_runs_torch_with_its_own_thread_count(model):
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=2, threads=2)
        assert engine.worker.submit(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 1  # the caller's thread keeps its own count
        assert BatchEngine(model, get_tokenizer(), max_batch_size=2).threads == 1  # no count: the caller's
    finally:
        torch.set_num_threads(caller)


# ---------------------------------------------------------------- state registry


NO_CARD_WARNING = "no state card: the base model it was tuned on is unknown"


@pytest.fixture
def store(tmp_path):
    states_dir = tmp_path / "states"
    states_dir.mkdir()
    save_state(random_state(1), str(states_dir / "alpha.pth"))
    return StateStore(str(states_dir), SERVE_DIMS, "base", max_upload_bytes=2**20)


def error_of(call, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value


def file_bytes(tensors) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def state_bytes(state: TunedState) -> bytes:
    return file_bytes({f"blocks.{i}.att.time_state": layer.clone() for i, layer in enumerate(state.time_state)})


def test_known_state_mounts_on_first_use_and_unmount_blocks_it(store):
    mid = store.resolve("alpha")
    assert torch.equal(store.fetch(mid).time_state, random_state(1).time_state)
    assert store.listing()["mounted"] == [{"name": "alpha", "source": "states_dir", "shape": [2, 1, 64, 64],
                                           "token_shift": False, "card": None, "base_match": None, "warning": NO_CARD_WARNING}]
    assert store.unmount("alpha") == {"name": "alpha", "mounted": False}
    assert error_of(store.resolve, "alpha").status == 404
    assert error_of(store.fetch, mid).status == 404  # a request that raced the unmount gets 404, not old data
    assert error_of(store.unmount, "alpha").status == 404
    store.mount("alpha")
    assert store.resolve("alpha") != mid  # re-mounting gives a new cache id


def test_dropped_in_file_is_servable_without_restart(store):
    assert "beta" not in store.servable_names()
    save_state(random_state(2), os.path.join(store.states_dir, "beta.pth"))
    assert store.servable_names() == ["alpha", "beta"]
    assert torch.equal(store.fetch(store.resolve("beta")).time_state, random_state(2).time_state)


def test_unknown_state_is_404(store):
    err = error_of(store.resolve, "nope")
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")


@pytest.mark.parametrize("name", ["../alpha", "/etc/passwd", "a/b", "..", ".hidden", "", "x" * 129, "a\x00b"])
def test_path_like_names_are_refused(store, name):
    err = error_of(store.mount, name)
    assert (err.status, err.code) == (400, "invalid_state_name")


def test_symlink_out_of_the_states_dir_is_refused(store, tmp_path):
    save_state(random_state(3), str(tmp_path / "secret.pth"))
    os.symlink(tmp_path / "secret.pth", os.path.join(store.states_dir, "sneaky.pth"))
    assert error_of(store.resolve, "sneaky").status == 400
    assert error_of(state_path, store.states_dir, "sneaky").message == \
        "state 'sneaky' resolves outside the states folder"


def test_upload_mounts_a_checked_state(store):
    assert store.upload("gamma", state_bytes(random_state(7)))["source"] == "upload"
    assert torch.equal(store.fetch(store.resolve("gamma")).time_state, random_state(7).time_state)


@pytest.mark.parametrize("data, fragment", [
    (b"definitely not a checkpoint", "not a PyTorch checkpoint"),
    (file_bytes({"blocks.0.att.time_state": torch.zeros(1, 64, 64), "emb.weight": torch.zeros(2)}),
     "unexpected key 'emb.weight'"),
    (file_bytes({"blocks.1.att.time_state": torch.zeros(1, 64, 64)}), "missing key(s) 'blocks.0.att.time_state'"),
    (file_bytes([torch.zeros(1)]), "expected a dict of tensors"),
    (file_bytes({"blocks.0.att.time_state": os.system}), "holds objects other than tensors; it was not loaded"),
])
def test_bad_uploads_are_refused_before_mounting(store, data, fragment):
    err = error_of(store.upload, "bad", data)
    assert err.status == 400 and fragment in err.message, err.message
    assert "bad" not in store.servable_names() and error_of(store.resolve, "bad").status == 404


def test_wrong_shape_state_names_both_shapes(store):
    wrong = torch.zeros(2, 2, 64, 64)
    err = error_of(store.upload, "wide", state_bytes(TunedState(wrong)))
    assert err.status == 400
    assert err.message == ("state 'wide': state shape [2, 2, 64, 64] (L,H,N,N) does not fit the model's "
                           "[2, 1, 64, 64]")


def test_oversized_upload_is_413_and_base_name_is_reserved(store):
    assert error_of(store.upload, "big", b"x" * (2**20 + 1)).status == 413
    assert error_of(store.upload, "base", state_bytes(random_state(1))).code == "invalid_state_name"


BASE_CARD = {"sha256": "ab" * 32, "file": "base.pth", "version": "x070", "n_layer": 2, "n_embd": 64,
             "head_size": 64, "vocab_size": 65536}
FOREIGN_CARD = {"base": {**BASE_CARD, "sha256": "cd" * 32, "file": "other.pth"}, "method": "state"}


def test_an_upload_is_written_into_states_dir_and_survives_a_restart(store):
    store.upload("gamma", state_bytes(random_state(7)), {"base": BASE_CARD, "method": "state"})
    assert not [f for f in os.listdir(store.states_dir) if f.endswith(".tmp")]
    restarted = StateStore(store.states_dir, SERVE_DIMS, "base", max_upload_bytes=2**20, base=BASE_CARD)
    assert restarted.servable_names() == ["alpha", "gamma"]
    assert torch.equal(restarted.fetch(restarted.resolve("gamma")).time_state, random_state(7).time_state)
    assert "warning" not in restarted.listing()["mounted"][0]  # its card came along


def test_a_state_tuned_on_another_base_is_409_unless_forced(tmp_path):
    states_dir = tmp_path / "states"
    states_dir.mkdir()
    save_state(random_state(1), str(states_dir / "foreign.pth"))
    (states_dir / "foreign.json").write_text(json.dumps(FOREIGN_CARD))
    store = StateStore(str(states_dir), SERVE_DIMS, "base", max_upload_bytes=2**20, base=BASE_CARD)
    for call in (lambda: store.mount("foreign"), lambda: store.resolve("foreign"),
                 lambda: store.upload("other", state_bytes(random_state(2)), FOREIGN_CARD)):
        err = error_of(call)
        assert (err.status, err.code) == (409, "base_mismatch")
    assert err.message == ("state 'other' was tuned on base 'other.pth' (sha256 cdcdcdcdcdcdcdcd…), but this server "
                           "loaded 'base.pth' (sha256 abababababababab…); a state works only on the model it was "
                           "tuned on (mount it with \"force\": true to serve it anyway)")
    assert not (states_dir / "other.pth").exists()
    assert store.upload("vague", state_bytes(random_state(2)), {"method": "state"})["warning"] == \
        "the state card names no base model (base.sha256)"
    forced = store.mount("foreign", force=True)
    assert forced["warning"].startswith("mounted with force: state 'foreign' was tuned on base 'other.pth'")


def test_info_reads_the_card_of_a_state_that_is_not_mounted(tmp_path):
    states_dir = tmp_path / "states"
    states_dir.mkdir()
    for name, card in (("foreign", FOREIGN_CARD), ("own", {"base": BASE_CARD, "method": "state", "steps": 7})):
        save_state(random_state(1), str(states_dir / f"{name}.pth"))
        (states_dir / f"{name}.json").write_text(json.dumps(card))
    store = StateStore(str(states_dir), SERVE_DIMS, "base", max_upload_bytes=2**20, base=BASE_CARD)
    assert store.info("foreign") == {"name": "foreign", "mounted": False, "source": "states_dir",
                                     "card": FOREIGN_CARD, "base_match": False}
    store.resolve("own")
    own = store.info("own")
    assert (own["mounted"], own["card"]["steps"], own["base_match"]) == (True, 7, True)
    assert error_of(store.info, "nobody").status == 404


def test_blend_is_the_weighted_sum_and_its_card_records_the_recipe(store):
    store.upload("beta", state_bytes(random_state(2)))
    assert store.blend("same", {"alpha": 1.0})["source"] == "blend"
    assert torch.equal(store.fetch(store.resolve("same")).time_state, random_state(1).time_state)
    store.blend("mix", {"alpha": 0.7, "beta": -0.3})
    assert torch.allclose(store.fetch(store.resolve("mix")).time_state,
                          0.7 * random_state(1).time_state - 0.3 * random_state(2).time_state)
    with open(os.path.join(store.states_dir, "mix.json")) as f:
        assert json.load(f)["blend"] == {"alpha": 0.7, "beta": -0.3}
    assert error_of(store.blend, "bad", {"nope": 1.0}).status == 404


def test_a_blend_knows_its_base_only_when_every_part_was_tuned_on_it(tmp_path):
    states_dir = tmp_path / "states"
    states_dir.mkdir()
    store = StateStore(str(states_dir), SERVE_DIMS, "base", max_upload_bytes=2**20, base=BASE_CARD)
    store.upload("carded", state_bytes(random_state(1)), {"base": BASE_CARD, "method": "state"})
    store.upload("other", state_bytes(random_state(3)), {"base": BASE_CARD, "method": "state"})
    store.upload("bare", state_bytes(random_state(2)))
    both = store.blend("both", {"carded": 0.5, "other": 0.5})
    assert (both["base_match"], both["card"]["base"], "warning" in both) == (True, BASE_CARD, False)
    mixed = store.blend("mixed", {"carded": 0.5, "bare": 0.5})
    assert (mixed["base_match"], "base" in mixed["card"]) == (None, False)
    assert mixed["warning"] == "blended from ['bare'], whose base model is unknown"
    assert json.loads((states_dir / "mixed.json").read_text())["blend"] == {"carded": 0.5, "bare": 0.5}
    assert store.info("mixed")["base_match"] is None


# ---------------------------------------------------------------- request parsing


def test_request_errors_name_the_field():
    err = error_of(parse_request, CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0})
    assert (err.status, err.param) == (400, "max_tokens")
    assert error_of(parse_request, CompletionRequest, {"model": "m"}).param == "prompt"
    assert error_of(parse_request, CompletionRequest, {"model": "m", "prompt": "x", "n": 2}).message == \
        "n: only n=1 is supported"
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["x"], "stop": "\n"}).stop == ["\n"]


def test_multipart_fields_keep_binary_payloads_exactly():
    payload = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ngamma\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"g.pth\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n--XyZ--\r\n")
    assert multipart_fields(body, "multipart/form-data; boundary=XyZ") == {"name": b"gamma", "file": payload}


# ---------------------------------------------------------------- app building (no Ray runtime needed)


@pytest.fixture
def serve_args(tmp_path):
    """The args of jobs/serve_config.yaml, pointed at a tiny model and a temp states folder."""
    import yaml
    from rwkvray.model.checkpoint import save_checkpoint
    save_checkpoint(random_model(SERVE_DIMS).state_dict(), str(tmp_path / "tiny.pth"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "jobs", "serve_config.yaml")) as f:
        app = yaml.safe_load(f)["applications"][0]
    assert app["import_path"] == "rwkvray.launch.serving:app_builder"
    return {**app["args"], "model": str(tmp_path / "tiny.pth"), "states_dir": str(tmp_path / "states"),
            "use_gpu": False}


def test_config_file_args_and_a_spec_path_both_build_the_app(serve_args, monkeypatch, tmp_path):
    pytest.importorskip("ray")
    import yaml
    from ray import serve
    from rwkvray.launch.serving import app_builder
    monkeypatch.setenv(serve_args["api_key_env"], "k")
    spec = tmp_path / "serve.yaml"
    spec.write_text(yaml.safe_dump({"serve": serve_args}))
    expected = spec_from_dict({"serve": serve_args}, "test").serve
    for app in (app_builder(serve_args), app_builder({"spec": str(spec)})):
        assert isinstance(app, serve.Application)
        gateway = app._bound_deployment  # the ingress, bound to (config, vocab_size, api_key, registry, model)
        config, vocab_size, api_key = gateway.init_args[:3]
        assert (gateway.name, config, vocab_size, api_key) == ("Gateway", expected, SERVE_DIMS.vocab_size, "k")


def test_app_builder_refuses_bad_args_and_a_missing_api_key(serve_args, monkeypatch):
    pytest.importorskip("ray")
    from rwkvray.errors import UserError
    from rwkvray.launch.serving import app_builder
    monkeypatch.delenv(serve_args["api_key_env"], raising=False)
    with pytest.raises(UserError, match="^serve.api_key_env: the environment variable RWKVRAY_API_KEY is not set"):
        app_builder(serve_args)
    with pytest.raises(UserError, match="^serve app args: serve.max_batch_size: "):
        app_builder({**serve_args, "max_batch_size": 0})


@pytest.mark.parametrize("fields, message", [
    ({"op": "cuda", "use_gpu": False}, "serve.op: cuda needs a GPU (set use_gpu: true or auto, or op: torch)"),
    ({"op": "cud"}, "serve.op: must be one of auto, torch, cuda, fla (got 'cud')"),
    ({"prefill_chunk": 0}, "serve.prefill_chunk: must be ≥ 1"),
    ({"num_cpus": 0}, "serve.num_cpus: must be ≥ 1, or auto (got 0)"),
    ({"num_cpus": "all"}, "serve.num_cpus: must be ≥ 1, or auto (got 'all')"),
    ({"stream_interval_ms": -1}, "serve.stream_interval_ms: must be ≥ 0"),
    ({"stream_chunks_per_s": 0}, "serve.stream_chunks_per_s: must be > 0"),
])
def test_engine_settings_are_checked_in_the_spec(tmp_path, fields, message):
    from rwkvray.spec import spec_from_dict
    from rwkvray.errors import UserError
    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    with pytest.raises(UserError) as caught:
        spec_from_dict({"serve": {"model": str(model), **fields}}, "spec.yaml")
    assert str(caught.value) == f"spec.yaml: {message}"


@pytest.mark.parametrize("fields, gpu, cpus", [
    ({}, False, os.cpu_count()),             # one CPU replica, no Ray here: the whole machine
    ({"replicas": 3}, False, 1),             # several share the node
    ({"num_cpus": 3, "replicas": 2}, False, 3),
    ({}, True, 0),                           # a GPU replica reserves no CPU unless told to
    ({"num_cpus": 2}, True, 2),
])
def test_a_model_replica_reserves_the_cpus_it_runs_torch_threads_on(tmp_path, fields, gpu, cpus):
    from rwkvray.serve.app import replica_cpus
    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    config = spec_from_dict({"serve": {"model": str(model), **fields}}, "spec.yaml").serve
    assert replica_cpus(config, gpu) == cpus
