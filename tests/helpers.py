"""Tiny random models for tests (no weights can be downloaded)."""
import torch

from rwkvray.checkpoint import save_checkpoint
from rwkvray.dims import ModelDims, ModelDimsX060
from rwkvray.model import RWKV7
from rwkvray.model_x060 import RWKV6

TINY = ModelDims(n_layer=2, n_embd=128, head_size=64, vocab_size=300, dim_w=8, dim_a=8, dim_v=4, dim_g=16)


def random_model(dims: ModelDims = TINY, seed: int = 0, dtype=torch.float32) -> RWKV7:
    """Every parameter random, so every path (decay, value residual, gates, bonus) is exercised."""
    torch.manual_seed(seed)
    model = RWKV7(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return model.to(dtype).eval()


def train_steps(model, batch, steps: int) -> list[float]:
    """A few AdamW steps of a PeftModel on one fixed batch; the losses."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


TINY_X060 = ModelDimsX060(n_layer=2, n_embd=128, head_size=64, vocab_size=300, dim_ffn=448, dim_mix=8, dim_decay=16)


def random_model_x060(dims: ModelDimsX060 = TINY_X060, seed: int = 0, dtype=torch.float32) -> RWKV6:
    """Every parameter random; the decay spans from almost 1 to almost 0, as in trained RWKV-6 models."""
    torch.manual_seed(seed)
    model = RWKV6(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("time_decay"):
                p.copy_(torch.linspace(-7, 2, p.shape[-1]).view_as(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return model.to(dtype).eval()


PEFT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
PEFT_CONFIGS = {
    "lora": {"method": "lora", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}},
    "pissa": {"method": "pissa", "pissa": {"r": 4, "svd_niter": 2}},
    "bone": {"method": "disha", "disha": {"mode": "bone", "r": 16}},
    "bat": {"method": "disha", "disha": {"mode": "bat", "r": 16}},
}


def saved_base(tmp_path_factory, model, name: str = "base.pth") -> str:
    """The model's weights as a checkpoint file in a fresh directory; its path."""
    path = str(tmp_path_factory.mktemp("base") / name)
    save_checkpoint(model.state_dict(), path)
    return path


def token_batch(vocab_size: int):
    """One fixed batch of 2 sequences of 32 tokens: inputs, targets, mask."""
    ids = torch.randint(0, vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:], torch.ones(2, 32)
