"""rwkvray: state tuning of RWKV-7 models on Ray."""
__version__ = "0.1.0"
