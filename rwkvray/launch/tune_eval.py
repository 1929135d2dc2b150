"""An eval metric in a sweep: a one-worker trial scores its current state on the spec's eval data at every
report, so ASHA, the trial table and best.json rank trials by it (`tune.metric: eval/<file>/<metric>`)."""
import asyncio
import os

import torch

from rwkvray.eval.metrics import summarize
from rwkvray.eval.job import read_all_items
from rwkvray.eval.scoring import evaluate
from rwkvray.files.cache import local_copy
from rwkvray.model.rwkv import load_model
from rwkvray.model.state_file import load_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.engine.batch_engine import BatchEngine
from rwkvray.text.tokenizer import get_tokenizer
from rwkvray.train.loop import WorkerContext

TRIAL_STATE = "trial"


def eval_key(data: str, metric: str) -> str:
    return f"eval/{data}/{metric}"


class EvalReportingContext(WorkerContext):
    """The trial's context, whose reports carry eval/<file>/<metric> of the state in the reported checkpoint."""

    def __init__(self, ctx: WorkerContext, spec):
        super().__init__(ctx.session, ctx.rank, ctx.world_size, ctx.device, ctx.manifest_last)
        self.tokenizer = get_tokenizer()
        self.items = read_all_items(spec.eval.data, self.tokenizer)
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        self.model = load_model(local_copy(spec.model.path), ctx.device, dtype, op="auto")[0]
        self.options = spec.eval

    def report(self, metrics: dict, checkpoint_dir: str) -> None:
        tuned = load_state(os.path.join(checkpoint_dir, "state.pth"), self.model.dims)
        records = asyncio.run(self.score(tuned))
        for row in summarize(records):
            metrics[eval_key(row["data"], row["metric"])] = row["value"]
        super().report(metrics, checkpoint_dir)

    async def score(self, tuned: TunedState):
        engine = BatchEngine(self.model, self.tokenizer, max_batch_size=self.options.batch_size)
        try:
            return await evaluate(engine, self.items, {TRIAL_STATE: tuned}, self.options.max_tokens,
                                  self.options.batch_size)
        finally:
            engine.worker.shutdown()
