"""The token shift every RWKV version mixes with."""
import torch


def token_shift(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Previous token minus current token; `last` [B,C] is the token before x[:, 0]."""
    return torch.cat([last.unsqueeze(1), x[:, :-1]], 1) - x
