"""`trainer.cuda_graph`: refused in the spec where it cannot work; on a GPU, replays train exactly as eager steps."""
import pytest
import torch

from rwkvray.spec import OptimConfig, PeftConfig
from rwkvray.errors import UserError
from rwkvray.train.graphed_engine import GraphedEngine, static_batch
from tests.test_config import GPU, MD, load_text



@pytest.mark.parametrize("text,expected", [
    (MD + "trainer: {cuda_graph: true}\n",
     "trainer.cuda_graph: needs a GPU (set scaling.use_gpu: true, or cuda_graph: false)"),
    (MD + GPU + "trainer: {cuda_graph: true, grad_accum: 4}\n",
     "trainer.cuda_graph: captures one optimizer step per micro-batch: needs trainer.grad_accum: 1 (got 4); "
     "raise micro_bsz instead"),
    (MD + "scaling: {use_gpu: true, num_workers: 2}\ntrainer: {cuda_graph: true}\n",
     "trainer.cuda_graph: needs scaling.num_workers: 1 (DeepSpeed's step across 2 workers cannot be captured)"),
    (MD + GPU + "deepspeed: {stage: 2, offload: true}\ntrainer: {cuda_graph: true}\n",
     "trainer.cuda_graph: runs its own captured AdamW step, which one worker's ZeRO stage 0/1 equals; it cannot "
     "honour deepspeed stage 2/3 or offload (got stage 2, offload)"),
], ids=["cpu", "grad-accum", "workers", "zero-2-offload"])
def test_cuda_graph_is_refused_in_the_spec_where_it_cannot_work(workdir, text, expected):
    with pytest.raises(UserError) as error:
        load_text(text, workdir)
    assert str(error.value) == f"{workdir / 'job.yaml'}: {expected}"


def test_cuda_graph_on_a_gpu_spec_is_accepted(workdir):
    assert load_text(MD + GPU + "trainer: {cuda_graph: true}\n", workdir).trainer.cuda_graph is True


def test_graphed_engine_refuses_a_cpu_worker():
    with pytest.raises(UserError) as error:
        GraphedEngine(torch.nn.Linear(2, 2), OptimConfig(), 1, 8, torch.device("cpu"))
    assert str(error.value) == ("trainer.cuda_graph: needs a CUDA device, this worker has cpu; "
                                "set trainer.cuda_graph: false")


def test_batches_are_padded_to_the_captured_shape_and_other_shapes_refused():
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    padded = static_batch((2, 5), ids, ids + 1, mask)
    assert padded[0].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]]
    assert padded[1][:, 3:].eq(0).all() and padded[2].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    with pytest.raises(UserError) as error:
        static_batch((1, 5), ids, ids, mask)
    assert str(error.value) == ("trainer.cuda_graph: the captured step takes 1 rows of at most 5 tokens "
                                "(trainer.micro_bsz x data.ctx_len), got a batch of 2x3; "
                                "set trainer.cuda_graph: false where shapes vary")


class EagerAdamW:
    """The same step without a graph: the reference for the replayed one."""

    def __init__(self, module, optim):
        self.module, self.params = module, module.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr_init, betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.grad_clip = optim.grad_clip

    def __call__(self, *batch):
        return self.module(*batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr


@pytest.mark.gpu
def test_replayed_steps_train_exactly_as_eager_steps():
    """Same losses and the same tuned state after a few steps, batches of varying width included."""
    from rwkvray.peft import build_peft
    from tests.helpers import TINY, random_model

    optim = OptimConfig(lr_init=1e-2, lr_final=1e-3, grad_clip=1.0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for width in (24, 17, 24):
        ids = torch.randint(0, TINY.vocab_size, (2, width + 1), generator=g).cuda()
        batches.append((ids[:, :-1], ids[:, 1:], torch.ones(2, width, device="cuda")))
    results = []
    for graphed in (False, True):
        model = build_peft(random_model().cuda(), PeftConfig(method="state"))
        engine = (GraphedEngine(model, optim, 2, 24, torch.device("cuda")) if graphed
                  else EagerAdamW(model, optim))
        losses = []
        for step, batch in enumerate(batches):
            engine.set_lr(1e-2 / (step + 1))
            loss = engine(*batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with torch.no_grad():
            eval_loss = engine(*batches[1]).item()  # eager, at its own width
        results.append((losses, eval_loss, [p.detach().clone() for p in engine.params]))
    (eager_losses, eager_eval, eager_params), (losses, eval_loss, params) = results
    assert losses == pytest.approx(eager_losses, rel=1e-5) and eval_loss == pytest.approx(eager_eval, rel=1e-5)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
