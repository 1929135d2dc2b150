"""Eval rows and metrics, checked against direct computations on a tiny full-vocab model (no Ray here; the
command on Ray is in test_eval_cli.py)."""
import asyncio
import json

import numpy as np
import pytest
import torch

from rwkvray.errors import UserError
from rwkvray.eval.items import parse_rows, read_items
from rwkvray.eval.metrics import compare_with_base, summarize
from rwkvray.eval.report import comparison_lines, detail_rows, table
from rwkvray.eval.scoring import ANSWER_END, Record, evaluate, score_batch
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.rwkv import load_model
from rwkvray.peft.state import from_time_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.engine.batch_engine import BatchEngine
from rwkvray.text.generate import generate_tokens, start_state
from rwkvray.text.tokenizer import get_tokenizer
from rwkvray.train.data import assemble_batch, line_document

ROWS = [
    {"prompt": "User: Who are you?\n\nAssistant:", "choices": [" Orbit", " a cat", " nobody at all"], "answer": 0},
    {"prompt": "The sky is", "choices": [" blue", " green"], "answer": 1},
    {"prompt": "User: Hello!\n\nAssistant:", "reference": "Hi"},
    {"prompt": "Count:", "reference": ["1 2 3", "one"]},
    {"text": "Orbit lives on Starlight Station."},
    {"messages": [{"role": "user", "content": "Where is your home?"},
                  {"role": "assistant", "content": "Starlight Station!"}]},
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return load_model(make_tiny_model(1, 64))[0]


@pytest.fixture(scope="module")
def states(model):
    torch.manual_seed(3)
    return {"base": None, "tuned": TunedState(torch.randn(1, *model.dims.state_shape) * 2)}


@pytest.fixture(scope="module")
def items(tokenizer):
    return parse_rows([json.dumps(row) for row in ROWS], "rows.jsonl", lambda n: f"rows.jsonl:{n}", tokenizer)


@pytest.fixture(scope="module")
def records(model, tokenizer, items, states):
    async def run():
        engine = BatchEngine(model, tokenizer, max_batch_size=4)
        return await evaluate(engine, items, states, MAX_TOKENS, batch_size=3)
    return asyncio.run(run())


def by_key(records):
    return {(r.state, r.index): r for r in records}


def direct_logprobs(model, tokens, time_state):
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one plain forward of this sequence alone."""
    logits, _ = model(torch.tensor([tokens]), start_state(model, time_state))
    logprobs = torch.log_softmax(logits[0, :-1].double(), -1)
    return logprobs.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1))[:, 0]


def test_multiple_choice_is_the_highest_summed_logprob(model, tokenizer, items, states, records):
    found = by_key(records)
    for item in items[:2]:
        prompt = tokenizer.encode(ROWS[item.index]["prompt"])
        for name, time_state in states.items():
            totals = []
            for choice in ROWS[item.index]["choices"]:
                tokens = prompt + tokenizer.encode(choice)  # the choice encoded alone, after the prompt
                totals.append(direct_logprobs(model, tokens, time_state)[len(prompt) - 1:].sum().item())
            batched = score_batch(model, [(seq, time_state) for seq in item.scored])
            assert [total for total, _ in batched] == pytest.approx(totals, rel=1e-5, abs=1e-5)
            assert [count for _, count in batched] == [len(tokenizer.encode(c)) for c in ROWS[item.index]["choices"]]
            record = found[name, item.index]
            assert record.prediction == int(np.argmax(totals))
            assert record.values == {"mc_acc": float(record.prediction == ROWS[item.index]["answer"])}


def test_generation_is_greedy_text_cut_at_a_blank_line(model, tokenizer, items, states, records):
    found = by_key(records)
    for item in items[2:4]:
        for name, time_state in states.items():
            tokens = list(generate_tokens(model, item.prompt, time_state, MAX_TOKENS, temperature=0.0))
            text = tokenizer.decode(tokens).split(ANSWER_END)[0].strip()
            record = found[name, item.index]
            assert record.prediction == text
            refs = ROWS[item.index]["reference"]
            refs = [refs] if isinstance(refs, str) else refs
            assert record.values == {"exact": float(text in refs), "contains": float(any(r in text for r in refs))}
    assert found["base", 2].prediction != found["tuned", 2].prediction  # the state changes what it says


def test_exact_and_contains_against_references(tokenizer):
    item = parse_rows(['{"prompt": "Q", "reference": [" Paris ", "Lyon"]}'], "d", str, tokenizer)[0]
    assert item.references == ["Paris", "Lyon"]
    from rwkvray.eval.scoring import generation_record
    assert generation_record("s", item, "Paris").values == {"exact": 1.0, "contains": 1.0}
    assert generation_record("s", item, "It is Lyon.").values == {"exact": 0.0, "contains": 1.0}
    assert generation_record("s", item, "Rome").values == {"exact": 0.0, "contains": 0.0}


def test_text_loss_is_the_mean_nll_after_the_first_token(model, tokenizer, states, records):
    tokens = tokenizer.encode(ROWS[4]["text"])
    for name, time_state in states.items():
        expected = -direct_logprobs(model, tokens, time_state).mean().item()
        assert by_key(records)[name, 4].values["loss"] == pytest.approx(expected, rel=1e-5)


def test_chat_loss_is_the_training_loss_with_loss_mask_qa(model, tokenizer, states, records):
    document = line_document(ROWS[5], "qa", tokenizer, "rows.jsonl:6")
    batch = assemble_batch([document], np.array([[0, 0, len(document.tokens)]]))
    for name, time_state in states.items():
        zeros = torch.zeros(1, *model.dims.state_shape)
        state = from_time_state(zeros if time_state is None else time_state.time_state, 1, model.dims.n_embd)
        with torch.no_grad():
            expected = masked_lm_loss(model.features(batch.input_ids, state), model.head, batch.targets, batch.mask)
        assert by_key(records)[name, 5].values["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_file_value_is_the_mean_over_items_with_a_bootstrap_interval(records):
    results = summarize(records)
    assert [(r["state"], r["metric"], r["n"]) for r in results] == [
        (s, m, n) for s in ("base", "tuned") for m, n in (("mc_acc", 2), ("exact", 2), ("contains", 2), ("loss", 2))]
    for row in results:
        values = [r.values[row["metric"]] for r in records if r.state == row["state"] and row["metric"] in r.values]
        assert row["value"] == pytest.approx(np.mean(values))  # loss: the mean of the items' own mean losses
        assert row["ci95"][0] <= row["value"] <= row["ci95"][1]
        assert min(values) <= row["ci95"][0] and row["ci95"][1] <= max(values)


def test_paired_bootstrap_against_base():
    base = [Record("base", "d", i, None, {"mc_acc": float(i % 2)}) for i in range(40)]
    same = [Record("same", "d", i, None, {"mc_acc": float(i % 2)}) for i in range(40)]
    better = [Record("better", "d", i, None, {"mc_acc": float(i % 2 or i < 10)}) for i in range(40)]
    rows = compare_with_base(base + same + better)
    assert rows[0]["state"] == "same" and rows[0]["difference"] == 0 and rows[0]["ci95"] == [0, 0]
    assert rows[1]["difference"] == pytest.approx(5 / 40)
    assert 0 < rows[1]["ci95"][0] < 5 / 40 < rows[1]["ci95"][1]
    line = comparison_lines(base + better)[0]
    assert line.startswith("better vs base: d mc_acc +12.5 pts (95% CI +")


def test_table_and_details(records):
    text = table(summarize(records)).splitlines()
    assert text[0].split() == ["state", "rows.jsonl", "mc_acc", "%", "rows.jsonl", "exact", "%", "rows.jsonl",
                               "contains", "%", "rows.jsonl", "loss"]
    assert [line.split()[0] for line in text[1:]] == ["base", "tuned"]
    details = detail_rows(records)
    assert len(details) == 2 * len(ROWS)
    assert set(details[0]) == {"state", "data", "index", "prediction", "correct"}
    assert set(details[4]) == {"state", "data", "index", "loss"}


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "Q", "choices": ["a", "b"]}', 'bad.jsonl:2: missing key "answer" (a choice row has prompt, '
     "choices, answer)"),
    ('{"prompt": "Q", "choices": ["a", "b"], "answer": 2}', 'bad.jsonl:2: "answer" must be an index into '
     "choices, 0 to 1 (got 2)"),
    ('{"prompt": "Q", "choices": ["a", ""], "answer": 0}', "bad.jsonl:2: choices[1] is empty"),
    ('{"prompt": "Q"}', 'bad.jsonl:2: a row with "prompt" needs "choices" and "answer" (multiple choice) or '
     '"reference" (generation)'),
    ('{"prompt": "", "reference": "x"}', 'bad.jsonl:2: "prompt" must not be empty'),
    ('{"prompt": "Q", "reference": " "}', 'bad.jsonl:2: "reference" must not be empty (an empty reference is '
     "contained in any text)"),
    ('{"text": "a"}', 'bad.jsonl:2: "text" must hold at least 2 tokens (the loss predicts every token after the '
     "first)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'bad.jsonl:2: "messages" needs an assistant reply '
     "(the loss covers the replies only)"),
    ('{"text": "ab", "label": 1}', 'bad.jsonl:2: unexpected key "label" in a text row (it has text)'),
    ("[1, 2]", 'bad.jsonl:2: expected a JSON object, one of {"prompt", "choices", "answer"}, {"prompt", '
     '"reference"}, {"text"} or {"messages"}'),
    ("{oops", "bad.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, tokenizer, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine row"}\n' + row + "\n")
    with pytest.raises(UserError) as err:
        read_items(str(path), tokenizer)
    assert str(err.value) == message.replace("bad.jsonl", str(path))


def test_an_rwkv6_model_and_state_score_the_same_way(make_tiny_model, tokenizer, items):
    model = load_model(make_tiny_model(1, 64, "x060"))[0]
    torch.manual_seed(4)
    states = {"base": None, "tuned": TunedState(torch.randn(1, *model.dims.state_shape))}

    async def run():
        return await evaluate(BatchEngine(model, tokenizer, max_batch_size=4), items, states, 6, batch_size=4)
    found = by_key(asyncio.run(run()))
    tokens = tokenizer.encode(ROWS[4]["text"])
    for name, time_state in states.items():
        assert found[name, 4].values["loss"] == pytest.approx(-direct_logprobs(model, tokens, time_state).mean().item(),
                                                              rel=1e-5)
        text = tokenizer.decode(list(generate_tokens(model, items[2].prompt, time_state, 6, temperature=0.0)))
        assert found[name, 2].prediction == text.split(ANSWER_END)[0].strip()
