"""What each saved epoch writes beside the adapter files, as RWKV-PEFT does, from the files' tensors alone.

- PiSSA: `init_pissa.pth`, the initial A and B under RWKV-PEFT's `model.`-prefixed keys, which its merge scripts
  read (`merge.py --type pissa --lora_init init_pissa.pth`).
- `peft.merge: true` (`--merge 1`, RWKV-PEFT's default): the merged full model `rwkv-<n>.pth`, in the base's dtypes
  under BlinkDL keys; with a tuned state too, the state is merged into it as `blocks.<i>.att.time_state` keys
  (that file then takes the place of the state-only `rwkv-<n>.pth`).
- `peft.merge: false` (`--merge 0`): the Hugging Face peft folder (rwkvray.peft.hf_folder), which RWKV-PEFT names
  `<proj_dir>-adapter/`.
A state-only run writes its state file only.

The functions take tensors, not a model, so the process that writes epoch files needs no model of its own.
"""
import os
from collections.abc import Callable

import torch

from rwkvray.model.checkpoint import infer_dims, read_tensor_dict, save_checkpoint
from rwkvray.peft.merge import INIT_PREFIX, merged_weights

WEIGHT_METHODS = ("lora", "pissa", "disha")


def write_epoch_outputs(peft_spec, base_path: str, out_dir: str, adapter_dir: str,
                        files: dict[str, dict[str, torch.Tensor]], epoch: int,
                        note: Callable[[str], None] = print) -> None:
    """Files go to `out_dir`, the peft folder to `adapter_dir`. `files`: each method's adapter-file tensors by
    method name (PeftMethod.file_tensors)."""
    kind = peft_spec.method
    if kind not in WEIGHT_METHODS:
        return
    adapter = files[kind]
    if kind == "pissa":
        path = os.path.join(out_dir, "init_pissa.pth")
        write_init_pissa(path, adapter)
        note(f"saved {path}")
    if peft_spec.merge:
        path = os.path.join(out_dir, f"rwkv-{epoch}.pth")
        write_merged_model(path, base_path, kind, adapter, files.get("state"))
    else:
        path = adapter_dir
        write_adapter_folder_for(path, base_path, kind, adapter, peft_spec, note)
    note(f"saved {path}")


def write_init_pissa(path: str, adapter: dict[str, torch.Tensor]) -> None:
    save_checkpoint({INIT_PREFIX + key: value for key, value in adapter.items() if ".init_lora_" in key}, path)


def write_merged_model(path: str, base_path: str, kind: str, adapter: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor] | None = None) -> None:
    """base + adapter (+ the state's time_state keys) as one full checkpoint, each weight in its base dtype."""
    merged, _ = merged_weights(kind, read_tensor_dict(base_path), adapter, "the adapter", base_path, None)
    save_checkpoint({**merged, **(state or {})}, path)


def write_adapter_folder_for(folder: str, base_path: str, kind: str, adapter: dict[str, torch.Tensor],
                             peft_spec, note: Callable[[str], None] = print) -> None:
    from rwkvray.peft.hf_folder import write_adapter_folder
    dims = infer_dims(read_tensor_dict(base_path))
    norms = [key for key in adapter if key.endswith((".weight", ".bias"))]
    if norms:  # peft folders have no place for them: say so instead of dropping them silently
        note(f"note: {folder} leaves out the {len(norms)} LayerNorm tensors of --train_parts ln; "
              "they are in the adapter file")
    dropout = peft_spec.lora.dropout if kind == "lora" else 0.0
    write_adapter_folder(folder, kind, {k: v for k, v in adapter.items() if k not in norms}, dims, dropout)


def older_merge_command(kind: str, base_path: str, adapter_path: str, out_path: str,
                        adapter: dict[str, torch.Tensor]) -> str:
    """The command of RWKV-PEFT's older merge scripts for this adapter file. Those scripts ignore the file's
    `lora_alpha` and take it from the command line (merge.py: integers only, default 16), so it is spelled out."""
    if kind == "disha":
        return (f"python merge/merge_disha.py --base_model {base_path} --peft_checkpoint {adapter_path} "
                f"--output {out_path}")
    if kind == "pissa":
        init = os.path.join(os.path.dirname(adapter_path), "init_pissa.pth")
        return (f"python merge/merge.py --type pissa --base_model {base_path} --lora_init {init} "
                f"--lora_checkpoint {adapter_path} --output {out_path}")
    alpha = adapter["lora_alpha"].item()
    if alpha.is_integer():
        return (f"python merge/merge.py --type lora --base_model {base_path} --lora_checkpoint {adapter_path} "
                f"--output {out_path} --lora_alpha {int(alpha)}")
    return f"python merge/merge_lora.py {alpha:g} {base_path} {adapter_path} {out_path}"  # merge_lora.py takes a float


def print_merge_commands(spec, adapter_path: str) -> None:
    """After training: how to merge the final adapter, with rwkvray and with RWKV-PEFT's older scripts."""
    kind = spec.peft.method
    if kind not in WEIGHT_METHODS:
        return
    out_path = os.path.join(os.path.dirname(adapter_path), "merged.pth")
    print(f"merge it: rwkvray merge --base {spec.model.path} --adapter {adapter_path} --out {out_path}")
    older = older_merge_command(kind, spec.model.path, adapter_path, out_path, read_tensor_dict(adapter_path))
    print(f"or with RWKV-PEFT's older scripts: {older}")
