"""The Python half of the kernel contract: packs tensors into the table the kernels read (csrc/common.h)."""

from __future__ import annotations

from array import array

import torch

from pyco._ext import _C

DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPE_CODES.items()}
REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
SUPPORTED_DTYPES = tuple(DTYPE_CODES) + tuple(REAL_OF_COMPLEX)

# TensorRecord's int64 fields that hold addresses (csrc/common.h)
STATE_FIELDS, STEP_FIELD = (2, 3, 4), 5  # (param and grad are fields 0 and 1)


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a contiguous span of memory, each once (any order of dimensions)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((s, st) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two of t's elements may share memory (an expanded, stride-0 view, for instance): such a
    tensor cannot be written element by element. Conservative: an unusual layout that cannot be proved free
    of overlap counts as overlapping."""
    if is_dense(t):
        return False
    extent = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


class Table:
    """Records of one launch plus the temporary copies that must be written back after it.

    Tensors whose memory the kernel cannot treat as one flat array (a non-dense parameter; a gradient or
    state tensor whose strides differ from the parameter's; a view with torch's negation or conjugation
    bit) are updated through contiguous working copies. ``cacheable`` is False when any copy was made: such
    a table is rebuilt every step instead of becoming a :class:`pyco._C.Plan`.
    """

    def __init__(self) -> None:
        self._fields: list[int] = []  # kRecordFields ints per tensor, packed into array('q') by `records`
        self._records: array | None = None
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (original, working copy), written back
        self.grad_copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # written back when unscaled
        self.keep: list[torch.Tensor] = []  # views, copies and storages that must outlive the launch
        self.cacheable = True

    def add(self, param, grad, states, *, step=None, group=0, block=0, flags=0) -> int:
        """states: a tuple of up to three tensors shaped like param (None for unused slots). Returns the
        record's index."""
        # Called once per tensor per step when no plan holds: the common case (real dtype, everything
        # contiguous, no view bits) is kept to a few attribute reads and no temporary containers.
        n = len(states)
        s0 = states[0] if n > 0 else None
        s1 = states[1] if n > 1 else None
        s2 = states[2] if n > 2 else None
        code = DTYPE_CODES.get(param.dtype)
        if (code is None or not param.is_contiguous() or not grad.is_contiguous() or param.is_neg() or grad.is_neg()
                or any(s is not None and (not s.is_contiguous() or s.is_neg()) for s in (s0, s1, s2))):
            param, grad, (s0, s1, s2) = self._flat_views(param, grad, (s0, s1, s2))
            code = DTYPE_CODES[param.dtype]
        codes = code | (flags << 16)
        if step is not None:
            codes |= DTYPE_CODES.get(step.dtype, 0) << 8  # (an SGD init flag is an int32: its code is unused)
        self._records = None
        # The storages are taken before the addresses: whatever another thread does to these tensors'
        # .data meanwhile, the memory the records point to stays alive until the launch is over.
        for t in (param, grad, s0, s1, s2, step):
            if t is not None:
                self.keep.append(t.untyped_storage())
        self._fields += (
            param.data_ptr(), grad.data_ptr(),
            0 if s0 is None else s0.data_ptr(), 0 if s1 is None else s1.data_ptr(), 0 if s2 is None else s2.data_ptr(),
            0 if step is None else step.data_ptr(), param.numel(), codes, group, block,
        )
        return len(self) - 1

    @property
    def records(self) -> array:
        """The table as one contiguous int64 buffer (what the kernels read)."""
        if self._records is None:
            self._records = array("q", self._fields)
        return self._records

    def _flat_views(self, param, grad, states):
        """Complex tensors as real pairs; view bits resolved and layouts the kernel cannot read as one flat
        array replaced, both by working copies."""
        tensors = [self._resolved(t, grad=i == 1) for i, t in enumerate((param, grad, *states))]
        if tensors[0].is_complex():
            tensors = [None if t is None else torch.view_as_real(t) for t in tensors]
        p = tensors[0]
        if not (is_dense(p) and all(t is None or t.stride() == p.stride() for t in tensors[1:])):
            tensors = [None if t is None else self._working_copy(t, grad=i == 1) for i, t in enumerate(tensors)]
        self.keep.extend(t for t in tensors if t is not None)
        return tensors[0], tensors[1], tensors[2:]

    def _resolved(self, t, *, grad: bool):
        """t itself, or a plain copy when it carries torch's negation or conjugation bit (a lazy view the
        kernel would read as raw memory, with the wrong sign)."""
        if t is None or not (t.is_neg() or t.is_conj()):
            return t
        copy = t.resolve_conj().resolve_neg()
        self._note_copy(t, copy, grad=grad)
        return copy

    def _working_copy(self, t: torch.Tensor, *, grad: bool) -> torch.Tensor:
        copy = t.contiguous() if not t.is_contiguous() else t
        if copy is not t:
            self._note_copy(t, copy, grad=grad)
        return copy

    def _note_copy(self, original, copy, *, grad: bool) -> None:
        self.cacheable = False
        if grad:
            if not has_internal_overlap(original):  # an expanded gradient is read, never rewritten
                self.grad_copies.append((original, copy))
        else:
            self.copies.append((original, copy))

    def write_back(self, *, grads: bool) -> None:
        """Copies the working copies into the tensors they stand for; gradients only when the kernel
        rewrote them (unscaling)."""
        for original, copy in self.copies + (self.grad_copies if grads else []):
            original.copy_(copy)

    def __len__(self) -> int:
        return len(self._fields) // _C.RECORD_FIELDS


def grads_all_finite(grads: list[torch.Tensor], num_threads: int) -> bool:
    table = Table()
    for g in grads:
        table.add(g, g, ())
    return _C.grads_all_finite(table.records, num_threads=num_threads)
