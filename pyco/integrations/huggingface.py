"""A Hugging Face ``transformers.Trainer`` callback that records the exact decomposition of every N-th step.

    from pyco.integrations.huggingface import PycoCallback
    opt = pyco.optim.AdamW(model.parameters(), lr=3e-4)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[PycoCallback(every=50)])
    trainer.train()                      # then: pyco plot <output_dir>/pyco

The step is split on the batch it was computed from: the callback keeps the inputs of the model's last
training forward call and re-evaluates ``model(**inputs).loss`` (the model must return a loss, i.e. the
batches carry labels). With gradient accumulation that is the last micro-batch of the step. Training is
unchanged: the parameters are restored bitwise after each recording, and gradients and optimizer state are
not touched.
"""

from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
except ImportError as exc:  # an optional extra
    raise ImportError("pyco.integrations.huggingface needs transformers: pip install 'pyco[huggingface]'") from exc

from pyco.blocks import by_module
from pyco.probe.monitor import Monitor


class PycoCallback(TrainerCallback):
    """Records every ``every``-th optimizer step with :class:`pyco.probe.Monitor` into ``out`` (default
    ``<output_dir>/pyco``). ``blocks``: the partition (default ``by_module(model, shared="first")``, which puts
    tied input/output embeddings in their first owner's block). Other keywords go to the Monitor (``mode``,
    ``dtype``, ``alone``, ``max_batch``, ``tensorboard``). ``monitor`` is the Monitor once training began."""

    def __init__(self, blocks=None, *, every: int = 100, out: str | os.PathLike | None = None, **monitor_options):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"PycoCallback: every must be an int >= 1, got {every!r}")
        self.blocks, self.every, self.out, self.options = blocks, every, out, monitor_options
        self.monitor: Monitor | None = None
        self._inputs = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("PycoCallback: the Trainer passed no model or optimizer to on_train_begin")
        blocks = self.blocks if self.blocks is not None else by_module(model, shared="first")
        out = self.out if self.out is not None else os.path.join(args.output_dir, "pyco")
        self.monitor = Monitor(optimizer, blocks, every=self.every, out=out, **self.options)

        def keep(module, call_args, call_kwargs):
            if module.training:
                self._inputs = (call_args, dict(call_kwargs))

        self._hook = model.register_forward_pre_hook(keep, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.before_step()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        call_args, call_kwargs = self._inputs if self._inputs is not None else ((), {})

        def loss_fn():
            out = model(*call_args, **call_kwargs)
            loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
            if loss is None:
                raise ValueError("PycoCallback: the model returned no loss; the batches need labels")
            return loss

        self.monitor.after_step(loss_fn)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
