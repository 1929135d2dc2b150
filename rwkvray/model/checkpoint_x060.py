"""The layout of a BlinkDL RWKV-6 (x060) checkpoint: its dims read from the tensors and every key's shape.

rwkvray/model/checkpoint.py tells the versions apart by their keys (an `att.time_maa` key means x060, as the rwkv
package decides) and does the loading and checking for both.
"""
from rwkvray.model.dims import ModelDimsX060
from rwkvray.errors import UserError

VERSION_KEY = "att.time_maa"
MIXES = 5  # time_maa_w1 / time_maa_w2 hold one low-rank map each for w, k, v, r, g


def is_x060(weights: dict) -> bool:
    return any(VERSION_KEY in key for key in weights)


def infer_dims_x060(weights: dict, n_layer: int, shape_of) -> ModelDimsX060:
    """H, N from `blocks.0.att.time_faaaa`; V, C from `emb.weight`; the ffn size from `blocks.0.ffn.key.weight`;
    the token-shift LoRA rank from `time_maa_w2` [5, D, C] and the decay LoRA rank from `time_decay_w1`."""
    vocab_size, n_embd = shape_of("emb.weight", 2)
    n_head, head_size = shape_of("blocks.0.att.time_faaaa", 2)
    if n_head * head_size != n_embd:
        raise UserError(f"key 'blocks.0.att.time_faaaa' has shape [{n_head}, {head_size}] but H*N must equal "
                        f"the embedding size {n_embd} of 'emb.weight'")
    mixes, dim_mix, _ = shape_of("blocks.0.att.time_maa_w2", 3)
    if mixes != MIXES:
        raise UserError(f"key 'blocks.0.att.time_maa_w2' has {mixes} mixes, expected {MIXES} (w, k, v, r, g): "
                        "not a plain RWKV-6 (x060) model")
    return ModelDimsX060(
        n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
        dim_ffn=shape_of("blocks.0.ffn.key.weight", 2)[0],
        dim_mix=dim_mix,
        dim_decay=shape_of("blocks.0.att.time_decay_w1", 2)[1],
    )


def block_shapes_x060(i: int, dims: ModelDimsX060) -> dict[str, tuple[int, ...]]:
    """One block's keys in RWKV-LM's state-dict order (ln1, ln2, ln0, then att and ffn)."""
    C, H, N, F = dims.n_embd, dims.n_head, dims.head_size, dims.dim_ffn
    vec = (1, 1, C)
    b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
    shapes = {b + "ln1.weight": (C,), b + "ln1.bias": (C,), b + "ln2.weight": (C,), b + "ln2.bias": (C,)}
    if i == 0:
        shapes.update({b + "ln0.weight": (C,), b + "ln0.bias": (C,)})
    for name in ("x", "w", "k", "v", "r", "g"):
        shapes[f"{att}time_maa_{name}"] = vec
    shapes.update({att + "time_maa_w1": (C, MIXES * dims.dim_mix), att + "time_maa_w2": (MIXES, dims.dim_mix, C),
                   att + "time_decay": vec,
                   att + "time_decay_w1": (C, dims.dim_decay), att + "time_decay_w2": (dims.dim_decay, C),
                   att + "time_faaaa": (H, N)})
    for name in ("receptance", "key", "value", "output", "gate"):
        shapes[f"{att}{name}.weight"] = (C, C)
    shapes.update({att + "ln_x.weight": (C,), att + "ln_x.bias": (C,),
                   ffn + "time_maa_k": vec, ffn + "time_maa_r": vec,
                   ffn + "key.weight": (F, C), ffn + "receptance.weight": (C, C), ffn + "value.weight": (C, F)})
    return shapes
