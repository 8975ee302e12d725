"""Prepacked linear layers for CPU decoding.

A decode forward multiplies a few rows (1 for AR, 2 x block_length for a fused block) by
every weight matrix of the language model. With plain `F.linear` on CPU, the GEMM packs
(re-lays out) the weight matrix on every call: at 8-16 rows that packing, one more pass
over the weights, costs as much as the multiply. oneDNN can pack a weight once
(`_reorder_linear_weight`) and multiply any number of rows against the packed copy; this
is what IPEX and inductor's freezing pass do. Measured on the 2-core development CPU
(README "Benchmarks", `bench/decode.py --cpu-kernels dense|packed`), a 16-row forward of
the tiny preset costs 1.4x a 1-row forward packed, 2x unpacked.

`PackedLinear` is an `nn.Linear` (same parameters, same state dict) whose forward uses the
packed copy when it safely can, and plain `F.linear` otherwise:
- only on CPU, float32 or bfloat16 (where oneDNN supports it), and only without autograd
  (the packed copy is not differentiable): training a packed model is training a normal one;
- the packed copy is derived, not state: it is rebuilt whenever the weight's storage,
  dtype or version changes (`load_state_dict`, an optimizer step, `.to(dtype)`), so it can
  never go stale. It costs one extra copy of the packed weights in memory.

Plain torch: no Ray here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# Rows per call the packing is tuned for (a hint to oneDNN: any row count works).
_ROWS_HINT = 16


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build can pack linear weights of `dtype` on this CPU (and oneDNN
    is not switched off with `torch.backends.mkldnn.flags(enabled=False)`)."""
    return torch.backends.mkldnn.enabled and _build_supports(dtype)


@functools.cache
def _build_supports(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return False


class PackedLinear(nn.Linear):
    """`nn.Linear` that multiplies against a oneDNN-packed copy of its weight when it can."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A `PackedLinear` sharing `linear`'s parameters (no copy; ties stay tied)."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = linear.weight
        packed.bias = linear.bias
        packed.train(linear.training)
        return packed

    def __getstate__(self) -> dict:
        """Pickle / deepcopy without the packed copy (an opaque oneDNN tensor that cannot be
        serialised); the copy packs again on its first forward."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    def _key(self) -> tuple:
        w, b = self.weight, self.bias
        bias_key = None if b is None else (b.data_ptr(), b._version, b.dtype)
        return (w.data_ptr(), w._version, w.dtype, tuple(w.shape), bias_key)

    def _usable(self, x: torch.Tensor) -> bool:
        w = self.weight
        if w.device.type != "cpu" or x.dtype != w.dtype or not packing_available(w.dtype):
            return False
        if self.bias is not None and self.bias.dtype != w.dtype:
            return False
        return not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._usable(x):
            self._packed = self._packed_key = None  # free it while unused (training, GPU)
            return F.linear(x, self.weight, self.bias)
        key = self._key()
        if key != self._packed_key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _ROWS_HINT)
            self._packed_key = key
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")


def pack_linears(module: nn.Module) -> int:
    """Swap every `nn.Linear` under `module` for a `PackedLinear` sharing its parameters.

    Idempotent. Returns how many layers were swapped (0 if packing is unavailable)."""
    if not packing_available():
        return 0
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear.from_linear(child))
                swapped += 1
    return swapped
