"""pyco inside the training loops people already use: a Hugging Face ``TrainerCallback``
(:mod:`pyco.integrations.huggingface`, needs ``transformers``) and a Lightning ``Callback``
(:mod:`pyco.integrations.lightning`, needs ``lightning``). Both watch a run with :class:`pyco.probe.Monitor`:
every N-th optimizer step is split exactly into its first-order, within-block, cross-block and higher-order
parts and appended to ``probe.jsonl`` (``pyco plot DIR`` draws it). pyco's optimizers themselves need no
integration: pass them where a ``torch.optim`` optimizer goes."""
