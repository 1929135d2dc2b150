"""Every PEFT method by its spec name (`peft.method`), and building the spec's methods on a base model."""
from rwkvray.model.long_context import Chunking
from rwkvray.model.rwkv import RWKV
from rwkvray.peft.base import PeftMethod, PeftModel
from rwkvray.peft.disha import Disha
from rwkvray.peft.lora import LoRA
from rwkvray.peft.pissa import PiSSA
from rwkvray.peft.state import StateTuning
from rwkvray.peft.train_parts import NORM_PART, train_norms

METHODS: dict[str, type[PeftMethod]] = {"state": StateTuning, "lora": LoRA, "pissa": PiSSA, "disha": Disha}


def method_classes(peft_spec) -> list[type[PeftMethod]]:
    """The spec's `method`, plus state tuning when `combine_state` is set."""
    names = [peft_spec.method] + (["state"] if peft_spec.combine_state and peft_spec.method != "state" else [])
    return [METHODS[name] for name in names]


def build_peft(base: RWKV, peft_spec, chunking: Chunking | None = None) -> PeftModel:
    """The spec's methods on `base`; `chunking`: long sequences in chunks (trainer.chunk_ctx)."""
    trained_norms = train_norms(base) if NORM_PART in peft_spec.train_parts else []
    save_dtype = base.emb.weight.dtype  # adapter files are in the training precision
    # the first method (the weight method when there is one) carries the trained norms in its file
    methods = [cls.from_spec(base, peft_spec, save_dtype=save_dtype, trained_norms=trained_norms if i == 0 else [])
               for i, cls in enumerate(method_classes(peft_spec))]
    model = PeftModel(base, methods, chunking)
    if peft_spec.quant != "none":  # after the methods: PiSSA must take its SVD of the full-precision weights
        from rwkvray.model.quant import quantize_frozen_linears
        quantize_frozen_linears(base, peft_spec.quant)
    return model
