"""bf16 training on CPU, as real runs use it: DeepSpeed without ZeRO and with ZeRO-1/2/3 on gloo, in a
child process (a world of one). The frozen base is bf16, the optimizer updates fp32 masters, and the loss falls."""
import os

import pytest
import torch

from rwkvray.spec import spec_from_dict
from rwkvray.train.data import TokenBatcher, load_documents
from tests.helpers import engine_steps

pytest.importorskip("deepspeed")
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


def bf16_spec(model_path, stage, method, lr):
    return spec_from_dict({
        "model": {"path": model_path},
        "data": {"file": SAMPLE, "ctx_len": 32, "loss_mask": "qa"},
        "peft": {"method": method},
        "optim": {"lr_init": lr, "lr_final": lr},
        "trainer": {"precision": "bf16", "op": "torch", "micro_bsz": 2},
        "deepspeed": {"stage": stage},
    }, "test")


@pytest.mark.parametrize("method", ["state", "lora"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_keeps_fp32_masters_and_lowers_loss(deepspeed_world, make_tiny_model, stage, method):
    deepspeed_world.submit(check_bf16_training, make_tiny_model(1, 128), stage, method).result()


def check_bf16_training(model_path: str, stage: int, method: str) -> None:
    """In the `deepspeed_world` child: eight bf16 steps of the worker loop's engine."""
    from rwkvray.train.loop import WorkerContext, _build_engine, _build_module
    spec = bf16_spec(model_path, stage, method, lr=0.05 if method == "state" else 0.01)
    quiet_rank = WorkerContext(session=None, rank=1, world_size=1, device=torch.device("cpu"))  # rank 1: no log line
    engine = _build_engine(spec, _build_module(spec, quiet_rank.device), quiet_rank)
    base = engine.module.base
    frozen = [p for p in base.parameters() if not p.requires_grad]
    assert frozen and all(getattr(p, "ds_tensor", p).dtype == torch.bfloat16 for p in frozen)

    batch = TokenBatcher(load_documents(SAMPLE, "jsonl", "qa"), 32, seed=0).batch(0, 0, 1, 2)
    losses = engine_steps(engine, batch, 8)
    assert losses[-1] < losses[0] - 0.2, losses
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the AdamW that DeepSpeed wraps
    masters = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 swaps them in per step
               or [p for group in inner.param_groups for p in group["params"]])
    assert masters and all(p.dtype == torch.float32 for p in masters)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.trainable_parameters())
    assert sum(p.numel() for p in masters) == trainable
