"""Forward hooks that collect calibration statistics of linear-layer inputs (all hooks live here).

One collector per *input group* (linears reading the same tensor, e.g. q/k/v or gate/up), so a
Hessian is accumulated once and shared by the group.
"""
from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .stats import LayerStats


HESSIAN_BANDS = 4  # X^T X is accumulated in this many row bands of its upper triangle


class InputCollector:
    """Accumulates ``sq_norm`` (sum of x_j^2), ``X^T X`` and a small fixed sample of input rows.

    Each window's contribution is computed in fp32 and added in fp64: the sums then do not depend on how the windows
    are grouped (batches, or shards on N processes, ``distributed``), so N processes give one process's statistics
    bit for bit. They are returned in fp32."""

    def __init__(self, want: set[str], sample_rows: int = 256):
        self.want = want
        self.sample_rows = sample_rows
        self.ntokens = 0
        self.sq_sum: torch.Tensor | None = None  # fp64 running sums
        self.xtx: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None

    @property
    def sq_norm(self) -> torch.Tensor | None:
        return None if self.sq_sum is None else self.sq_sum.float()

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x[None]  # [windows, tokens, in]
        x = x.reshape(-1, x.shape[-1])
        if self.sample is None and self.sample_rows:
            step = max(1, x.shape[0] // self.sample_rows)
            self.sample = x[::step][: self.sample_rows].clone()
        if "sq_norm" in self.want:
            s = windows.pow(2).sum(1).double().sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        if "hessian" in self.want:
            n = x.shape[1]
            if self.xtx is None:
                self.xtx = x.new_zeros(n, n, dtype=torch.float64)
            band = -(-n // HESSIAN_BANDS)
            for w in windows:
                for b0 in range(0, n, band):  # X^T X is symmetric: only row bands b0:b1 from column b0 on (5/8 of it)
                    self.xtx[b0:b0 + band, b0:] += w[:, b0:b0 + band].t() @ w[:, b0:]
        self.ntokens += x.shape[0]

    def stats(self) -> LayerStats:
        distributed.current().reduce_collector(self)  # N processes: the sums over every rank's windows
        h = None
        if self.xtx is not None:  # the upper triangle mirrored (the diagonal tiles were computed whole), in place
            h, self.xtx = self.xtx, None
            t = 1024  # tiles: no n x n temporaries (at 7B widths each one is 0.5 GB)
            for i in range(0, h.shape[0], t):
                d = h[i:i + t, i:i + t]
                d.copy_(d.triu() + d.triu(1).t())
                h[i:i + t, :i] = h[:i, i:i + t].t()
            h = h.mul_(2.0 / max(self.ntokens, 1)).float()
        return LayerStats(self.ntokens, self.sq_norm, h, self.sample)

    def free(self) -> None:
        self.sq_sum = self.xtx = self.sample = None


class HookSet:
    """Attach collectors to modules (forward pre-hooks: a module's input is all they read) for the duration of a
    ``with`` block."""

    def __init__(self, modules: dict[str, nn.Module], want: set[str], sample_rows: int = 256):
        self.modules = modules
        self.collectors = {name: InputCollector(want, sample_rows) for name in modules}
        self._handles: list = []

    def __enter__(self) -> HookSet:
        for name, mod in self.modules.items():
            col = self.collectors[name]
            self._handles.append(mod.register_forward_pre_hook(lambda m, args, c=col: c.add_batch(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
