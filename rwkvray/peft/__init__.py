"""Parameter-efficient methods, one file each, behind the PeftMethod interface in base.py."""
from rwkvray.peft.base import PeftMethod, PeftModel
from rwkvray.peft.registry import build_peft

__all__ = ["PeftMethod", "PeftModel", "build_peft"]
