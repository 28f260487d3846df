"""Block programs: the one interface the engine runs a solver through, one decoder block at a time.

    program = block_program(solver, model, adapter, cfg)
    program.check(model)                          # before any work (a weightless meta skeleton will do)
    rows = program.run(block, collect, targets)   # prune the block in place; one record row per linear
    program.load_block(block, state_dict)         # resume: a pruned block's saved weights
    extra = program.finish(model)                 # after the last block; merged into the run record

``collect(names, needs) -> {name: LayerStats}`` runs the block as it is now over the calibration inputs with hooks
on the named linears (``collect.context``: the engine's activation buffer, the block's call arguments, batch size,
compute dtype, timers, block index, run folder and ``linears(block)``, for a program that runs the block itself);
a program with ``resume_state() -> {name: tensor}`` / ``restore_state(tensors, like, device, folder)`` has those
tensors checkpointed with each block; ``targets`` is the block's ``allocation.plan.BlockTargets``.
``changes_shapes``: the program removes rows/columns (N:M and --skip then do not apply; under disk offload a pruned
block is stored at its new widths, and a resume reads them back with ``load_block`` from the stored shapes).

A program that decides over the whole model at once (``whole_model = True``, e.g. depth pruning: which blocks go
depends on all of them) has ``run_model(model, calib, device=, dtype=, batch_size=, progress=) -> {"layers": rows,
...}`` instead; the engine calls it in place of the block loop (no plan, checkpoint or resume) and merges the rest of
the dict into the run record.

A block-level solver (e.g. SlimGPT) makes its own program: ``solver.program(model, adapter, cfg)``. A per-linear
solver (``prune(weight, stats, sparsity, nm, **options) -> weight``) is wrapped by ``LinearProgram``; one that also has
``prune_group(weights, stats, sparsities, nm, **options) -> weights`` (the same results as ``prune`` on each) gets the
linears of an input group (q/k/v, gate/up) in one call. On N processes (``layerprune.distributed``) the groups (or,
without ``prune_group``, the linears) of a stage are solved on different ranks and their pruned weights broadcast.
"""
from __future__ import annotations

from layerprune import distributed
from layerprune.solvers.common import relative_error


class LinearProgram:
    """A per-linear solver as a block program: for each stage of the adapter (all input groups at once, or one group
    per stage with ``true_sequential``), collect the input statistics of every group once (its first linear), prune
    each linear not in ``skip`` to its target, and record its achieved sparsity and relative output error."""

    changes_shapes = False
    sharded = True  # on N processes it shares its solves out itself (else the engine syncs the block from rank 0)

    def __init__(self, solver, adapter, cfg):
        self.solver, self.adapter = solver, adapter
        self.options, self.true_sequential, self.skip = cfg.solver_options, cfg.true_sequential, set(cfg.skip)

    def check(self, model) -> None:
        pass

    def run(self, block, collect, targets) -> list[dict]:
        rows = []
        for stage in self.adapter.stages(self.true_sequential):
            groups = [[n for n in g if n not in self.skip] for g in stage]
            groups = [g for g in groups if g]
            if not groups:
                continue
            stats = collect([g[0] for g in groups], self.solver.needs)
            mods = self.adapter.linears(block)
            if hasattr(self.solver, "prune_group"):  # the group's linears in one call (they share the input)
                jobs = [(g[0], g, True) for g in groups]
            else:
                jobs = [(g[0], [n], n == g[-1]) for g in groups for n in g]

            def solve(job, stats=stats, mods=mods) -> list[dict]:
                key, names, last = job
                st = stats[key]
                ws = [self.adapter.get_weight(mods[name]).detach() for name in names]
                sparsities = [targets.layers[name] for name in names]
                if hasattr(self.solver, "prune_group"):
                    news = self.solver.prune_group(ws, st, sparsities, targets.nm, **self.options)
                    infos = getattr(self.solver, "last_info", None) or [{}] * len(news)  # a solver's own facts
                else:
                    news = [self.solver.prune(w, st, s, targets.nm, **self.options) for w, s in zip(ws, sparsities)]
                    infos = [{}] * len(news)
                out = []
                for name, w, new, target, info in zip(names, ws, news, sparsities, infos):
                    err = relative_error(w, new, st)
                    self.adapter.set_weight(mods[name], new)
                    achieved = float((new == 0).sum()) / new.numel()
                    out.append({"name": name, "shape": list(new.shape), "target": target,
                                "nm": list(targets.nm) if targets.nm else None, "achieved": achieved,
                                "rel_error": err, **info})
                if last:  # one input Hessian at a time
                    stats.pop(key)
                return out

            def cost(job, mods=mods) -> float:  # a solve's work, for sharing the jobs out among processes
                shapes = [self.adapter.get_weight(mods[n]).shape for n in job[1]]
                if "hessian" not in self.solver.needs:
                    return sum(o * i for o, i in shapes)
                return sum(o * i * i for o, i in shapes) + shapes[0][1] ** 3 / 3  # sweeps + one Cholesky

            def weights(job, mods=mods):
                return [(self.adapter.get_weight(mods[n]), lambda t, m=mods[n]: self.adapter.set_weight(m, t))
                        for n in job[1]]

            rows += distributed.current().solve_sharded(jobs, cost, solve, weights)  # one process: solve in order
            stats.clear()
        return rows

    def load_block(self, block, state_dict) -> None:
        block.load_state_dict(state_dict)

    def finish(self, model) -> dict:
        return {}


def block_program(solver, model, adapter, cfg):
    """The solver's own block program, or its per-linear ``prune`` wrapped in a ``LinearProgram`` (the engine wraps
    it again in the reconstruction ``cfg.reconstruct`` names, ``layerprune.reconstruct.wrap``)."""
    if hasattr(solver, "program"):
        return solver.program(model, adapter, cfg)
    return LinearProgram(solver, adapter, cfg)
