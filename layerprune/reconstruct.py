"""Block reconstruction after pruning (``--reconstruct block``): any solver's block program, wrapped.

With the block's zero pattern (or, for a solver that changes shapes, its widths) fixed after the solver ran, a few
epochs of Adam on the block's calibration windows minimize

    || block_dense(X) - block_pruned(X~) ||^2

where X is the block's input in the *dense* model (the targets come from dense inputs) and X~ its input in the
model pruned so far (the pruned inputs are propagated), as EBFT / Wanda++'s regional optimization do. The program
keeps its own stream of dense activations beside the engine's pruned one, in the same place (device, CPU RAM or disk),
and hands it to the checkpoint for a resume. Only the block's linear weights are trained (biases, norms and
embeddings stay); their gradients and the weights are masked to the pattern, so it stays exactly as the solver left
it. Adam steps on batches of STEP_WINDOWS windows (more steps per epoch than ``--batch-size`` would give) in a fixed
shuffled order per block and epoch (seeded by the block index): one block and one batch of activations at a time,
and a resumed run repeats the same steps.

Before Adam, each linear's kept weights are refit by least squares to the dense layer's outputs on the pruned
inputs (``refit_iters`` conjugate-gradient iterations on its input Hessian, one statistics pass per block): the
weight update SparseGPT makes, for any solver's pattern (Wanda's, say); Adam then fits the block as a whole.

Each method is a class in ``RECONSTRUCTORS`` with declared options (they become CLI flags, like a solver's);
``wrap(program, cfg)`` is what the engine calls on every block program.
"""
from __future__ import annotations

import copy
import time

import torch

from layerprune.errors import UserError
from layerprune.registry import Option, Registry, positive_int

RECONSTRUCTORS = Registry("reconstruction")
STEP_WINDOWS = 2  # calibration windows per Adam step


@RECONSTRUCTORS.register
class NoReconstruction:
    name = "none"
    summary = "the solver's weights as they are"
    options = ()


def _positive_float(v: str) -> float:
    import argparse

    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return x


@RECONSTRUCTORS.register
class BlockReconstruction:
    name = "block"
    summary = "Adam on each block's output error, pattern fixed"
    options = (Option("epochs", positive_int, None, "block reconstruction: epochs over the calibration windows "
                      "(default 3)", flag="--recon-epochs"),
               Option("lr", _positive_float, None, "block reconstruction: Adam learning rate (default 1e-4)",
                      flag="--recon-lr"),
               Option("refit_iters", int, None, "block reconstruction: conjugate-gradient iterations of the "
                      "least-squares refit of each linear's kept weights before Adam (default 20; 0: none)",
                      flag="--recon-refit-iters"))
    defaults = {"epochs": 3, "lr": 1e-4, "refit_iters": 20}


def check(name: str, options: dict) -> dict:
    """The full options of reconstruction ``name`` (defaults filled in); bad values are one-line UserErrors."""
    cls = RECONSTRUCTORS.get(name)
    options = dict(options or {})
    known = {o.name for o in cls.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"reconstruction {name!r}: unknown option(s) {unknown}; known: {', '.join(known) or 'none'}")
    opts = {**getattr(cls, "defaults", {}), **{k: v for k, v in options.items() if v is not None}}
    if "epochs" in opts and not (isinstance(opts["epochs"], int) and opts["epochs"] >= 1):
        raise UserError(f"reconstruction epochs must be a positive integer, got {opts['epochs']!r}")
    if "lr" in opts and not float(opts["lr"]) > 0:
        raise UserError(f"reconstruction lr must be > 0, got {opts['lr']!r}")
    if "refit_iters" in opts and not (isinstance(opts["refit_iters"], int) and opts["refit_iters"] >= 0):
        raise UserError(f"reconstruction refit_iters must be an integer >= 0, got {opts['refit_iters']!r}")
    return opts


def wrap(program, cfg):
    """``program`` itself, or wrapped in the reconstruction ``cfg.reconstruct`` names."""
    if cfg.reconstruct == "none":
        return program
    return BlockReconstructProgram(program, cfg.offload, **check(cfg.reconstruct, cfg.reconstruct_options))


class BlockReconstructProgram:
    """A block program (see ``solvers.program``) that runs ``inner`` and then reconstructs the block's output."""

    def __init__(self, inner, offload: str, epochs: int, lr: float, refit_iters: int = 0):
        self.inner, self.offload, self.epochs, self.lr, self.refit_iters = inner, offload, epochs, lr, refit_iters
        self.changes_shapes = inner.changes_shapes
        self.dense = None  # ActivationBuffer: .a the dense inputs of the next block to prune

    def check(self, model) -> None:
        self.inner.check(model)

    def load_block(self, block, state_dict) -> None:
        self.inner.load_block(block, state_dict)

    def finish(self, model) -> dict:
        if self.dense is not None:
            self.dense.close()
            self.dense = None
        return self.inner.finish(model)

    # resume: the dense stream is part of the checkpoint (the dense blocks before it are gone)
    def resume_state(self) -> dict[str, torch.Tensor]:
        return {"dense": self.dense.a} if self.dense is not None else {}

    def restore_state(self, tensors: dict[str, torch.Tensor], like: torch.Tensor, device, folder=None) -> None:
        from layerprune.passes import ActivationBuffer

        if "dense" not in tensors:
            raise UserError("the checkpoint has no dense activations for --reconstruct block: rerun with --force")
        self.dense = ActivationBuffer(tensors["dense"].to(like.dtype), self.offload, device, folder)

    def run(self, block, collect, targets) -> list[dict]:
        from layerprune.passes import ActivationBuffer, forward_all, forward_copy

        ctx = collect.context  # the engine's pruned-input buffer, the block's call arguments, batch size, dtype
        buf = ctx["buffer"]
        t0 = time.perf_counter()
        with ctx["timers"]("reconstruct"):
            if self.dense is None:  # block 0 (or the first block of this process without a resume state)
                self.dense = ActivationBuffer(buf.inputs, self.offload, buf.device, ctx.get("folder"))
            with torch.no_grad():  # the dense block's outputs on the dense inputs: the targets
                forward_all(forward_copy(block, ctx["dtype"]), self.dense, ctx["kwargs"], ctx["batch_size"],
                            keep=True)
        t_dense = time.perf_counter() - t0
        masked = not self.changes_shapes
        refit = masked and self.refit_iters > 0
        if refit:  # the dense weights: what the refit reproduces on the pruned inputs
            dense_w = {n: ctx["get_weight"](m).detach().clone() for n, m in ctx["linears"](block).items()}
        rows = self.inner.run(block, collect, targets)
        t0 = time.perf_counter() - t_dense
        # the refit's statistics pass counts as statistics (collect times it), its solves as reconstruction
        refit_err = refit_linears(block, ctx, collect, dense_w, self.refit_iters) if refit else None
        with ctx["timers"]("reconstruct"):
            before, after = reconstruct(block, ctx["linears"](block), buf, self.dense.b, ctx["kwargs"],
                                        ctx["batch_size"], self.epochs, self.lr, ctx["index"],
                                        masked=masked)
        info = {"loss_before": before, "loss_after": after, "seconds": round(time.perf_counter() - t0, 4),
                "epochs": self.epochs, "lr": self.lr, "refit_iters": self.refit_iters if refit else 0}
        rows = [{**r, "refit_rel_error": refit_err.get(r["name"])} if refit_err else r for r in rows]
        self.dense.swap()  # the dense outputs are the next block's dense inputs
        return [{**r, "reconstruct": info} for r in rows]


def refit_linears(block, ctx: dict, collect, dense_w: dict[str, torch.Tensor], iters: int) -> dict[str, float]:
    """Least squares on each linear's support: with the block pruned, the input Hessian H of every input group on
    the *pruned* inputs (one statistics pass), then for each linear min ||X (W_dense - W)^T||^2 over the kept entries
    of W (its zeros fixed), by conjugate gradients warm-started at the solver's weights (``solvers.alps.pcg_refit``
    in the unit-diagonal basis, damped as SparseGPT). Returns each linear's relative output error after the refit."""
    from layerprune.solvers.alps import normalized_hessian, pcg_refit
    from layerprune.solvers.common import relative_error

    mods = ctx["linears"](block)
    groups = [[n for n in g if n in mods] for g in ctx["input_groups"]]
    groups = [g for g in groups if g]
    stats = collect([g[0] for g in groups], ("hessian",))  # timed as statistics by collect
    errors = {}
    with ctx["timers"]("reconstruct"):  # the solves
        for g in groups:
            st = stats.pop(g[0])
            Hn, scale, dead = normalized_hessian(st.hessian, 0.01, ctx["get_weight"](mods[g[0]]).device)
            for name in g:
                w = ctx["get_weight"](mods[name]).detach()  # [out, in]
                keep = w != 0
                wd = dense_w[name].to(torch.float32)
                B = pcg_refit(wd * scale, Hn, (w.to(torch.float32) * scale).masked_fill(~keep, 0), keep, iters)
                new = B.div_(scale).masked_fill_(~keep, 0.0).add_(0.0)
                if bool(dead.any()):  # an input that never fires: its weights keep the solver's values
                    new[:, dead] = w[:, dead].to(torch.float32)
                if bool(torch.isfinite(new).all()):  # else the solver's weights stay (a diverged refit is no refit)
                    ctx["set_weight"](mods[name], new.to(w.dtype))
                errors[name] = relative_error(wd.to(w.dtype), ctx["get_weight"](mods[name]).detach(), st)
            del st, Hn
    return errors


def reconstruct(block, linears: dict, buf, targets: torch.Tensor, kwargs, batch_size: int, epochs: int, lr: float,
                seed: int, masked: bool = True) -> tuple[float, float]:
    """Adam on ``linears``' weights (a fp32 copy of the block is trained, then copied back in the block's dtype),
    minimizing the mean squared error between the block's outputs on ``buf.inputs`` and ``targets``; with ``masked``
    every weight's zeros stay exactly zero. Returns the mean loss over the windows before and after (fp32)."""
    from layerprune.passes import block_out, cast

    names = list(linears)
    work = copy.deepcopy(block).float()
    for p in work.parameters():
        p.requires_grad_(False)
    params = [work.get_submodule(_path(block, linears[n])).weight for n in names]
    masks = [p != 0 if masked else None for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    args, kw = cast(kwargs, buf.device, torch.float32)
    x_all, n = buf.inputs, buf.inputs.shape[0]
    dev = params[0].device

    def loss_on(idx):
        x = x_all[idx].to(dev, torch.float32)
        y = targets[idx].to(dev, torch.float32)
        return torch.nn.functional.mse_loss(block_out(work(x, *args, **kw)), y)

    def mean_loss():
        with torch.no_grad():
            return sum(float(loss_on(torch.arange(s, min(s + batch_size, n)))) * min(batch_size, n - s)
                       for s in range(0, n, batch_size)) / n

    before = mean_loss()
    g = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, STEP_WINDOWS):
                loss = loss_on(order[s:s + STEP_WINDOWS])
                opt.zero_grad(set_to_none=False)
                loss.backward()
                for p, m in zip(params, masks):
                    if m is not None:
                        p.grad.mul_(m)  # masked entries get no gradient, so Adam never moves them
                opt.step()
                with torch.no_grad():
                    for p, m in zip(params, masks):
                        if m is not None:
                            p.masked_fill_(~m, 0.0)
    after = mean_loss()
    with torch.no_grad():
        for n_, p, m in zip(names, params, masks):
            w = linears[n_].weight
            new = p.detach().to(w.dtype)
            if m is not None:  # a kept weight that trained (or rounded) to exactly 0 keeps its solver value
                new = torch.where(m & (new == 0), w, new).masked_fill_(~m, 0.0)
            w.copy_(new)
    return before, after


def _path(root, module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("module not in block")
