"""The spec's input files as local files on this node: a URI resolves through the node's download cache
(rwkvray/files/cache.py), so the workers of a cluster without a shared disk read the same model and data."""
from rwkvray.files.cache import local_copy, local_prefix


def local_inputs(spec):
    """The spec with model.path, data.file and data.eval_file local (each URI downloaded once per node)."""
    data = spec.data

    def local_data(path: str | None) -> str | None:
        if path is None:
            return None
        return local_prefix(path) if data.type == "binidx" else local_copy(path)

    return spec.model_copy(update={
        "model": spec.model.model_copy(update={"path": local_copy(spec.model.path)}),
        "data": data.model_copy(update={"file": local_data(data.file), "eval_file": local_data(data.eval_file)}),
    })
