"""Checkpoints that prove they are whole: each carries a manifest (rwkvray/files/manifest.py), and a worker resumes
from the newest checkpoint whose local copy matches its manifest, skipping damaged ones with one warning line.

Ray Train merges every rank's files into one checkpoint folder. Each rank hashes its own files; rank 0 gathers
the lists and, under Ray Train, writes the manifest into the stored checkpoint only after every rank's upload
has returned, so a manifest is the last file of a checkpoint. A Ray Tune trial is one worker uploading one
folder: its manifest travels inside it (an upload cut short still fails the size check).
"""
import posixpath

import torch

from rwkvray.errors import UserError
from rwkvray.files.manifest import MANIFEST, checkpoint_folders, local_entries, local_problem, manifest_bytes


def report_with_manifest(session, rank: int, metrics: dict, folder: str, manifest_last: bool) -> None:
    entries = _gather_entries(local_entries(folder))
    if not manifest_last and rank == 0:
        with open(posixpath.join(folder, MANIFEST), "wb") as f:
            f.write(manifest_bytes(entries))
    session.report(metrics, checkpoint=session.Checkpoint.from_directory(folder))
    if not manifest_last:
        return
    torch.distributed.barrier()  # every rank's report returned: its files are in storage
    if rank == 0:
        stored = session.get_checkpoint()  # Ray Train: the checkpoint just reported
        with stored.filesystem.open_output_stream(posixpath.join(stored.path, MANIFEST)) as f:
            f.write(manifest_bytes(entries))
    torch.distributed.barrier()  # no rank reports again (Ray may then delete old ones) before the manifest is in


def resume_from_intact(session, rank: int, load) -> None:
    """Load the newest intact checkpoint at or before the one Ray hands this worker (nothing when it hands none)."""
    latest = session.get_checkpoint()
    if not latest:
        return
    parent, name = posixpath.split(latest.path.rstrip("/"))
    names = checkpoint_folders(latest.filesystem, parent)
    older = names[names.index(name) + 1:] if name in names else []
    for candidate in [latest, *(session.Checkpoint(posixpath.join(parent, n), latest.filesystem) for n in older)]:
        with candidate.as_directory() as folder:
            problem = local_problem(folder)
            if problem is None:
                load(folder)
                return
        if rank == 0:
            print(f"warning: skipping damaged checkpoint {candidate.path}: {problem}", flush=True)
    raise UserError(f"no intact checkpoint in {parent}; rerun with a new run.name to start over")


def _gather_entries(entries: dict[str, dict]) -> dict[str, dict]:
    """Every rank's file entries, merged (ranks write distinct files, or the same file with the same bytes)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return entries
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, entries)
    return {name: entry for rank_entries in gathered for name, entry in rank_entries.items()}
