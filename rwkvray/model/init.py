"""Weights for a NEW RWKV-7 (x070) or RWKV-6 (x060) model, initialised as RWKV-LM's trainer does
(`generate_init_weight`, and for x060 the RWKV_Tmix_x060 / RWKV_CMix_x060 constructors).

A model built exactly like this is nearly an identity map: `att.output` and `ffn.value` are zero, so no layer
changes the residual stream and the WKV state (hence state tuning) cannot change the output at all.
`perturb > 0` adds Gaussian noise of that std to every zero-initialised matrix (att.output, ffn.value and the
w1/a1/v1/g1 LoRA inputs) so demos and tests get a non-trivial model; the rest of the init is unchanged.
"""
import contextlib
import math

import torch

from rwkvray.model.checkpoint import expected_shapes
from rwkvray.model.dims import ModelDimsX060, ModelDimsX070, RWKVDims
from rwkvray.errors import UserError

_MIX_EXPONENTS = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}
_PERTURBED = ("att.output.weight", "ffn.value.weight", "att.w1", "att.a1", "att.v1", "att.g1")
_PERTURBED_X060 = ("att.output.weight", "ffn.value.weight", "ffn.receptance.weight", "att.time_maa_w1",
                   "att.time_decay_w1")
VERSIONS = ("x070", "x060")


def default_dims(n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64) -> ModelDimsX070:
    """Dims of a new model, with the low-rank sizes of RWKV-LM's x070 trainer as of April-May 2025.

    Those formulas give the sizes of the released World/G1 models (64/64/32/128 at C=768, 96/96/64/256 at
    C=2048); RWKV-LM's later formulas (2.5/2.5/1.7/5 * sqrt(C)) give 128/128/64/224 at C=2048, so they are not used.
    """
    if n_layer < 1 or n_embd < 1 or vocab_size < 1 or head_size < 1:
        raise UserError(f"model sizes must be positive (n_layer={n_layer}, n_embd={n_embd}, "
                        f"vocab_size={vocab_size}, head_size={head_size})")
    if n_embd % head_size:
        raise UserError(f"n_embd {n_embd} is not a multiple of the head size {head_size}")
    return ModelDimsX070(
        n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
        dim_w=_lora_size(1.8 * n_embd ** 0.5),
        dim_a=_lora_size(1.8 * n_embd ** 0.5),
        dim_v=_lora_size(1.3 * n_embd ** 0.5),
        dim_g=_lora_size(0.6 * n_embd ** 0.8),
    )


def default_dims_x060(n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64) -> ModelDimsX060:
    """Dims of a new x060 model as RWKV-LM's trainer sets them: ffn 3.5*C rounded down to a multiple of 32,
    token-shift LoRA rank 32 and decay LoRA rank 64, both doubled at n_embd 4096 (the 7B)."""
    default_dims(n_layer, n_embd, vocab_size, head_size)  # the same size checks
    wide = 2 if n_embd >= 4096 else 1
    return ModelDimsX060(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
                         dim_ffn=int(n_embd * 3.5) // 32 * 32, dim_mix=32 * wide, dim_decay=64 * wide)


def init_weights(dims: RWKVDims, seed: int = 0, perturb: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every key of a BlinkDL x070 checkpoint (plus the unused blocks.0.att.v0/v1/v2 that RWKV-LM writes), or of
    an x060 one when `dims` is ModelDimsX060.

    Random draws come from one generator seeded with `seed`, in key order, so a seed gives the same weights,
    bit for bit, on any number of threads.
    RWKV-LM divides by L-1 for the w0 ramp; a one-layer model uses ratio 0 there.
    """
    generator = torch.Generator().manual_seed(seed)
    x060 = dims.version == "x060"
    shapes = expected_shapes(dims) if x060 else _shapes_with_layer0_values(dims)
    weights = {}
    for key, shape in shapes.items():
        weights[key] = _init_tensor(key, shape, dims, generator)
    if perturb > 0:
        for key, tensor in weights.items():
            if key.endswith(_PERTURBED_X060 if x060 else _PERTURBED):
                tensor.normal_(0.0, perturb, generator=generator)
    return {key: tensor.to(dtype) for key, tensor in weights.items()}


def _lora_size(target: float) -> int:
    return max(32, int(round(target / 32) * 32))


def _shapes_with_layer0_values(dims: ModelDimsX070) -> dict[str, tuple[int, ...]]:
    """expected_shapes plus blocks.0.att.v1/v2/v0, placed where RWKV-LM's state dict has them."""
    C = dims.n_embd
    shapes = {}
    for key, shape in expected_shapes(dims).items():
        if key == "blocks.0.att.g1":
            shapes.update({"blocks.0.att.v1": (C, dims.dim_v), "blocks.0.att.v2": (dims.dim_v, C),
                           "blocks.0.att.v0": (1, 1, C)})
        shapes[key] = shape
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], dims: ModelDimsX070, generator: torch.Generator) -> torch.Tensor:
    if key == "emb.weight":
        return torch.empty(shape).uniform_(-1e-4, 1e-4, generator=generator)
    if key == "head.weight":
        V, C = dims.vocab_size, dims.n_embd
        gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
        return _orthogonal(shape, gain, generator)
    if key.startswith("ln_out."):
        return _layer_norm(key, shape)
    layer = int(key.split(".")[1])
    name = key.split(".", 2)[2]
    block_tensor = _block_tensor_x060 if dims.version == "x060" else _block_tensor
    return block_tensor(name, layer, shape, dims, generator).reshape(shape)


def _block_tensor(name: str, layer: int, shape: tuple[int, ...], dims: ModelDimsX070,
                  generator: torch.Generator) -> torch.Tensor:
    C, L, N = dims.n_embd, dims.n_layer, dims.head_size
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    ratio_1_to_almost0 = 1.0 - layer / L
    ratio_0_to_1 = layer / (L - 1) if L > 1 else 0.0
    if name.startswith("att.x_"):
        return 1.0 - ddd ** (_MIX_EXPONENTS[name[4:]] * ratio_1_to_almost0)
    if name == "ffn.x_k":
        return 1.0 - ddd ** (ratio_1_to_almost0 ** 4)
    if name == "att.w0":
        return -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3) + 0.5 + 2.5 * zigzag
    if name == "att.a0":
        return -0.19 + 0.3 * zigzag + 0.4 * linear
    if name == "att.v0":
        return 0.73 - 0.4 * linear
    if name == "att.k_k":
        return 0.71 - 0.1 * linear
    if name == "att.k_a":
        return torch.full(shape, 1.02)
    if name == "att.r_k":
        return torch.full(shape, -0.04)
    if name in ("att.w1", "att.a1", "att.v1", "att.g1", "att.output.weight", "ffn.value.weight"):
        return torch.zeros(shape)
    if name in ("att.w2", "att.a2", "att.v2", "att.g2"):
        rows, cols = shape
        return _orthogonal(shape, 0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0), generator)
    if name in ("att.receptance.weight", "att.value.weight", "ffn.key.weight"):
        return _orthogonal(shape, 1.0, generator)
    if name == "att.key.weight":
        return _orthogonal(shape, 0.1, generator)
    if name == "att.ln_x.weight":
        return torch.full(shape, ((layer + 1) / L) ** 0.7)
    return _layer_norm(name, shape)


def _block_tensor_x060(name: str, layer: int, shape: tuple[int, ...], dims: ModelDimsX060,
                       generator: torch.Generator) -> torch.Tensor:
    C, L = dims.n_embd, dims.n_layer
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    ratio_1_to_almost0 = 1.0 - layer / L
    ratio_0_to_1 = layer / (L - 1) if L > 1 else 0.0
    if name in ("att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "ffn.time_maa_k", "ffn.time_maa_r"):
        return 1.0 - ddd ** ratio_1_to_almost0
    if name == "att.time_maa_v":
        return 1.0 - (ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
    if name in ("att.time_maa_r", "att.time_maa_g"):
        return 1.0 - ddd ** (0.5 * ratio_1_to_almost0)
    if name == "att.time_decay":
        return -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
    if name == "att.time_faaaa":
        return ratio_0_to_1 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
    if name in ("att.time_maa_w2", "att.time_decay_w2"):
        return torch.empty(shape).uniform_(-0.01, 0.01, generator=generator)
    if name in ("att.time_maa_w1", "att.time_decay_w1", "att.output.weight", "ffn.value.weight",
                "ffn.receptance.weight"):
        return torch.zeros(shape)
    if name in ("att.key.weight", "att.gate.weight"):
        return _orthogonal(shape, 0.1, generator)
    if name in ("att.receptance.weight", "att.value.weight", "ffn.key.weight"):
        return _orthogonal(shape, 1.0, generator)
    if name == "att.ln_x.weight":
        return torch.full(shape, ((layer + 1) / L) ** 0.7)
    return _layer_norm(name, shape)


def _layer_norm(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key.endswith("ln_x.bias") or key.endswith(("ln0.bias", "ln1.bias", "ln2.bias", "ln_out.bias")):
        return torch.zeros(shape)
    if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
        return torch.ones(shape)
    raise ValueError(f"no init rule for '{key}'")


def _orthogonal(shape: tuple[int, ...], gain: float, generator: torch.Generator) -> torch.Tensor:
    """The QR behind it sums in an order that depends on the number of threads (a Ray job's OMP_NUM_THREADS, a
    busy machine): one thread, in float64 and rounded once by the caller, gives the same weights every time."""
    with _one_thread():
        return torch.nn.init.orthogonal_(torch.empty(shape, dtype=torch.float64), gain=gain, generator=generator)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
