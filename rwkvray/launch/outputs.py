"""The driver's side of a run's outputs: everything it writes comes from run storage, never a worker's disk.

Workers leave epoch files, their cards and metrics.jsonl in `storage_path/name`; the last checkpoint holds
the final trainable tensors. The driver adds the final files, their cards and loss.png there, then copies
every user-facing file into `trainer.proj_dir` on its own disk.
"""
import os
import re

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.files.atomic import write_bytes_atomically
from rwkvray.files.publish import different_state_there, publish_state, refusal
from rwkvray.train.metrics import loss_plot_png, read_metrics, summarize
from rwkvray.peft.registry import method_classes
from rwkvray.peft.epoch_outputs import print_merge_commands
from rwkvray.model.state_card import card_bytes

USER_FILE = re.compile(r"[a-z]+-(\d+|final)\.(pth|json)|init_pissa\.pth|metrics\.jsonl|loss\.png")
ADAPTER_FOLDER = "adapter"  # the peft folder of `peft.merge: false`; RWKV-PEFT keeps it as <proj_dir>-adapter/


def export_outputs(spec, checkpoint) -> str:
    """Write the final files and loss.png to run storage, keep a local copy, print where; returns the local
    path of the first method's final file (rwkv-final.pth for state tuning)."""
    from rwkvray.train.loop import state_card
    run = storage.run_dir(spec)
    rows = read_metrics(storage.join(run, "metrics.jsonl"))
    last = {"step": rows[-1]["step"], "loss": rows[-1]["loss"]} if rows else {}
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if val:
        last["val_loss"] = val[-1]
    finals = []
    with checkpoint.as_directory() as folder:
        for cls in method_classes(spec.peft):
            name = f"{cls.file_prefix}-final"
            with open(os.path.join(folder, f"{cls.name}.pth"), "rb") as f:
                storage.write_bytes(storage.join(run, name + ".pth"), f.read())
            storage.write_bytes(storage.join(run, name + ".json"), card_bytes(state_card(spec, None, cls.name, last)))
            finals.append((cls.name, name + ".pth"))
    if rows:
        storage.write_bytes(storage.join(run, "loss.png"), loss_plot_png(rows))
        print(summarize(rows))
    local = copy_to_proj_dir(spec, run)
    for method, filename in finals:
        print(f"final {method} file: {os.path.join(local, filename)}")
    print_merge_commands(spec, os.path.join(local, finals[0][1]))
    return os.path.join(local, finals[0][1])


def copy_to_proj_dir(spec, run: str) -> str:
    """Copy the user-facing files of run storage into trainer.proj_dir (already there when it is the same folder),
    and the peft folder to <proj_dir>-adapter/, where RWKV-PEFT users look for it."""
    local = spec.trainer.proj_dir
    if storage.is_uri(run) or os.path.abspath(local) != os.path.abspath(run):
        for name in storage.list_files(run):
            if USER_FILE.fullmatch(name):
                write_bytes_atomically(os.path.join(local, name), storage.read_bytes(storage.join(run, name)))
    adapter = storage.join(run, ADAPTER_FOLDER)
    for name in storage.list_files(adapter):
        write_bytes_atomically(os.path.join(f"{local.rstrip(os.sep)}-adapter", name),
                               storage.read_bytes(storage.join(adapter, name)))
    return local


REPLACE_HINT = "set run.publish.replace: true"


def check_publishable(spec) -> None:
    """Before a run trains: refuse at once when its state could not be published: a bucket that does not answer,
    or another state under the name that only replace may overwrite."""
    publish = spec.run.publish
    problem = publish and storage.is_uri(publish.states_dir) and storage.unreachable(publish.states_dir)
    if problem:
        raise UserError(f"{spec.source}: run.publish.states_dir: cannot use {publish.states_dir}: {problem}")
    if publish and not publish.replace and different_state_there(publish.states_dir, publish.name):
        raise UserError(f"{spec.source}: run.publish: {refusal(publish.states_dir, publish.name, REPLACE_HINT)}")


def publish_final(spec) -> None:
    """Put the run's final state and its card into run.publish.states_dir under run.publish.name, if asked."""
    publish = spec.run.publish
    if publish is None:
        return
    run = storage.run_dir(spec)
    final = f"{method_classes(spec.peft)[0].file_prefix}-final"
    state = storage.read_bytes(storage.join(run, final + ".pth"))
    card = storage.read_bytes(storage.join(run, final + ".json"))
    try:
        print(publish_state(state, card, publish.states_dir, publish.name, publish.replace, REPLACE_HINT))
    except UserError as err:
        raise UserError(f"{spec.source}: run.publish: {err}") from None
