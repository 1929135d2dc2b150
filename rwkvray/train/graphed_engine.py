"""`trainer.cuda_graph: true`: the whole training step captured once in a CUDA graph and replayed.

At batch 1 a step is mostly kernel launches (hundreds per layer); a replay issues them all at once. The step is
forward from the tuned state, chunked cross-entropy, backward, gradient clipping and AdamW; the graph fixes
every shape and address, so batches are padded to [micro_bsz, ctx_len] (pads carry mask 0, which the loss
ignores) and copied into the captured input buffers. Capturing needs warm-up steps; their effect on the
trainable tensors and the optimizer is undone, so the run trains exactly as without the flag.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from rwkvray.errors import UserError

WARMUP_STEPS = 3  # cuBLAS handles, autotuning and lazy allocations settle before capture


class GraphedStep:
    """`step(*inputs) -> loss`: loss_fn, backward, clipping and the optimizer step, replayed from one graph."""

    def __init__(self, loss_fn, params, optimizer, example_inputs, grad_clip: float = 0.0):
        self.loss_fn, self.params, self.optimizer, self.grad_clip = loss_fn, params, optimizer, grad_clip
        self.inputs = [x.clone() for x in example_inputs]
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph allocates .grad in its pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        self._restore(saved)

    def __call__(self, *inputs) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.loss

    def _step(self) -> torch.Tensor:
        loss = self.loss_fn(*self.inputs)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def _snapshot(self) -> dict:
        with torch.no_grad():
            return {"params": [p.clone() for p in self.params],
                    "state": {(i, key): value.clone() for i, p in enumerate(self.params)
                              for key, value in self.optimizer.state.get(p, {}).items() if torch.is_tensor(value)}}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        """Back to before the warm-up; optimizer state first created by the warm-up goes back to zero."""
        for i, (p, value) in enumerate(zip(self.params, saved["params"])):
            p.copy_(value)
            for key, tensor in self.optimizer.state[p].items():
                if (i, key) in saved["state"]:
                    tensor.copy_(saved["state"][i, key])
                elif torch.is_tensor(tensor):
                    tensor.zero_()


class GraphedEngine:
    """The training loop's engine (forward, backward, step, set_lr, save/load) around a captured step: AdamW on
    the trainable tensors. `backward` and `step` have nothing left to do: the replay did both. Evaluation (grad
    disabled) runs eagerly, at any shape. DeepSpeed's step cannot be captured, so the spec allows this engine
    for one GPU worker only."""

    def __init__(self, module, optim_spec, micro_bsz: int, ctx_len: int, device: torch.device):
        if device.type != "cuda":
            raise UserError(f"trainer.cuda_graph: needs a CUDA device, this worker has {device.type}; "
                            f"set trainer.cuda_graph: false")
        self.module = module
        self.params = module.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=torch.tensor(optim_spec.lr_init, device=device),
                                           betas=tuple(optim_spec.betas), eps=optim_spec.eps,
                                           weight_decay=optim_spec.weight_decay, capturable=True)
        self.grad_clip = optim_spec.grad_clip
        self.shape = (micro_bsz, ctx_len)
        self.device = device
        self.captured = None

    def __call__(self, input_ids, targets, mask):
        if not torch.is_grad_enabled():
            return self.module(input_ids, targets, mask)
        batch = static_batch(self.shape, input_ids, targets, mask)
        if self.captured is None:
            self.captured = capture(self.module, self.params, self.optimizer, batch, self.grad_clip)
        return self.captured(*batch)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # a tensor the graph reads: a new float would not reach it

    def gathered(self):
        return contextlib.nullcontext()

    def save(self, folder: str):
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict()},
                   os.path.join(folder, "graphed_engine.pt"))

    def load(self, folder: str):
        saved = torch.load(os.path.join(folder, "graphed_engine.pt"), map_location="cpu", weights_only=True)
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        for group in self.optimizer.param_groups:  # load_state_dict may bring back a float lr
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
            group["capturable"] = True


def capture(loss_fn, params, optimizer, batch, grad_clip) -> GraphedStep:
    """GraphedStep, or one line saying why this step cannot be captured (say, a host sync in the model)."""
    try:
        return GraphedStep(loss_fn, params, optimizer, batch, grad_clip)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"trainer.cuda_graph: capturing the training step failed: {reason}; "
                        f"set trainer.cuda_graph: false") from error


def static_batch(shape: tuple[int, int], input_ids, targets, mask) -> list[torch.Tensor]:
    """The batch right-padded to the captured [micro_bsz, ctx_len]; pads are token 0 with mask 0."""
    rows, width = shape
    if input_ids.shape[0] != rows or input_ids.shape[1] > width:
        raise UserError(f"trainer.cuda_graph: the captured step takes {rows} rows of at most {width} tokens "
                        f"(trainer.micro_bsz x data.ctx_len), got a batch of {input_ids.shape[0]}x"
                        f"{input_ids.shape[1]}; set trainer.cuda_graph: false where shapes vary")
    pad = (0, width - input_ids.shape[1])
    return [F.pad(input_ids, pad), F.pad(targets, pad), F.pad(mask, pad)]
