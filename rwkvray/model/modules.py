"""Module surgery shared by quantization (model/quant.py) and the PEFT methods that swap a Linear for their own."""
import torch.nn as nn


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the dotted `name` ("blocks.0.att.key") is inside `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)
