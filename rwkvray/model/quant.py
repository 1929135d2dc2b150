"""A quantized frozen base (QLoRA style): the block Linears become bitsandbytes int8 or nf4 layers.

`int8` is LLM.int8 (Linear8bitLt, outlier threshold 6.0); `nf4` is Linear4bit with double-quantized statistics.
The weights are stored quantized and every forward runs bitsandbytes' own matmul (its CUDA kernels on a GPU, its
CPU backend on a CPU); nothing dequantizes a whole weight per step, except DiSHA's bat mode, which needs W itself.
The head, the embedding and the small matrices stay in the model's dtype.
"""
import re

import torch
import torch.nn as nn

from rwkvray.errors import UserError
from rwkvray.model.modules import replace_module

QUANT_KINDS = ("int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, as transformers uses it
# The block Linears (six in x070; x060 adds att.gate and ffn.receptance), also as the frozen `base_layer` inside
# an adapter layer.
_BLOCK_LINEAR = re.compile(
    r"^blocks\.\d+\.(att\.(receptance|key|value|output|gate)|ffn\.(key|value|receptance))(\.base_layer)?$")


def import_bitsandbytes(kind: str):
    try:
        import bitsandbytes
    except ModuleNotFoundError:
        raise UserError(f"peft.quant: {kind} needs bitsandbytes, which is not installed "
                        "(pip install bitsandbytes)") from None
    except ImportError as err:
        raise UserError(f"peft.quant: {kind} needs bitsandbytes, which cannot be imported: {err}") from None
    return bitsandbytes


def quantize_frozen_linears(model: nn.Module, kind: str) -> list[str]:
    """Replace every frozen block Linear of `model` (an RWKV) by a bitsandbytes layer; returns their names."""
    if kind not in QUANT_KINDS:
        raise UserError(f"peft.quant: unknown kind {kind!r} (expected none, int8 or nf4)")
    bnb = import_bitsandbytes(kind)
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and _BLOCK_LINEAR.match(name)]
    for name in names:
        replace_module(model, name, quantized_linear(bnb, model.get_submodule(name), kind))
    return names


def quantized_linear(bnb, linear: nn.Linear, kind: str) -> nn.Module:
    """The same map, stored by bitsandbytes on the Linear's device (bitsandbytes quantizes when a layer moves)."""
    weight = linear.weight.detach()
    shape = (linear.in_features, linear.out_features)
    # The weight goes through the CPU: Int8Params quantizes only when it leaves the CPU (or is moved to it).
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(*shape, bias=False, compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(*shape, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    try:
        layer = layer.to(weight.device)
        with torch.no_grad():  # fail here, in one line, if the backend cannot run it
            layer(torch.zeros(1, linear.in_features, device=weight.device, dtype=weight.dtype))
    except (RuntimeError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"peft.quant: bitsandbytes {bnb.__version__} cannot run {kind} on "
                        f"{weight.device.type}: {reason}") from None
    return layer


def frozen_weight(layer: nn.Module) -> torch.Tensor:
    """A frozen Linear's weight [out, in] as a dense tensor: dequantized if bitsandbytes stores it."""
    if type(layer) is nn.Linear:
        return layer.weight
    import bitsandbytes
    if isinstance(layer, bitsandbytes.nn.Linear4bit):
        return bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # int8 rows with one absmax scale per row; the first forward moves the scales into the layer's state
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bitsandbytes.functional.int8_vectorwise_dequant(layer.weight.data, scales)
