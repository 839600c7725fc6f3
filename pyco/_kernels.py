"""The Python half of the kernel contract: packs tensors into the table the kernels read (csrc/common.h)."""

from __future__ import annotations

from array import array

import torch

from pyco._ext import _C

DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPE_CODES.items()}
REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
SUPPORTED_DTYPES = tuple(DTYPE_CODES) + tuple(REAL_OF_COMPLEX)


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


class Table:
    """Records of one launch plus the temporary copies that must be written back after it.

    Tensors whose memory the kernel cannot treat as one flat array (a non-dense parameter, or a gradient
    or state tensor whose strides differ from the parameter's) are updated through contiguous copies.
    """

    def __init__(self) -> None:
        self._fields: list[int] = []  # kRecordFields ints per tensor, packed into array('q') by `records`
        self._records: array | None = None
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (original, working copy)
        self.keep: list[torch.Tensor] = []  # views and copies that must outlive the launch

    def add(self, param, grad, states, *, step=None, group=0, block=0, flags=0) -> None:
        """states: a tuple of up to three tensors shaped like param (None for unused slots)."""
        # Called once per tensor per step: the common case (real dtype, everything contiguous) is kept to a
        # few attribute reads and no temporary containers.
        n = len(states)
        s0 = states[0] if n > 0 else None
        s1 = states[1] if n > 1 else None
        s2 = states[2] if n > 2 else None
        code = DTYPE_CODES.get(param.dtype)
        if (code is None or not param.is_contiguous() or not grad.is_contiguous()
                or (s0 is not None and not s0.is_contiguous()) or (s1 is not None and not s1.is_contiguous())
                or (s2 is not None and not s2.is_contiguous())):
            param, grad, (s0, s1, s2) = self._flat_views(param, grad, (s0, s1, s2))
            code = DTYPE_CODES[param.dtype]
        codes = code | (flags << 16)
        if step is not None:
            codes |= DTYPE_CODES[step.dtype] << 8
        self._records = None
        self._fields += (
            param.data_ptr(), grad.data_ptr(),
            0 if s0 is None else s0.data_ptr(), 0 if s1 is None else s1.data_ptr(), 0 if s2 is None else s2.data_ptr(),
            0 if step is None else step.data_ptr(), param.numel(), codes, group, block,
        )

    @property
    def records(self) -> array:
        """The table as one contiguous int64 buffer (what the kernels read)."""
        if self._records is None:
            self._records = array("q", self._fields)
        return self._records

    def _flat_views(self, param, grad, states):
        """Complex tensors as real pairs; layouts the kernel cannot read as one flat array as copies."""
        tensors = [param, grad, *states]
        if param.is_complex():
            tensors = [None if t is None else torch.view_as_real(t) for t in tensors]
        p = tensors[0]
        if not (is_dense(p) and all(t is None or t.stride() == p.stride() for t in tensors[1:])):
            tensors = [None if t is None else self._working_copy(t) for t in tensors]
        self.keep.extend(t for t in tensors if t is not None)
        return tensors[0], tensors[1], tensors[2:]

    def _working_copy(self, t: torch.Tensor) -> torch.Tensor:
        copy = t.contiguous() if not t.is_contiguous() else t
        if copy is not t:
            self.copies.append((t, copy))
        return copy

    def write_back(self) -> None:
        for original, copy in self.copies:
            original.copy_(copy)

    def __len__(self) -> int:
        return len(self._fields) // _C.RECORD_FIELDS


def grads_all_finite(grads: list[torch.Tensor], num_threads: int) -> bool:
    table = Table()
    for g in grads:
        table.add(g, g, ())
    return _C.grads_all_finite(table.records, num_threads=num_threads)
