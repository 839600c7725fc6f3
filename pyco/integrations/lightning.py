"""A Lightning callback that records the exact decomposition of every N-th optimizer step.

    from pyco.integrations.lightning import PycoCallback
    class Net(lightning.LightningModule):
        ...
        def configure_optimizers(self):
            return pyco.optim.AdamW(self.parameters(), lr=1e-3)
    lightning.Trainer(max_steps=500, callbacks=[PycoCallback(every=50, out="runs/probe")]).fit(Net(), loader)

The step is split on its own batch: the loss is ``loss_fn(module, batch)`` (default: the module's
``training_step(batch, batch_idx)``, its ``"loss"`` when it returns a dict), with ``self.log`` silenced
while the probe evaluates it, so the probe's re-evaluations log nothing. Training is unchanged: parameters
are restored bitwise, gradients and optimizer state are not touched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # an optional extra
    raise ImportError("pyco.integrations.lightning needs lightning: pip install 'pyco[lightning]'") from exc

from pyco.blocks import by_module
from pyco.probe.monitor import Monitor


class PycoCallback(Callback):
    """Records every ``every``-th optimizer step of the first optimizer with :class:`pyco.probe.Monitor` into
    ``out`` (default ``<log_dir or default_root_dir>/pyco``). ``blocks``: the partition (default
    ``by_module(module, shared="first")``). Other keywords go to the Monitor."""

    def __init__(self, blocks=None, *, every: int = 100, out: str | os.PathLike | None = None,
                 loss_fn: Callable | None = None, **monitor_options):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"PycoCallback: every must be an int >= 1, got {every!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"PycoCallback: loss_fn must be callable (module, batch) -> loss, got {loss_fn!r}")
        self.blocks, self.every, self.out, self.loss_fn, self.options = blocks, every, out, loss_fn, monitor_options
        self.monitor: Monitor | None = None
        self._stepped = False

    def on_train_start(self, trainer, pl_module):
        if not trainer.optimizers:
            raise RuntimeError("PycoCallback: the module configured no optimizer")
        blocks = self.blocks if self.blocks is not None else by_module(pl_module, shared="first")
        out = self.out if self.out is not None else os.path.join(trainer.log_dir or trainer.default_root_dir, "pyco")
        self.monitor = Monitor(trainer.optimizers[0], blocks, every=self.every, out=out, **self.options)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.monitor.before_step()
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._stepped:  # gradient accumulation: no step on this batch
            return
        self._stepped = False

        def loss_fn():
            with _silent(pl_module):
                if self.loss_fn is not None:
                    return self.loss_fn(pl_module, batch)
                out = pl_module.training_step(batch, batch_idx)
                return out["loss"] if isinstance(out, dict) else out

        self.monitor.after_step(loss_fn, outputs.get("loss") if isinstance(outputs, dict) else outputs)

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()


@contextlib.contextmanager
def _silent(module):
    """``module.log`` and ``module.log_dict`` do nothing inside (the probe evaluates the loss many times)."""
    saved = module.__dict__.get("log"), module.__dict__.get("log_dict")
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, value in zip(("log", "log_dict"), saved):
            if value is None:
                del module.__dict__[name]
            else:
                setattr(module, name, value)
