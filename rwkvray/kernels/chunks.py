"""The chunk layout both chunked torch kernels (wkv7_torch.py, wkv6_torch.py) compute in."""


def chunks(x, size):
    """[B,T,H,N] -> [B,H,T/size,size,N]"""
    B, T, H, N = x.shape
    return x.view(B, T // size, size, H, N).permute(0, 3, 1, 2, 4)
