"""GPTQ-style uniform min-max quantizer, usable column by column inside SparseGPT's OBS sweep (joint sparse + quant).

Per output row r (and per group of `groupsize` input columns when groupsize > 0), with maxq = 2**bits - 1:
    asymmetric: lo = min(0, min w), hi = max(0, max w), scale = (hi - lo) / maxq, zero = round(-lo / scale)
    symmetric:  hi = max(|min w|, max w), lo = -hi,     scale = 2 hi / maxq,     zero = (maxq + 1) / 2
    q(w) = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)          (the dequantized value)
The range always contains 0 and zero is an integer, so q(0) == 0 exactly: weights pruned to zero stay zero.
A row that is all zeros gets lo, hi = -1, +1 (any scale works; it avoids dividing by 0).

In the OBS sweep (GPTQ / SparseGPT) column j is quantized, the error (w_j - q_j) / [H^-1]_jj is spread over the later
columns, and with groups the parameters of a group are fitted when the sweep reaches the group's first column, from
the weights as they are then (already compensated), not from the original weights.
"""
import math

import torch

from layerprune.errors import UserError

BITS = (2, 3, 4, 8)


def check_quant(bits, groupsize):
    """UserError unless bits is one of BITS and groupsize is -1 or a positive integer column count."""
    if bits not in BITS:
        raise UserError(f"quantization bits must be one of {BITS}, got {bits}")
    if not isinstance(groupsize, int) or isinstance(groupsize, bool) or (groupsize != -1 and groupsize < 1):
        raise UserError(f"quantization groupsize must be -1 (per output channel) or a positive column count, "
                        f"got {groupsize!r}")


class Quantizer:
    """Min-max uniform quantizer with one (scale, zero) per output row, fitted by find_params on a (rows, k) block."""

    def __init__(self, bits, sym=False):
        check_quant(bits, -1)
        self.bits, self.sym, self.maxq = bits, sym, 2 ** bits - 1
        self.scale = self.zero = None

    def find_params(self, w):
        """Fit scale and zero (shape (rows, 1)) from the block w of shape (rows, k) or one column (rows,)."""
        w = w.float().reshape(w.shape[0], -1)
        lo = w.min(dim=1).values.clamp(max=0)
        hi = w.max(dim=1).values.clamp(min=0)
        if self.sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        empty = (lo == 0) & (hi == 0)
        lo[empty], hi[empty] = -1.0, 1.0
        self.scale = ((hi - lo) / self.maxq).unsqueeze(1)
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-lo / self.scale.squeeze(1)).unsqueeze(1)
        return self

    def quantize(self, w):
        """Dequantized values of w (a column (rows,) or a block (rows, k)) on the fitted grid, in w's dtype."""
        if self.scale is None:
            raise RuntimeError("Quantizer.quantize called before find_params")
        x = w.float()
        scale, zero = (self.scale, self.zero) if x.dim() == 2 else (self.scale[:, 0], self.zero[:, 0])
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return (scale * (q - zero)).to(w.dtype)


class ColumnQuantizer:
    """Callable (column index j, current column values[, block, mask]) -> dequantized column, for the OBS sweep.

    groupsize -1: one (scale, zero) per row, fitted once here on the whole weight (as GPTQ / SparseGPT do).
    groupsize g: refitted when j % g == 0 on the current values of columns j .. j+g-1. Those come from `block` when the
    solver passes it (its working copy of the columns from j on, already compensated), else from `weight`, the tensor
    given here, which the solver is expected to update in place (GPTQ reads its lazily updated W the same way).
    `mask` (bool, same columns as block, True = pruned) zeroes the pruned entries before the fit, so the grid spans
    only the weights that are kept (0 is always on the grid, so the pruned ones stay exactly 0).
    """

    def __init__(self, weight, bits, groupsize=-1, sym=False):
        check_quant(bits, groupsize)
        if weight.dim() != 2:
            raise UserError(f"the quantized weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
        self.weight, self.groupsize = weight, groupsize
        self.quantizer = Quantizer(bits, sym)
        if groupsize == -1:
            self.quantizer.find_params(weight)
        self.group = None  # index of the group the current params belong to

    def __call__(self, j, col, block=None, mask=None):
        if self.groupsize != -1 and j // self.groupsize != self.group:
            if j % self.groupsize != 0:
                raise RuntimeError(f"column {j} reached before the start of its group; sweep the columns in order")
            src = self.weight[:, j:j + self.groupsize] if block is None else block[:, :self.groupsize]
            if mask is not None:
                src = src.masked_fill(mask[:, :src.shape[1]], 0)
            self.quantizer.find_params(src)
            self.group = j // self.groupsize
        return self.quantizer.quantize(col)


def make_column_quantizer(weight, bits, groupsize=-1, sym=False):
    """The (j, col[, block, mask]) -> dequantized column callable for SparseGPT's sweep; see ColumnQuantizer."""
    return ColumnQuantizer(weight, bits, groupsize, sym)


def quantize_weight(weight, bits, groupsize=-1, sym=False):
    """Round-to-nearest (no error compensation) quantization of a whole weight, column by column, as a reference."""
    cq = make_column_quantizer(weight, bits, groupsize, sym)
    return torch.stack([cq(j, weight[:, j]) for j in range(weight.shape[1])], dim=1)


def theoretical_size_bytes(numel, nonzeros, bits, groupsize, rows, sym=False):
    """Storage of one weight matrix (rows x cols, numel = rows * cols) in bytes, in four formats.

    dense_fp16       = 2 * numel
    groups           = rows * ceil(cols / groupsize)       (groupsize -1: rows, one group per output row)
    quant_overhead   = groups * (2 + bits / 8)              (an fp16 scale and a `bits`-bit zero per group;
                                                             sym: scale only)
    quantized        = numel * bits / 8 + quant_overhead
    sparse_fp16      = numel / 8 + 2 * nonzeros             (1-bit mask over every position + fp16 kept values)
    sparse_quantized = numel / 8 + nonzeros * bits / 8 + quant_overhead
    Each packed stream is rounded up to whole bytes. Ratios are against dense_fp16.
    """
    check_quant(bits, groupsize)
    if rows < 1 or numel % rows != 0:
        raise UserError(f"numel {numel} is not a multiple of rows {rows}; pass the matrix's numel and output rows")
    if not 0 <= nonzeros <= numel:
        raise UserError(f"nonzeros must be between 0 and numel {numel}, got {nonzeros}")
    cols = numel // rows
    groups = rows * (1 if groupsize == -1 else math.ceil(cols / groupsize))
    overhead = groups * 2 + (0 if sym else math.ceil(groups * bits / 8))
    out = {
        "dense_fp16": 2 * numel,
        "groups": groups,
        "quant_overhead": overhead,
        "quantized": math.ceil(numel * bits / 8) + overhead,
        "sparse_fp16": math.ceil(numel / 8) + 2 * nonzeros,
        "sparse_quantized": math.ceil(numel / 8) + math.ceil(nonzeros * bits / 8) + overhead,
    }
    for k in ("quantized", "sparse_fp16", "sparse_quantized"):
        out[f"{k}_ratio"] = out[k] / out["dense_fp16"] if numel else 0.0
    return out


def model_size_bytes(model, bits, groupsize=-1, sym=False):
    """Theoretical storage of a model whose block linears are stored quantized (and sparse), summed over the linears.

    Each block linear counts as in theoretical_size_bytes (its nonzeros measured now); every other parameter
    (embeddings, norms, an untied head) is counted as fp16 in all formats. Returns {"bits", "groupsize", "sym",
    "linear_params", "other_params", "<format>" (total bytes), "<format>_ratio" (vs all-fp16)} for the formats
    dense_fp16, quantized, sparse_fp16, sparse_quantized.
    """
    from layerprune.models.adapters import get_adapter

    check_quant(bits, groupsize)
    adapter = get_adapter(model)
    mods = [mod for block in adapter.blocks(model) for mod in adapter.linears(block).values()]
    seen = {id(mod.weight) for mod in mods}
    linears = [adapter.get_weight(mod) for mod in mods]  # [out, in]
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    formats = ("dense_fp16", "quantized", "sparse_fp16", "sparse_quantized")
    out = {"bits": bits, "groupsize": groupsize, "sym": sym, "linear_params": sum(w.numel() for w in linears),
           "other_params": other, **{f: 2 * other for f in formats}}
    for w in linears:
        s = theoretical_size_bytes(w.numel(), int((w != 0).sum()), bits, groupsize, w.shape[0], sym)
        for f in formats:
            out[f] += s[f]
    for f in formats[1:]:
        out[f"{f}_ratio"] = out[f] / out["dense_fp16"]
    return out
