import pytest

from rwkvray.checkpoint import save_checkpoint
from rwkvray.init_model import default_dims, init_weights

pytest_plugins = ["tests.triton_interp"]  # the Triton interpreter for FLA's kernels when there is no GPU


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """A checkpoint file of a tiny full-vocab model (RWKV-LM init, perturbed so a state can change its output)."""
    made = {}

    def make(n_layer: int, n_embd: int) -> str:
        if (n_layer, n_embd) not in made:
            path = str(tmp_path_factory.mktemp("model") / f"tiny-{n_layer}x{n_embd}.pth")
            save_checkpoint(init_weights(default_dims(n_layer, n_embd), seed=0, perturb=0.2), path)
            made[n_layer, n_embd] = path
        return made[n_layer, n_embd]

    return make
