import shlex

import pytest

from rwkvray.spec import check_model_expectations
from rwkvray.model.dims import ModelDimsX070
from rwkvray.errors import UserError
from rwkvray.compat.rwkv_peft import build_train_parser, spec_from_train_flags

# The appendix of the RWKV-PEFT state tuning tutorial (RWKV wiki), with its shell variables filled in.
TUTORIAL_APPENDIX = """
--load_model model.pth --proj_dir output --data_file data/test-1
--vocab_size 65536 --n_layer 24 --n_embd 1024
--data_type binidx --dataload pad --loss_mask pad
--ctx_len 512 --micro_bsz 4
--epoch_steps 1000 --epoch_count 1 --epoch_begin 0 --epoch_save 1
--lr_init 2e-5 --lr_final 2e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8
--accelerator gpu --devices 1 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 1
--my_testing "x070"
--peft lora --lora_config '{"lora_load":"","lora_r":32,"lora_alpha":64,"lora_dropout":0.01}'
"""

# JL-er/RWKV-PEFT scripts/demo-state-tuning.sh
DEMO_STATE_TUNING = """
--load_model model.pth --proj_dir output --data_file data/test-1 --vocab_size 65536 --n_layer 24 --n_embd 2048
--data_type binidx --dataload pad --loss_mask pad --ctx_len 512 --micro_bsz 2
--epoch_steps 800 --epoch_count 10 --epoch_begin 0 --epoch_save 1
--lr_init 1 --lr_final 1e-2 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8
--accelerator gpu --devices 1 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 1
--my_testing "x070" --train_type "state" --dataload pad --op fla
"""

# The typical state tuning command line of an RWKV-PEFT user.
USER_SCRIPT = """
--load_model model.pth --proj_dir output --data_file chats.jsonl --data_type jsonl --vocab_size 65536
--ctx_len 512 --micro_bsz 1 --epoch_steps 1000 --epoch_count 5 --epoch_save 1 --lr_init 1e-2 --lr_final 1e-4
--warmup_steps 10 --lr_schedule cos_decay --precision bf16 --grad_cp 1 --peft state --op cuda --wandb PROJECT
--random_seed 7 --accelerator gpu --devices 1 --strategy deepspeed_stage_1 --n_layer 24 --n_embd 2048 --my_testing x070
"""


def flags(text: str):
    return spec_from_train_flags(shlex.split(text))


def test_tutorial_appendix_maps_to_the_spec(workdir):
    spec = flags(TUTORIAL_APPENDIX)
    assert spec.model.path == str(workdir / "model.pth")
    assert (spec.model.n_layer, spec.model.n_embd, spec.model.vocab_size) == (24, 1024, 65536)
    assert (spec.data.type, spec.data.file, spec.data.loss_mask, spec.data.ctx_len) == ("binidx", str(workdir / "data" / "test-1"), "none", 512)
    assert spec.data.dataload == "pad"  # each document's first ctx_len tokens, as RWKV-PEFT samples them
    assert (spec.peft.method, spec.peft.combine_state) == ("lora", False)
    assert (spec.peft.lora.r, spec.peft.lora.alpha, spec.peft.lora.dropout) == (32, 64.0, 0.01)
    assert (spec.trainer.epoch_steps, spec.trainer.epoch_count, spec.trainer.epoch_save, spec.trainer.micro_bsz) == (1000, 1, 1, 4)
    assert (spec.optim.lr_init, spec.optim.lr_final, spec.optim.warmup_steps) == (2e-5, 2e-5, 0)
    assert (spec.optim.betas, spec.optim.eps) == ([0.9, 0.99], 1e-8)
    assert (spec.trainer.precision, spec.trainer.grad_cp, spec.trainer.proj_dir) == ("bf16", True, str(workdir / "output"))
    assert (spec.scaling.use_gpu, spec.scaling.num_workers) == (True, 1)
    assert (spec.deepspeed.stage, spec.deepspeed.offload) == (1, False)


def test_demo_state_tuning_script(workdir):
    spec = flags(DEMO_STATE_TUNING)
    assert (spec.peft.method, spec.peft.combine_state, spec.trainer.op) == ("state", False, "fla")
    assert (spec.optim.lr_init, spec.optim.lr_final, spec.trainer.micro_bsz, spec.trainer.epoch_count) == (1.0, 1e-2, 2, 10)


def test_user_state_tuning_script(workdir):
    spec = flags(USER_SCRIPT)
    assert (spec.data.type, spec.peft.method, spec.trainer.op, spec.trainer.seed) == ("jsonl", "state", "cuda", 7)
    assert (spec.optim.schedule, spec.optim.warmup_steps, spec.trainer.epoch_count) == ("cos_decay", 10, 5)
    assert (spec.logging.wandb_project, spec.logging.wandb_mode) == ("PROJECT", "online")
    assert spec.source == "train flags"


def test_seed_form_uses_tutorial_defaults(workdir):
    spec = flags("--action train --data chats.jsonl --model model.pth --accelerator cpu")
    assert (spec.data.file, spec.model.path) == (str(workdir / "chats.jsonl"), str(workdir / "model.pth"))
    assert (spec.optim.lr_init, spec.optim.lr_final, spec.data.ctx_len) == (1e-2, 1e-4, 512)
    assert (spec.peft.method, spec.data.type, spec.scaling.use_gpu, spec.trainer.op) == ("state", "jsonl", False, "auto")


def test_n_layer_goes_into_the_spec_and_is_checked(workdir):
    spec = flags("--load_model model.pth --data_file chats.jsonl --n_layer 24 --n_embd 2048 --head_size_a 64")
    assert (spec.model.n_layer, spec.model.n_embd, spec.model.head_size) == (24, 2048, 64)
    tiny = ModelDimsX070(n_layer=2, n_embd=2048, head_size=64, vocab_size=65536, dim_w=8, dim_a=8, dim_v=4, dim_g=16)
    with pytest.raises(UserError) as caught:
        check_model_expectations(spec.model, tiny, spec.source)
    assert str(caught.value) == f"train flags: model {workdir / 'model.pth'} has n_layer=2 but the spec expects 24"


def test_state_plus_weight_method_strategy_and_nodes(workdir):
    spec = flags("--load_model model.pth --data_file chats.jsonl --train_type state --peft miss "
                 "--miss_config '{\"mode\":\"bat\",\"r\":32,\"load\":\"\"}' --strategy deepspeed_stage_2_offload "
                 "--accelerator gpu --devices 8 --num_nodes 2 --accumulate_grad_batches 4 --random_seed -1")
    assert (spec.peft.method, spec.peft.combine_state, spec.peft.disha.mode, spec.peft.disha.r) == ("disha", True, "bat", 32)
    assert (spec.deepspeed.stage, spec.deepspeed.offload) == (2, True)
    assert (spec.scaling.num_workers, spec.trainer.grad_accum, spec.trainer.seed) == (16, 4, 42)


def test_lora_targets_and_old_style_flags(workdir):
    spec = flags("--load_model model.pth --data_file chats.jsonl --lora --lora_r 16 --lora_alpha 32 --lora_parts=att")
    assert (spec.peft.method, spec.peft.lora.r, spec.peft.lora.alpha) == ("lora", 16, 32.0)
    assert spec.peft.lora.targets == ["att.receptance", "att.key", "att.value", "att.output"]
    spec = flags("--load_model model.pth --data_file chats.jsonl --peft pissa "
                 "--peft_config '{\"r\":4,\"svd_niter\":2,\"target_modules\":[\"key\",\"value\"]}'")
    assert (spec.peft.pissa.r, spec.peft.pissa.svd_niter) == (4, 2)
    assert spec.peft.pissa.targets == ["att.key", "att.value", "ffn.key", "ffn.value"]


def test_merge_defaults_to_rwkv_peft_and_train_parts_ln(workdir):
    spec = flags("--load_model model.pth --data_file chats.jsonl --peft lora")
    assert (spec.peft.merge, spec.peft.train_parts) == (True, [])
    spec = flags("--load_model model.pth --data_file chats.jsonl --peft lora --merge 0 --train_parts ln")
    assert (spec.peft.merge, spec.peft.train_parts) == (False, ["ln"])
    assert flags("--load_model model.pth --data_file chats.jsonl --peft lora --train_parts").peft.train_parts == []


def test_binidx_is_inferred_from_the_prefix(workdir):
    assert flags("--load_model model.pth --data_file data/test-1").data.type == "binidx"


def test_flags_ignored_for_rwkv7_are_accepted(workdir):
    spec = flags("--load_model model.pth --data_file chats.jsonl --pre_ffn 0 --head_qk 0 --dim_ffn 7168 --dropout 0.1 "
                 "--layerwise_lr 1 --ds_bucket_mb 200 --chunk_ctx 512 --fused_kernel --head_size_divisor 8 --data_shuffle 1 "
                 "--optim none --my_exit 99999999 --weight_decay_final -1 --mask_id '{\"mask0\":\"0\",\"mask1\":\"1\"}'")
    assert spec.peft.method == "state"


def test_infctx_runs_samples_in_chunks(workdir):
    """--train_type infctx tunes the state (or the --peft weight method alone) in --chunk_ctx chunks; RWKV-PEFT's
    default 512, or the whole --ctx_len when that is shorter."""
    spec = flags("--load_model model.pth --data_file chats.jsonl --train_type infctx --ctx_len 4096 --chunk_ctx 256")
    assert (spec.peft.method, spec.peft.combine_state) == ("state", False)
    assert (spec.data.ctx_len, spec.trainer.chunk_ctx, spec.trainer.chunk_grad) == (4096, 256, "through")
    spec = flags("--load_model model.pth --data_file chats.jsonl --peft lora --train_type infctx --ctx_len 2048 "
                 "--chunk_grad detached")
    assert (spec.peft.method, spec.peft.combine_state) == ("lora", False)
    assert (spec.trainer.chunk_ctx, spec.trainer.chunk_grad) == (512, "detached")
    assert flags("--load_model model.pth --data_file chats.jsonl --train_type infctx --ctx_len 128").trainer.chunk_ctx == 128
    assert flags("--load_model model.pth --data_file chats.jsonl --chunk_ctx 256").trainer.chunk_ctx is None


BAD_FLAGS = [
    ("--lr_init -1", "--lr_init: must be > 0"),
    ("--lr_init 1e-4 --lr_final 1e-3", "--lr_final: must be ≤ lr_init (0.0001)"),
    ("--lr_init abc", "argument --lr_init: invalid float value: 'abc'"),
    ("--bogus 1", "unrecognized arguments: --bogus 1"),
    ("--ctx-len 64 --micro-bsz=2", "unrecognized arguments: --ctx-len 64 --micro-bsz=2 (--ctx-len is --ctx_len; "
                                   "--micro-bsz is --micro_bsz: RWKV-PEFT's flags are spelled with underscores)"),
    ("--my_testing x052", "--my_testing: must be one of x070, x060 (got 'x052')"),
    ("--peft none", "--peft: full fine-tuning is not supported: use --peft state, lora, pissa or disha"),
    ("--peft lisa --train_type state", "--peft: must be one of state, lora, pissa, disha (got 'lisa')"),
    ("--train_type fullctx", "--train_type: 'fullctx' is not supported (use state, fullstate or infctx, or leave it out)"),
    ("--train_type infctx --ctx_len 128 --chunk_ctx 256",
     "--chunk_ctx: must be ≤ ctx_len (128): each ctx_len sample runs in chunks of chunk_ctx tokens (got 256)"),
    ("--chunk_grad detached", "--chunk_grad: is read only with chunk_ctx set (--train_type infctx)"),
    ("--train_type infctx --chunk_grad cut", "--chunk_grad: must be one of through, detached (got 'cut')"),
    ("--peft lora --lora_config '{\"lora_r\":0}'", "--lora_config lora_r: must be ≥ 1"),
    ("--peft lora --lora_config '{\"rank\":8}'",
     "--lora_config rank: unknown key for lora (use r, lora_r, alpha, lora_alpha, dropout, lora_dropout, target_modules, lora_parts)"),
    ("--peft lora --lora_config '{\"lora_load\":\"old.pth\"}'",
     "--lora_config lora_load: starting from saved adapter weights is not supported (rerun with the same --name to resume)"),
    ("--peft lora --lora_config '{bad'", "argument --lora_config: not valid JSON (Expecting property name enclosed in double quotes at column 2): {bad"),
    ("--peft lora --pissa_config '{\"pissa_r\":8}'", "--pissa_config: given, but the method is lora"),
    ("--peft lora --lora_config '{\"lora_parts\":\"att,ln\"}'",
     "--lora_config lora_parts: 'ln' is not a module rwkvray adapts (use att.receptance, att.key, att.value, att.output, ffn.key, ffn.value, att or ffn)"),
    ("--quant fp8", "--quant: must be one of none, int8, nf4 (got 'fp8')"),
    ("--strategy fsdp", ("--strategy: unknown strategy 'fsdp' (use deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_2_offload, "
                         "deepspeed_stage_3, deepspeed_stage_3_offload, deepspeed or ddp)")),
    ("--precision 16-mixed", "--precision: must be one of bf16, fp16, fp32, tf32 (got '16-mixed')"),
    ("--lr_schedule linear", "--lr_schedule: must be one of cos_decay, wsd (got 'linear')"),
    ("--accelerator tpu", "--accelerator: 'tpu' is not supported (use gpu or cpu)"),
    ("--accelerator cpu --op cuda", "--op: cuda needs a GPU, but the run is on --accelerator cpu: use --op torch, or --accelerator gpu"),
    ("--devices 0", "--devices: must be ≥ 1 (got 0)"),
    ("--micro_bsz 0 --epoch_steps 0", "--epoch_steps: must be ≥ 1; --micro_bsz: must be ≥ 1"),
    ("--grad_cp 2", "--grad_cp: must be 0 or 1 (got 2)"),
    ("--beta2 1.5", "--beta2: must be < 1"),
    ("--n_layer 0", "--n_layer: must be ≥ 1"),
    ("--epoch_begin 3", "--epoch_begin: 3 is not supported: rwkvray resumes from its own checkpoints: rerun with the same --name instead"),
    ("--my_pile_stage 1", "--my_pile_stage: 1 is not supported: RWKV-LM pile pretraining stages are not supported"),
    ("--optim adam_mini", "--optim: 'adam_mini' is not supported: rwkvray uses AdamW"),
    ("--peft lora --train_parts time ln",
     "--train_parts: 'time' is not supported: RWKV-7 has no time_* parameters, so RWKV-PEFT trains nothing for it either (use ln, or drop it)"),
    ("--peft lora --train_parts emb", "--train_parts: 'emb' is not supported: training the embedding is full fine-tuning of it (use ln)"),
    ("--peft state --train_parts ln", "--train_parts: needs a weight method (method: lora, pissa or disha)"),
    ("--peft adalora", "--peft: 'adalora' is not supported: use --peft lora (AdaLoRA is LoRA whose ranks are pruned during training)"),
    ("--peft prefix", "--peft: 'prefix' is not supported: use --peft state (state tuning is RWKV's prefix tuning: a learned initial state)"),
    ("--peft lora --merge 2", "--merge: must be 0 or 1 (got 2)"),
    ("--peft bone --disha_config '{\"mode\":\"bat\",\"r\":8}' --merge 0",
     "--merge: false writes a Hugging Face peft folder, and peft has no form of DiSHA bat (its MiSS bat cuts the weight differently): use merge: true, or mode: bone"),
    ("--dataload get", "--dataload: 'get' is not supported (use pad or only; leave it out for every piece of every document)"),
    ("--loss_mask all", "--loss_mask: must be one of none, qa, se (got 'all')"),
    ("--data_type csv", "--data_type: must be one of jsonl, binidx, sft, utf-8, utf-16le, numpy, uint16, dummy (got 'csv')"),
    ("--dataload only --micro_bsz 2", "--dataload: only gives each sample its document's own length: needs a micro-batch of 1 (got 2); pad pads them into a batch"),
    ("--loss_mask se --mask_id '{\"mask0\": \"\"}'", "--mask_id mask0: must not be empty"),
    ("--sft_split test", "--sft_split: is read only by type: sft"),
    ("--data_type dummy", "--data_file: dummy data makes its own tokens: leave file out"),
    ("--dim_att 512 --n_embd 1024", "--dim_att: must be 0 or --n_embd (1024)"),
    ("--my_exit 1 --epoch_count 5", "--my_exit: would stop after epoch 1: set --epoch_count instead"),
]


@pytest.mark.parametrize("extra,expected", BAD_FLAGS, ids=[case[0] for case in BAD_FLAGS])
def test_bad_flags_give_one_line_errors(workdir, extra, expected):
    with pytest.raises(UserError) as caught:
        flags("--load_model model.pth --data_file chats.jsonl " + extra)
    assert str(caught.value) == "train flags: " + expected


def test_missing_and_unknown_files(workdir):
    with pytest.raises(UserError) as caught:
        flags("--data_file chats.jsonl")
    assert str(caught.value) == "train flags: --load_model: required"
    with pytest.raises(UserError) as caught:
        flags("--load_model nope.pth --data_file chats.jsonl")
    assert str(caught.value) == f"train flags: --load_model: file not found: {workdir / 'nope.pth'}"
    with pytest.raises(UserError) as caught:
        flags("--load_model model.pth --data_file notes.txt")  # RWKV-PEFT's default type: utf-8 text
    assert str(caught.value) == f"train flags: --data_file: file not found: {workdir / 'notes.txt'}"


def test_help_still_prints_help(capsys):
    with pytest.raises(SystemExit) as exited:
        build_train_parser().parse_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rwkvray train" in out and "--load_model" in out and "--lora_config" in out
