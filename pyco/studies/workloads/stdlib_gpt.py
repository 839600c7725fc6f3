"""``stdlib-gpt``: a byte-level decoder-only transformer trained on the Python standard library's own
source, found with ``sysconfig.get_paths()["stdlib"]``: the corpus is on every machine that runs pyco,
so nothing is downloaded.

The corpus is a fixed list of modules, split by file: 96 modules to train on (3.3 MB on CPython 3.11),
11 others to validate on (160 kB). It is the running Python's own copy, so it differs slightly from one
Python version to the next; ``config`` records the version and the bytes read. The GPU size reads every
``.py`` file of the standard library (tests and IDLE left out, about 11 MB) and puts every 20th file, in
sorted order, in the validation split.

Architecture: pre-LN transformer blocks (LayerNorm, causal multi-head attention through
``scaled_dot_product_attention``, LayerNorm, GELU MLP of 4× the width), learned position embeddings, a
final LayerNorm and an output head tied to the input embedding (one 256×width matrix). GPT-2's
initialisation: normal(0, 0.02), the residual projections scaled by 1/√(2·layers). Validation metric:
bits per byte (the mean cross-entropy in nats over ln 2; one token is one byte). Blocks: one per module
that owns parameters, the tied embedding in its first owner's (``by_module(model, shared="first")``).
"""

from __future__ import annotations

import functools
import math
import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pyco.blocks import by_module
from pyco.studies.workload import Recipe, Workload, WorkloadError
from pyco.studies.workloads._common import human, seeded, settings

NAME = "stdlib-gpt"
VOCAB = 256
SIZES = {
    "tiny": dict(depth=1, width=16, heads=2, context=16, batch=4, steps=10, eval_windows=8, corpus="fixed",
                 about="~8k parameters"),
    "cpu": dict(depth=4, width=160, heads=5, context=128, batch=16, steps=400, eval_windows=256, corpus="fixed",
                about="~1.3M parameters"),
    "gpu": dict(depth=14, width=768, heads=12, context=256, batch=64, steps=5000, eval_windows=2048, corpus="all",
                about="~99M parameters"),
}
LR, BETAS, WEIGHT_DECAY = 2e-3, (0.9, 0.95), 0.0
TRAINS_TO = "3.45 validation bits per byte (95% interval 3.26-3.64, 3 seeds) in 400 AdamW steps"

TRAIN_FILES = (
    "argparse ast base64 bdb calendar cmd code codecs collections/__init__ configparser contextlib copy csv "
    "dataclasses difflib dis doctest enum filecmp fnmatch ftplib functools getopt gettext glob gzip hashlib heapq "
    "hmac imaplib inspect ipaddress json/decoder json/encoder linecache locale logging/__init__ logging/handlers "
    "lzma mailbox mimetypes netrc numbers opcode operator optparse os pdb pickle pickletools platform plistlib "
    "poplib posixpath pprint profile pstats py_compile pydoc queue quopri random reprlib runpy sched selectors "
    "shelve shutil smtplib socket socketserver ssl stat string subprocess symtable tabnanny tarfile tempfile "
    "threading timeit token tokenize trace traceback tracemalloc types typing uuid warnings wave weakref "
    "webbrowser zipimport").split()
VALIDATION_FILES = "fractions statistics textwrap shlex bisect colorsys graphlib fileinput getpass zipapp secrets".split()
LEFT_OUT = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def corpus(which: str = "fixed") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes) as uint8 tensors, and what was read. Files are joined with a blank
    line between them. ``which``: "fixed" (the module lists above) or "all" (every .py file)."""
    root = stdlib_root()
    if which == "fixed":
        train = [root / f"{name}.py" for name in TRAIN_FILES]
        val = [root / f"{name}.py" for name in VALIDATION_FILES]
        train, val = [p for p in train if p.is_file()], [p for p in val if p.is_file()]
        if len(train) < len(TRAIN_FILES) // 2 or len(val) < len(VALIDATION_FILES) // 2:
            raise WorkloadError(f"workload {NAME!r}: found only {len(train)} of {len(TRAIN_FILES)} training and "
                                f"{len(val)} of {len(VALIDATION_FILES)} validation modules under {root}")
    elif which == "all":
        files = sorted(p for p in root.rglob("*.py") if not LEFT_OUT & set(p.relative_to(root).parts))
        val, train = files[::20], [p for i, p in enumerate(files) if i % 20]
    else:
        raise WorkloadError(f"workload {NAME!r}: corpus must be 'fixed' or 'all', got {which!r}")

    def read(paths):
        data = b"\n\n".join(p.read_bytes() for p in paths)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    info = {"root": str(root), "python": sys.version.split()[0], "corpus": which,
            "train_files": len(train), "validation_files": len(val)}
    train_bytes, val_bytes = read(train), read(val)
    info.update(train_bytes=train_bytes.numel(), validation_bytes=val_bytes.numel())
    return train_bytes, val_bytes, info


# ---- the model ------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise WorkloadError(f"workload {NAME!r}: width {width} is not a multiple of the {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level decoder-only transformer with tied input/output embeddings: tokens [b, t] -> logits [b, t, 256]
    (``vocab`` other than 256 only for tests that need a small one)."""

    def __init__(self, depth: int, width: int, heads: int, context: int, vocab: int = VOCAB):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for m in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.context}")
        x = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class RandomWindows:
    """Training batches (x, y) of ``batch`` windows of ``context + 1`` bytes at random offsets (x the first
    ``context``, y the next byte of each). Re-iterable: each pass is as many batches as the corpus has
    windows; the offsets come from the workload's own generator."""

    def __init__(self, data: torch.Tensor, batch: int, context: int, seed: int, device):
        if data.numel() <= context + 1:
            raise WorkloadError(f"workload {NAME!r}: corpus of {data.numel()} bytes is shorter than one window")
        self.data, self.batch, self.context, self.device = data, batch, context, device
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, self.data.numel() // (self.batch * self.context))

    def __iter__(self):
        span = torch.arange(self.context + 1)
        for _ in range(len(self)):
            starts = torch.randint(0, self.data.numel() - self.context - 1, (self.batch, 1), generator=self.generator)
            w = self.data[starts + span].long().to(self.device)
            yield w[:, :-1], w[:, 1:]


class BitsPerByte:
    """``eval_fn``: loss (nats per byte) and bits per byte on consecutive windows of the validation bytes."""

    def __init__(self, data: torch.Tensor, context: int, windows: int, device, chunk: int = 32):
        n = min(windows, (data.numel() - 1) // context)
        if n < 1:
            raise WorkloadError(f"workload {NAME!r}: validation corpus shorter than one window")
        idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)
        w = data[idx].long().to(device)
        self.x, self.y, self.chunk = w[:, :-1], w[:, 1:], chunk

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for s in range(0, self.x.shape[0], self.chunk):
                    logits = model(self.x[s:s + self.chunk]).float()
                    total += F.cross_entropy(logits.reshape(-1, VOCAB), self.y[s:s + self.chunk].reshape(-1),
                                             reduction="sum").item()
        finally:
            model.train(was_training)
        loss = total / self.y.numel()
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def make(seed: int, *, size: str = "cpu", depth: int | None = None, width: int | None = None,
         heads: int | None = None, context: int | None = None, corpus_files: str | None = None,
         device="cpu") -> Workload:
    """The stdlib GPT (depth: transformer blocks, width: model width). AdamW, constant learning rate."""
    s, device = settings(NAME, SIZES, size, device, depth=depth, width=width, heads=heads, context=context)
    if width is not None and heads is None:
        s["heads"] = max(1, s["width"] // 32)
    train, val, info = corpus(corpus_files or s["corpus"])
    with seeded(seed):
        model = GPT(s["depth"], s["width"], s["heads"], s["context"]).to(device)
    return Workload(
        name=NAME, model=model, loss_fn=lm_loss,
        train_batches=RandomWindows(train, s["batch"], s["context"], seed, device),
        eval_fn=BitsPerByte(val, s["context"], s["eval_windows"], device),
        blocks=by_module(model, shared="first"),
        recipe=Recipe(optimizer="adamw", lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, steps=s["steps"]),
        description=describe(s["depth"], s["width"], s["heads"], s["context"],
                             measured=size == "cpu" and depth is width is heads is context is None),
        config={"size": size, "depth": s["depth"], "width": s["width"], "heads": s["heads"],
                "context": s["context"], "batch": s["batch"], "eval_windows": s["eval_windows"], **info},
    )


def describe(depth: int = SIZES["cpu"]["depth"], width: int = SIZES["cpu"]["width"], heads: int = SIZES["cpu"]["heads"],
             context: int = SIZES["cpu"]["context"], measured: bool = True) -> str:
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(depth, width, heads, context).parameters())
    line = (f"{human(n)} params; byte-level GPT ({depth} layers, width {width}, context {context}, tied embeddings) "
            f"on the Python stdlib's own source")
    return f"{line}; {TRAINS_TO}" if measured else line
