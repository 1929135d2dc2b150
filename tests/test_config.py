import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pydantic import ValidationError

from rwkvray.launch.tune_space import ray_search_space, spec_for_trial
from rwkvray.spec import (
    ServeSpec,
    SpecLoader,
    TrainSpec,
    TuneSpec,
    check_model_expectations,
    expect_kind,
    load_spec,
    TUNABLE_KEYS,
    spec_from_dict,
    strategy_to_deepspeed,
)
from rwkvray.train.deepspeed_config import deepspeed_config
from rwkvray.model.dims import ModelDimsX070
from rwkvray.errors import UserError
from rwkvray.files import storage

REPO = Path(__file__).resolve().parent.parent
M = "model: {path: m.pth}\n"
D = "data: {file: d.jsonl}\n"
MD = M + D
TUNE_DATA = "data: {file: d.jsonl, holdout_fraction: 0.1}\n"
GPU = "scaling: {use_gpu: true}\n"


def load_text(text: str, workdir: Path, name: str = "job.yaml"):
    path = workdir / name
    path.write_text(text)
    return load_spec(str(path))


# (id, spec text, the message after "<spec path>: "; {tmp} is the working dir)
MALFORMED = [
    ("int-as-word", MD + "trainer: {epoch_count: two}\n", "trainer.epoch_count: must be an integer (got 'two')"),
    ("int-as-float", MD + "trainer: {micro_bsz: 2.5}\n", "trainer.micro_bsz: must be an integer (got 2.5)"),
    ("bool-as-word", MD + "trainer: {grad_cp: maybe}\n", "trainer.grad_cp: must be true or false (got 'maybe')"),
    ("number-as-string", MD + "optim: {lr_init: '0.01'}\n", "optim.lr_init: must be a number (got '0.01')"),
    ("block-as-list", MD + "trainer: [1, 2]\n", "trainer: must be a mapping (got [1, 2])"),
    ("unknown-top-key", MD + "optimizer: {lr: 1}\n", "optimizer: unknown key"),
    ("unknown-block-key", MD + "trainer: {foo: 1}\n", "trainer.foo: unknown key"),
    ("unknown-deep-key", MD + "peft: {method: lora, lora: {rank: 8}}\n", "peft.lora.rank: unknown key"),
    ("unknown-key-hint", MD + "optim: {lr_finl: 1.0e-5}\n", "optim.lr_finl: unknown key (did you mean lr_final?)"),
    ("negative-lr", MD + "optim: {lr_init: -1}\n", "optim.lr_init: must be > 0"),
    ("zero-lr-final", MD + "optim: {lr_final: 0}\n", "optim.lr_final: must be > 0"),
    ("lr-final-above-init", MD + "optim: {lr_init: 1e-3, lr_final: 1e-2}\n", "optim.lr_final: must be ≤ lr_init (0.001)"),
    ("bad-beta", MD + "optim: {betas: [0.9, 1.5]}\n", "optim.betas[1]: must be < 1"),
    ("missing-model-file", "model: {path: nope.pth}\n" + D, "model.path: file not found: {tmp}/nope.pth"),
    ("model-is-folder", "model: {path: .}\n" + D, "model.path: is a folder, not a file: {tmp}"),
    ("missing-binidx", M + "data: {file: q, type: binidx}\n", "data.file: binidx file not found: {tmp}/q.bin"),
    ("missing-eval-file", M + "data: {file: d.jsonl, eval_file: e.jsonl}\n", "data.eval_file: file not found: {tmp}/e.jsonl"),
    ("qa-on-binidx", M + "data: {file: p, type: binidx, loss_mask: qa}\n", "data.loss_mask: qa needs jsonl data (binidx has no chat turns)"),
    ("short-ctx", M + "data: {file: d.jsonl, ctx_len: 1}\n", "data.ctx_len: must be ≥ 2"),
    ("data-without-model", D, "model: required"),
    ("nothing-to-train", "trainer: {seed: 1}\n", "model: required; data: required"),
    ("num-workers-zero", MD + "scaling: {num_workers: 0}\n", "scaling.num_workers: must be ≥ 1"),
    ("bad-precision", MD + "trainer: {precision: fp8}\n", "trainer.precision: must be one of bf16, fp16, fp32, tf32 (got 'fp8')"),
    ("bad-op", MD + "trainer: {op: triton}\n", "trainer.op: must be one of auto, torch, cuda, fla (got 'triton')"),
    ("cuda-op-on-cpu", MD + "trainer: {op: cuda}\n", "trainer.op: cuda needs a GPU (set scaling.use_gpu: true, or op: torch)"),
    ("fp16-on-cpu", MD + "trainer: {precision: fp16}\n", "trainer.precision: fp16 needs a GPU (set scaling.use_gpu: true, or use bf16/fp32)"),
    ("bad-stage", MD + "deepspeed: {stage: 4}\n", "deepspeed.stage: must be one of 0, 1, 2, 3 (got 4)"),
    ("stage-as-bool", MD + "deepspeed: {stage: true}\n", "deepspeed.stage: must be one of 0, 1, 2, 3 (got true)"),
    ("bad-strategy", MD + "deepspeed: {strategy: deepspeed_stage_4}\n",
     ("deepspeed.strategy: unknown strategy 'deepspeed_stage_4' (use deepspeed_stage_1, deepspeed_stage_2, "
      "deepspeed_stage_2_offload, deepspeed_stage_3, deepspeed_stage_3_offload, deepspeed or ddp)")),
    ("strategy-and-stage", MD + "deepspeed: {strategy: deepspeed_stage_2, stage: 2}\n", "deepspeed.stage: set either strategy or stage/offload, not both"),
    ("offload-stage-0", MD + GPU + "deepspeed: {stage: 0, offload: true}\n", "deepspeed.offload: needs stage 1, 2 or 3 (stage 0 has no ZeRO optimizer to offload)"),
    ("offload-on-cpu", MD + "deepspeed: {strategy: deepspeed_stage_2_offload}\n",
     "deepspeed.offload: needs scaling.use_gpu: true (on CPU the optimizer already lives in host memory)"),
    ("owned-deepspeed-key", MD + "deepspeed: {config: {train_micro_batch_size_per_gpu: 8}}\n",
     "deepspeed.config.train_micro_batch_size_per_gpu: not allowed here: set trainer.micro_bsz instead"),
    ("deepspeed-optimizer", MD + "deepspeed: {config: {optimizer: {type: Adam}}}\n", "deepspeed.config.optimizer: not allowed here: set the optim block instead"),
    ("bad-placement", MD + "scaling: {placement_strategy: RANDOM}\n",
     "scaling.placement_strategy: must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD (got 'RANDOM')"),
    ("lowercase-gpu", MD + "scaling: {use_gpu: true, resources_per_worker: {gpu: 1}}\n",
     "scaling.resources_per_worker.gpu: write GPU (Ray resource names are case-sensitive)"),
    ("negative-resource", MD + "scaling: {resources_per_worker: {CPU: -1}}\n", "scaling.resources_per_worker.CPU: must be ≥ 0"),
    ("bad-quant", MD + "peft: {quant: fp8}\n", "peft.quant: must be one of none, int8, nf4 (got 'fp8')"),
    ("unused-peft-block", MD + "peft: {method: state, lora: {r: 4}}\n", "peft.lora: given, but peft.method is state"),
    ("combine-with-state", MD + "peft: {method: state, combine_state: true}\n", "peft.combine_state: needs a weight method (method: lora, pissa or disha)"),
    ("zero-rank", MD + "peft: {method: lora, lora: {r: 0}}\n", "peft.lora.r: must be ≥ 1"),
    ("bad-target", MD + "peft: {method: lora, lora: {targets: [att.kee]}}\n",
     "peft.lora.targets[0]: must be one of att.receptance, att.key, att.value, att.output, ffn.key, ffn.value (got 'att.kee')"),
    ("dropout-one", MD + "peft: {method: lora, lora: {dropout: 1.0}}\n", "peft.lora.dropout: must be < 1"),
    ("bad-disha-mode", MD + "peft: {method: disha, disha: {mode: miss}}\n", "peft.disha.mode: must be one of bone, bat (got 'miss')"),
    ("max-failures", MD + "run: {max_failures: -2}\n", "run.max_failures: must be ≥ 0, or -1 to retry forever"),
    ("run-name", MD + "run: {name: my run}\n", "run.name: must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"),
    ("tune-empty-space", M + TUNE_DATA + "tune: {space: {}}\n", "tune.space: must name at least one of lr_init, lr_final, warmup_steps, ctx_len"),
    ("tune-no-space", M + TUNE_DATA + "tune: {num_samples: 2}\n", "tune.space: required"),
    ("tune-unknown-distribution", M + TUNE_DATA + "tune: {space: {lr_init: {normal: [1, 2]}}}\n",
     "tune.space.lr_init: unknown distribution 'normal' (use loguniform, uniform, choice, randint)"),
    ("tune-lr-zero", M + TUNE_DATA + "tune: {space: {lr_init: {uniform: [0, 0.1]}}}\n", "tune.space.lr_init: learning rates must be > 0 (got [0, 0.1])"),
    ("tune-low-above-high", M + TUNE_DATA + "tune: {space: {warmup_steps: {randint: [10, 5]}}}\n",
     "tune.space.warmup_steps: randint needs [low, high] with low < high (got [10, 5])"),
    ("tune-untunable-key", M + TUNE_DATA + "tune: {space: {micro_bsz: {choice: [1, 2]}}}\n",
     "tune.space.micro_bsz: not tunable (use lr_init, lr_final, warmup_steps, ctx_len)"),
    ("tune-float-ctx", M + TUNE_DATA + "tune: {space: {ctx_len: {uniform: [64, 512]}}}\n", "tune.space.ctx_len: uniform gives fractions; use randint or choice"),
    ("tune-num-samples-zero", M + TUNE_DATA + "tune: {num_samples: 0, space: {lr_init: {choice: [0.01]}}}\n", "tune.num_samples: must be ≥ 1"),
    ("tune-lr-ranges-cross", M + TUNE_DATA + "tune: {space: {lr_final: {loguniform: [1e-3, 1e-1]}}}\n",
     "tune.space: lr_final can reach 0.1 but lr_init can be as low as 0.01; every trial needs lr_final ≤ lr_init"),
    ("tune-val-loss-no-eval", MD + "tune: {space: {lr_init: {choice: [0.01]}}}\n",
     "tune.metric: val_loss needs evaluation data: set data.eval_file or data.holdout_fraction"),
    ("tune-fractional-gpus", M + TUNE_DATA + GPU + "tune: {gpus_per_trial: 1.5, space: {lr_init: {choice: [0.01]}}}\n",
     "tune.gpus_per_trial: above 1 it must be a whole number (Ray shares only fractions of one GPU)"),
    ("tune-max-t", M + TUNE_DATA + "tune: {space: {lr_init: {choice: [0.01]}}, scheduler: {grace_period: 4, max_t: 2}}\n",
     "tune.scheduler.max_t: must be ≥ grace_period (4)"),
    ("serve-port", "serve: {model: m.pth, port: 70000}\n", "serve.port: must be ≤ 65535"),
    ("serve-no-model", "serve: {port: 8080}\n", "serve.model: required"),
    ("serve-use-gpu", "serve: {model: m.pth, use_gpu: 1}\n", "serve.use_gpu: must be one of auto, true, false (got 1)"),
    ("serve-with-training-blocks", "serve: {model: m.pth}\n" + MD,
     "serve: a serve spec holds the serve block alone (this one also has model, data): train or tune from a spec of its own"),
    ("serve-env-name", "serve: {model: m.pth, api_key_env: 'my key'}\n",
     "serve.api_key_env: must be an environment variable name like RWKVRAY_API_KEY (got 'my key')"),
    ("several-problems", MD + "optim: {lr_init: 0}\nscaling: {num_workers: 0}\n", "optim.lr_init: must be > 0; scaling.num_workers: must be ≥ 1"),
]


@pytest.mark.parametrize("text,expected", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_spec_gives_one_line_error(workdir, text, expected):
    with pytest.raises(UserError) as caught:
        load_text(text, workdir)
    assert str(caught.value) == f"{workdir / 'job.yaml'}: " + expected.format(tmp=workdir)


FILE_PROBLEMS = [
    ("yaml-syntax", "model: {path: m.pth}\ntrainer: {epoch_count: 1\n", ":3: YAML syntax error: expected ',' or '}', but got '<stream end>'"),
    ("yaml-tab", "trainer:\n\tepoch_count: 1\n", ":2: YAML syntax error: found character '\\t' that cannot start any token"),
    ("duplicate-key", MD + "trainer: {}\ntrainer: {}\n", ":4: duplicate key 'trainer'"),
    ("empty-file", "", ": the spec is empty (expected blocks such as model, data, trainer)"),
    ("only-comments", "# nothing yet\n", ": the spec is empty (expected blocks such as model, data, trainer)"),
    ("top-level-list", "- model\n- data\n", ": the top level must be a mapping of blocks (model, data, ...), not a list"),
    ("top-level-string", "hello\n", ": the top level must be a mapping of blocks (model, data, ...), not a string"),
]


@pytest.mark.parametrize("text,expected", [case[1:] for case in FILE_PROBLEMS], ids=[case[0] for case in FILE_PROBLEMS])
def test_bad_spec_file_gives_one_line_error(workdir, text, expected):
    with pytest.raises(UserError) as caught:
        load_text(text, workdir)
    assert str(caught.value) == f"{workdir / 'job.yaml'}{expected}"


def test_missing_spec_file_and_folder(workdir):
    with pytest.raises(UserError, match=r"^spec file not found: nope\.yaml$"):
        load_spec("nope.yaml")
    with pytest.raises(UserError, match=r"^\.: is a folder, not a spec file$"):
        load_spec(".")


def test_minimal_spec_gets_documented_defaults(workdir):
    spec = load_text(MD, workdir)
    assert spec.source == str(workdir / "job.yaml")
    assert spec.model.path == str(workdir / "m.pth")
    assert (spec.data.type, spec.data.ctx_len, spec.data.loss_mask) == ("jsonl", 512, "none")
    assert (spec.optim.lr_init, spec.optim.lr_final, spec.optim.schedule) == (1e-2, 1e-4, "cos_decay")
    assert (spec.peft.method, spec.trainer.precision, spec.trainer.op, spec.deepspeed.stage) == ("state", "bf16", "auto", 1)
    assert spec.run.storage_path == str(workdir / "runs")
    assert spec.trainer.proj_dir == str(workdir / "runs" / "rwkvray")
    assert (spec.scaling.num_workers, spec.scaling.use_gpu) == (1, False)
    assert type(spec) is TrainSpec


def test_yaml_reads_exponents_without_a_dot_as_floats(workdir):
    spec = load_text(MD + "optim: {lr_init: 1e-2, lr_final: 5E-4, eps: 1e-8}\n", workdir)
    assert (spec.optim.lr_init, spec.optim.lr_final, spec.optim.eps) == (0.01, 0.0005, 1e-8)


def test_binidx_prefix_accepts_bin_suffix(workdir):
    spec = load_text(M + "data: {file: p.bin, type: binidx}\n", workdir)
    assert spec.data.file == str(workdir / "p")


def test_uri_storage_path_is_kept_and_proj_dir_resolved(workdir):
    spec = load_text(MD + "run: {storage_path: 's3://bucket/runs'}\ntrainer: {proj_dir: out/states}\n", workdir)
    assert spec.run.storage_path == "s3://bucket/runs"
    assert spec.trainer.proj_dir == str(workdir / "out" / "states")
    spec = load_text(MD + "run: {storage_path: 's3://bucket/runs', name: job}\n", workdir)
    assert spec.trainer.proj_dir == str(workdir / "runs" / "job")  # the driver's local copy


def test_serve_only_spec_gets_documented_defaults(workdir):
    spec = load_text("serve: {model: m.pth}\n", workdir)
    assert type(spec) is ServeSpec and list(ServeSpec.model_fields) == ["serve"]
    serve = spec.serve
    assert (serve.model_name, serve.states_dir, serve.port, serve.use_gpu) == ("m", str(workdir / "states"), 8000, "auto")
    assert load_text("serve: {model: m.pth, model_name: tiny-chat}\n", workdir).serve.model_name == "tiny-chat"


def test_the_blocks_decide_the_kind_of_spec(workdir):
    assert type(load_text(MD, workdir)) is TrainSpec
    assert type(load_text(M + TUNE_DATA + "tune: {space: {lr_init: {choice: [0.01]}}}\n", workdir)) is TuneSpec
    assert type(load_text("serve: {model: m.pth}\n", workdir)) is ServeSpec
    assert type(load_text(MD + "tune:\nserve:\n", workdir)) is TrainSpec  # empty blocks are left out


KIND_ERRORS = [  # (spec text, kind wanted, the message after "<spec path>: ")
    (MD, TuneSpec, "tune: required for rwkvray tune (this is a train spec, for rwkvray run)"),
    (MD, ServeSpec, "serve: required for rwkvray serve (this is a train spec, for rwkvray run)"),
    ("serve: {model: m.pth}\n", TrainSpec, "model: required for rwkvray run (this is a serve spec, for rwkvray serve)"),
    ("serve: {model: m.pth}\n", TuneSpec, "model: required for rwkvray tune (this is a serve spec, for rwkvray serve)"),
    (M + TUNE_DATA + "tune: {space: {lr_init: {choice: [0.01]}}}\n", ServeSpec,
     "serve: required for rwkvray serve (this is a tune spec, for rwkvray tune)"),
]


@pytest.mark.parametrize("text,kind,expected", KIND_ERRORS)
def test_a_command_given_another_kind_of_spec_says_so_in_one_line(workdir, text, kind, expected):
    (workdir / "job.yaml").write_text(text)
    with pytest.raises(UserError) as caught:
        load_spec(str(workdir / "job.yaml"), kind=kind)
    assert str(caught.value) == f"{workdir / 'job.yaml'}: {expected}"


def test_a_tune_spec_is_a_train_spec(workdir):
    spec = load_text(M + TUNE_DATA + "tune: {space: {lr_init: {choice: [0.01]}}}\n", workdir)
    assert expect_kind(spec, TrainSpec) is spec  # `rwkvray run` trains it with its own values


def test_a_spec_made_from_flags_names_its_keys_as_flags(workdir):
    spec = spec_from_dict({"model": {"path": "m.pth"}, "data": {"file": "d.jsonl"}}, "train flags",
                          {"model.path": "--load_model"})
    assert (spec.key_name("model.path"), spec.key_name("data.file")) == ("--load_model", "data.file")
    assert spec_for_trial(load_text(TUNE, workdir), {}, "t").key_name("model.path") == "model.path"


def test_specs_and_their_blocks_are_frozen(workdir):
    spec = load_text(MD, workdir)
    with pytest.raises(ValidationError, match="frozen"):
        spec.trainer.seed = 7
    with pytest.raises(ValidationError, match="frozen"):
        spec.optim = spec.optim
    with pytest.raises(ValidationError, match="frozen"):
        load_text("serve: {model: m.pth}\n", workdir).serve.port = 9000
    assert spec.trainer.seed == 42


def test_model_expectations_are_checked_against_real_dims(workdir):
    spec = load_text("model: {path: m.pth, n_layer: 24, n_embd: 2048}\n" + D, workdir)
    same = ModelDimsX070(n_layer=24, n_embd=2048, head_size=64, vocab_size=65536, dim_w=96, dim_a=96, dim_v=64, dim_g=256)
    check_model_expectations(spec.model, same, spec.source)
    other = ModelDimsX070(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, dim_w=64, dim_a=64, dim_v=32, dim_g=128)
    with pytest.raises(UserError) as caught:
        check_model_expectations(spec.model, other, spec.source)
    assert str(caught.value) == (
        f"{spec.source}: model {workdir / 'm.pth'} has n_layer=12 but the spec expects 24; n_embd=768 but the spec expects 2048"
    )


def gpu_spec(workdir, deepspeed: str, precision: str = "bf16"):
    return load_text(MD + GPU + f"deepspeed: {deepspeed}\ntrainer: {{micro_bsz: 4, grad_accum: 2, precision: {precision}}}\n"
                     "optim: {grad_clip: 0.5}\n", workdir)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_per_stage(workdir, stage):
    config = deepspeed_config(gpu_spec(workdir, f"{{stage: {stage}}}"))
    assert config == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
    }


def test_deepspeed_config_offload_fp16_and_raw_override(workdir):
    spec = gpu_spec(workdir, "{strategy: deepspeed_stage_3_offload, config: {zero_optimization: {reduce_bucket_size: 5.0e+7}, "
                             "fp16: {initial_scale_power: 12}}}", precision="fp16")
    assert deepspeed_config(spec) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "reduce_bucket_size": 5e7},
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12},
    }


def test_deepspeed_config_fp32_has_no_precision_section(workdir):
    config = deepspeed_config(load_text(MD + "trainer: {precision: fp32}\ndeepspeed: {stage: 0}\n", workdir))
    assert "bf16" not in config and "fp16" not in config
    assert config["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("strategy,expected", [
    ("deepspeed_stage_1", (1, False)),
    ("deepspeed_stage_2", (2, False)),
    ("deepspeed_stage_2_offload", (2, True)),
    ("deepspeed_stage_3_offload", (3, True)),
    ("deepspeed", (2, False)),
    ("ddp", (0, False)),
    ("auto", (0, False)),
])
def test_strategy_to_deepspeed(strategy, expected):
    assert strategy_to_deepspeed(strategy) == expected


def test_unknown_strategy_is_an_error():
    with pytest.raises(UserError, match=r"^unknown strategy 'fsdp' \(use deepspeed_stage_1, "):
        strategy_to_deepspeed("fsdp")


TUNE = M + TUNE_DATA + """tune:
  space:
    lr_init: {loguniform: [1e-2, 1e-1]}
    warmup_steps: {randint: [0, 11]}
    ctx_len: {choice: [64, 128]}
"""


def test_trial_spec_is_a_copy_with_the_sampled_values(workdir):
    spec = load_text(TUNE, workdir)
    before = spec.model_dump()
    trial = spec_for_trial(spec, {"lr_init": 0.05, "warmup_steps": 3, "ctx_len": 64}, "trial_1")
    assert (trial.optim.lr_init, trial.optim.warmup_steps, trial.data.ctx_len) == (0.05, 3, 64)
    assert (trial.run.name, trial.run.storage_path) == ("trial_1", str(workdir / "runs" / "rwkvray" / "trials"))
    assert trial.data.holdout_fraction == 0.1 and trial.tune == spec.tune and trial.source == spec.source
    assert trial.trainer.proj_dir == spec.trainer.proj_dir
    assert spec.model_dump() == before and (spec.optim.lr_init, spec.run.name) == (0.01, "rwkvray")
    with pytest.raises(UserError, match=r"job\.yaml: tune trial config has unknown key 'micro_bsz'$"):
        spec_for_trial(spec, {"micro_bsz": 2}, "trial_2")


def test_every_sampled_value_is_valid_where_the_trial_puts_it(workdir):
    """Trial specs are copies that are not validated again: the space itself admits only valid values."""
    spec = load_text(TUNE, workdir)
    for key, distribution in spec.tune.space.items():
        block, field = TUNABLE_KEYS[key]
        (values,) = distribution.values()  # [low, high] or the choices: the extremes of each
        for value in values:
            blocks = spec.model_dump(mode="json", exclude_unset=True)
            blocks[block] = {**blocks.get(block, {}), field: value}
            assert getattr(getattr(spec_from_dict(blocks, "trial"), block), field) == value
    with pytest.raises(UserError, match=r"job\.yaml: tune\.space\.ctx_len: values must be ≥ 2 \(got \[1, 64\]\)$"):
        load_text(TUNE.replace("choice: [64, 128]", "choice: [1, 64]"), workdir)


def test_ray_search_space_bounds(workdir):
    space = ray_search_space(load_text(TUNE, workdir).tune)
    assert (space["lr_init"].lower, space["lr_init"].upper) == (0.01, 0.1)
    assert (space["warmup_steps"].lower, space["warmup_steps"].upper) == (0, 11)
    assert space["ctx_len"].categories == [64, 128]


# ---------------------------------------------------------------- the example jobs


def referenced_paths(spec: dict) -> list[tuple[dict, str, bool]]:
    """(block, key, is_binidx) for every path in a job spec that must exist."""
    found = []
    for block_name, keys in (("model", ["path"]), ("data", ["file", "eval_file"]), ("serve", ["model"])):
        block = spec.get(block_name) or {}
        found += [(block, key, block.get("type") == "binidx") for key in keys if key in block]
    return found


JOB_SPECS = sorted(p.name for p in (REPO / "jobs").glob("*.yaml") if p.name != "serve_config.yaml")  # that one is a Ray Serve config


@pytest.mark.parametrize("job", JOB_SPECS)
def test_example_job_validates(job, tmp_path, monkeypatch, request):
    """Create the files a job names (absolute ones re-rooted under tmp; URIs as objects in moto's S3) and validate
    it from there."""
    monkeypatch.chdir(tmp_path)
    data = yaml.load((REPO / "jobs" / job).read_text(), Loader=SpecLoader)
    for block, key, is_binidx in referenced_paths(data):
        names = [block[key] + ".bin", block[key] + ".idx"] if is_binidx else [block[key]]
        if storage.is_uri(block[key]):
            endpoint = request.getfixturevalue("s3_env")["AWS_ENDPOINT_URL"]
            bucket = block[key].split("/")[2]
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"))
            except urllib.error.HTTPError as err:
                assert err.code == 409  # made for an earlier job of this module
            for name in names:
                storage.write_bytes(name, b"x")
            continue
        for name in names:
            path = tmp_path / "abs" / name.lstrip("/") if os.path.isabs(name) else Path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        if os.path.isabs(block[key]):
            block[key] = str(tmp_path / "abs" / block[key].lstrip("/"))
    spec = spec_from_dict(data, job)
    assert spec.source == job


def test_example_jobs_say_what_they_promise(tmp_path, monkeypatch, make_tiny_model):
    # a working dir laid out like the repository after `rwkvray init-model ... --out out/tiny.pth`
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny.pth").symlink_to(make_tiny_model(2, 256))
    (tmp_path / "rwkvray").mkdir()
    (tmp_path / "rwkvray" / "sample_data").symlink_to(REPO / "rwkvray" / "sample_data")
    monkeypatch.chdir(tmp_path)
    demo = load_spec(str(REPO / "jobs/demo_state_cpu.yaml"))
    assert (demo.scaling.num_workers, demo.scaling.use_gpu, demo.deepspeed.stage) == (2, False, 1)
    assert (demo.trainer.precision, demo.trainer.op, demo.data.loss_mask) == ("fp32", "torch", "qa")
    assert demo.model.path == str(tmp_path / "out" / "tiny.pth")
    sweep = load_spec(str(REPO / "jobs/tune_sweep.yaml"))
    assert set(sweep.tune.space) == {"lr_init", "lr_final", "warmup_steps"}
    assert load_spec(str(REPO / "jobs/serve.yaml")).serve.model_name == "tiny"


# ---------------------------------------------------------------- cluster configs


def cluster_yaml(name: str):
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def ray_pin() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return pyproject.split("ray[default,train,tune,serve]==")[1].split('"')[0]


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in (REPO / "cluster").glob("*.yaml"))
    assert names == ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-up-gpu.yaml"]
    assert all(isinstance(cluster_yaml(name), dict) for name in names)


def test_ray_up_config_has_launcher_fields():
    config = cluster_yaml("ray-up-gpu.yaml")
    assert config["cluster_name"] and config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert all(node["resources"]["GPU"] >= 1 for node in nodes.values())
    assert sum(node["max_workers"] for node in workers) == config["max_workers"]
    assert any("pip install -e" in cmd and "[ray,gpu]" in cmd for cmd in config["setup_commands"])
    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])


def gpu_limits(cluster_spec: dict) -> list[int]:
    return [
        container["resources"]["limits"]["nvidia.com/gpu"]
        for group in cluster_spec["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
    ]


def test_kuberay_pods_share_no_disk_and_keep_a_download_cache():
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        text = (REPO / "cluster" / name).read_text()
        assert "persistentVolumeClaim" not in text
        manifest = cluster_yaml(name)["spec"]
        cluster = manifest.get("rayClusterSpec", manifest)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            [container] = group["template"]["spec"]["containers"]
            assert {"name": "RWKVRAY_CACHE_DIR", "value": "/cache/rwkvray"} in container["env"]
            assert {"secretRef": {"name": "rwkvray-s3"}} in container["envFrom"]


def test_kuberay_raycluster():
    cluster = cluster_yaml("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray_pin()
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert gpu_limits(cluster["spec"]) == [8]


def test_kuberay_rayjob_runs_an_example_job():
    job = cluster_yaml("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "rwkvray run jobs/bucket_state.yaml"
    bucket_job = load_spec(str(REPO / spec["entrypoint"].split()[-1]), check_files=False)
    inputs = [bucket_job.model.path, bucket_job.data.file, bucket_job.data.eval_file, bucket_job.run.storage_path,
              bucket_job.run.publish.states_dir]
    assert all(path.startswith("s3://my-bucket/") for path in inputs), inputs
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    assert "headGroupSpec" in spec["rayClusterSpec"]
    assert gpu_limits(spec["rayClusterSpec"]) == [4]
