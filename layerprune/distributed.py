"""Pruning on N processes with ``torch.distributed`` (``torchrun --nproc-per-node N -m layerprune prune ...``).

All of the distributed logic lives here; the engine, the statistics collectors and the per-linear block program call
a few methods of ``current()``, which for one process (no ``WORLD_SIZE`` > 1 in the environment and no ``init()``)
is a world of one whose methods do nothing and communicate nothing.

Data-parallel calibration: every rank draws the same calibration windows (same seed) and keeps a disjoint contiguous
shard of them (``shard``: rank r gets windows [r*n/N, (r+1)*n/N), the first n mod N ranks one more), runs the block
forwards on its shard only, and the statistics collectors' partial sums (sum of x_j^2, the upper triangle of X^T X,
the token count) are summed over the ranks *in rank order* (``sum_ordered``: all-gather, then p_0 + p_1 + ... +
p_{N-1} on every rank), so every rank holds bit-identical statistics whatever the timing and the backend's reduction
algorithm. The collectors compute each window's contribution in fp32 and add them in fp64 (``hooks.InputCollector``),
so the sums do not depend on how the windows are grouped: N ranks hold one process's statistics bit for bit (at the
same threads per process: a GEMM's rounding depends on its thread count). The error-report input sample (used by
solvers without a Hessian) is rank 0's, i.e. one process's when rank 0's shard holds at least one batch.

Sharded solves (``solve_sharded``): the jobs of a stage (input groups, or single linears) are assigned to ranks by
cost (longest first, each to the least loaded rank, ties to the lowest rank: deterministic), solved there, and their
pruned weights broadcast from the solving rank, their record rows gathered. A block-level program (e.g. a
structured solver) runs on every rank on the identical statistics and its block is broadcast from rank 0 afterwards
(``sync_block``). Propagation runs per shard.

Rank 0 alone writes (record, card, recipe, checkpoint: the checkpoint's activations are gathered from the shards, on
a second gloo group while the ranks go on to the next block, and written by a writer thread; a resume scatters them
back); a resume needs the same N. Progress bars and logs come from rank 0. A rank that fails
ends its process; the others fail at their next collective (the connection to the dead rank is gone, or the
process-group timeout passes) and stop with one line (``PeerLost``); ``torchrun`` also stops the other workers when
one exits with an error.

With ``--offload disk`` every rank onloads the block it computes from the source checkpoint; rank 0 stores the pruned
blocks (the run's shards), the other ranks drop them (``local_store``). Refused before any work: ``--allocation
auto`` (its proxy prunes whole copies of the model on the full calibration set) and fewer windows than processes.
"""
from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager

import torch

from .errors import UserError

TIMEOUT_S = 3 * 3600  # process-group timeout: only a rank that hangs without dying waits this long


class PeerLost(UserError):
    """A collective failed: another process of the run stopped (or the process group timed out)."""


class Shared(UserError):
    """A refusal every rank raises alike (rank 0 decided it): only rank 0 prints it."""


class World:
    """The processes of this run: ``world`` ranks, this one ``rank``. A world of one does no communication."""

    def __init__(self, world: int = 1, rank: int = 0, backend: str | None = None, device=None):
        self.world, self.rank, self.backend = world, rank, backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.started = False  # the engine has begun: from here a rank's own error is printed by that rank
        self.side = None  # a second (gloo) group: the checkpoint's rows travel beside the block's collectives
        self._outgoing = None  # (work, tensor): this rank's rows on their way to rank 0
        self.begin()

    def begin(self) -> None:
        """Start counting a run's communication."""
        self.bytes = {"reduced": 0, "broadcast": 0, "gathered": 0}  # payload bytes this rank contributed
        self.comm_s = 0.0
        self.blocks: list[dict] = []  # per block: the bytes and seconds of its communication
        self._mark = (dict(self.bytes), 0.0)

    @property
    def active(self) -> bool:
        return self.world > 1

    # --- the calibration shard ------------------------------------------------------------------------------------

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n windows: the first n mod N ranks get one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def counts(self, n: int) -> list[int]:
        base, extra = divmod(n, self.world)
        return [base + (r < extra) for r in range(self.world)]

    # --- checks ---------------------------------------------------------------------------------------------------

    def check(self, cfg, nsamples: int | None = None) -> None:
        """Settings a distributed run cannot honour: refused before any work, with one line."""
        if not self.active:
            return
        if str(cfg.allocation).strip().lower() == "auto":
            raise UserError("allocation 'auto' prunes whole copies of the model in its proxy and does not run on "
                            f"{self.world} processes: pick an allocation (e.g. from a one-process --allocation auto "
                            "run's record)")
        if nsamples is not None and nsamples < self.world:
            raise UserError(f"{nsamples} calibration windows cannot be shared by {self.world} processes: use "
                            f"--nsamples {self.world} or more")

    # --- collectives ----------------------------------------------------------------------------------------------

    @contextmanager
    def _comm(self, kind: str | None = None, nbytes: int = 0):
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, ValueError) as e:  # DistBackendError, gloo "Connection closed by peer", timeouts
            raise self.lost(e) from None
        finally:
            self.comm_s += time.perf_counter() - t0
            if kind:
                self.bytes[kind] += nbytes

    def lost(self, e: Exception) -> PeerLost:
        """The one line a rank stops with when a collective failed."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return PeerLost(f"rank {self.rank} of {self.world}: another process of the distributed run stopped or hung "
                        f"({first[:160]}); this one stops too (--resume continues from the last checkpoint)")

    def sum_ordered(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks, p_0 + p_1 + ... in rank order, bit-identical on every rank."""
        if not self.active:
            return t
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self._comm("reduced", t.numel() * t.element_size()):
            dist.all_gather(parts, t)
        out = parts[0]
        for p in parts[1:]:
            out += p
        return out

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """``t`` (contiguous) takes rank ``src``'s values, in place."""
        import torch.distributed as dist

        with self._comm("broadcast", t.numel() * t.element_size() if self.rank == src else 0):
            dist.broadcast(t, src)

    def share(self, obj, src: int = 0):
        """A picklable object from rank ``src`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        with self._comm():
            dist.broadcast_object_list(box, src, device=self._obj_device())
        return box[0]

    def all_objects(self, obj) -> list:
        """Every rank's object, in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        with self._comm():
            dist.all_gather_object(out, obj)
        return out

    def _obj_device(self):
        return self.device if self.backend == "nccl" else None

    def gather_rows_async(self, t: torch.Tensor, n: int, tag: int = 0):
        """The shards of every rank concatenated in rank order (dim 0) on rank 0, without waiting: the rows (``n`` in
        all, split as ``shard``) travel to rank 0 over the side group while the ranks go on. Rank 0 gets an object
        whose ``result()`` is the concatenation (it waits for the rows); the other ranks get None. One transfer per
        rank is in flight: a rank first waits for its previous one; ``t`` must stay unchanged until this rank's next
        call or ``flush()``."""
        if not self.active:
            return t
        import torch.distributed as dist

        counts = self.counts(n)
        if t.shape[0] != counts[self.rank]:
            raise RuntimeError(f"rank {self.rank} holds {t.shape[0]} rows, its shard of {n} is {counts[self.rank]}")
        group = self.side if self.side is not None else dist.group.WORLD
        if self.rank == 0:
            parts = [t.detach().to("cpu")] + [torch.empty((c, *t.shape[1:]), dtype=t.dtype) for c in counts[1:]]
            with self._comm():
                works = [dist.irecv(parts[r], src=r, group=group, tag=tag) for r in range(1, self.world)]
            return _Rows(self, parts, works)
        self.flush()
        rows = t.detach().to("cpu").contiguous()
        with self._comm("gathered", rows.numel() * rows.element_size()):
            self._outgoing = (dist.isend(rows, 0, group=group, tag=tag), rows)
        return None

    def flush(self) -> None:
        """Wait until this rank's rows sent by ``gather_rows_async`` have left."""
        out, self._outgoing = self._outgoing, None
        if out is not None:
            with self._comm():
                out[0].wait()

    def scatter_rows(self, full: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``full`` [n, ...] split into the ranks' shards; returns this rank's (the shape of ``like``)."""
        if not self.active:
            return full
        import torch.distributed as dist

        counts = self.counts(sum(self.all_objects(like.shape[0])))
        pad = torch.zeros((max(counts), *like.shape[1:]), dtype=like.dtype, device=self._wire())
        parts = None
        if self.rank == 0:
            parts, start = [], 0
            for c in counts:
                p = torch.zeros_like(pad)
                p[:c].copy_(full[start:start + c])
                parts.append(p)
                start += c
        with self._comm():
            dist.scatter(pad, parts, src=0)
        return pad[:like.shape[0]].to(like.device)

    def _wire(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # --- the hooks the engine, the collectors and the block program call ---------------------------------------------

    def reduce_collector(self, c) -> None:
        """An ``hooks.InputCollector``'s partial sums become the sums over all ranks' windows (before it normalises
        them); without a Hessian its error-report sample becomes rank 0's."""
        if not self.active:
            return
        c.ntokens = int(self.sum_ordered(torch.tensor([c.ntokens], dtype=torch.float64, device=self._wire())).item())
        if c.sq_sum is not None:
            c.sq_sum = self.sum_ordered(c.sq_sum)
        if c.xtx is not None:
            c.xtx = self.sum_ordered(c.xtx)
        elif c.sample_rows:
            c.sample = self.share(c.sample.cpu() if c.sample is not None else None)
            if self.rank == 0 and c.sample is not None:
                self.bytes["broadcast"] += c.sample.numel() * c.sample.element_size()
            if c.sample is not None:
                c.sample = c.sample.to(c.sq_sum.device if c.sq_sum is not None else self.device)

    def assign(self, costs: list[float]) -> list[int]:
        """The rank of each job: longest first, to the least loaded rank (ties: lowest rank, then job order)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[k] = r
            load[r] += costs[k]
        return owner

    def solve_sharded(self, jobs: list, cost, solve, weights) -> list[dict]:
        """Run ``solve(job) -> rows`` for each job (it prunes the job's linears in place), each job on one rank, then
        give every rank the pruned weights: ``weights(job) -> [(tensor, set_fn)]`` (set_fn(tensor) stores a received
        tensor). Returns the rows of all jobs in job order."""
        if not self.active:
            return [r for j in jobs for r in solve(j)]
        owner = self.assign([float(cost(j)) for j in jobs])
        mine = {k: solve(j) for k, j in enumerate(jobs) if owner[k] == self.rank}
        for k, j in enumerate(jobs):
            for t, put in weights(j):
                buf = t.detach().contiguous()
                self.broadcast_(buf, owner[k])
                if owner[k] != self.rank:
                    put(buf)
        everyone = self.all_objects(mine)
        return [r for k in range(len(jobs)) for r in everyone[owner[k]][k]]

    def sync_block(self, block) -> None:
        """Every tensor of ``block`` takes rank 0's values (after a program that ran on every rank)."""
        if not self.active:
            return
        shapes = self.all_objects([tuple(t.shape) for t in block.state_dict().values()])
        if any(s != shapes[0] for s in shapes):
            raise RuntimeError("the ranks pruned a block to different shapes")
        with torch.no_grad():
            for t in block.state_dict().values():
                if t.is_contiguous():
                    self.broadcast_(t, 0)
                else:
                    buf = t.contiguous()
                    self.broadcast_(buf, 0)
                    t.copy_(buf)

    def local_store(self, store):
        """The block store this rank uses: rank 0's own; another rank's reads blocks like it but drops them when done
        instead of writing (a store that can: ``drop``)."""
        if self.rank == 0 or not hasattr(store, "drop"):
            return store
        return _ReadOnly(store)

    def block_done(self, i: int) -> None:
        """Book block i's communication (bytes this rank contributed, seconds spent in collectives)."""
        if not self.active:
            return
        b0, s0 = self._mark
        self.blocks.append({"block": i, **{k: v - b0[k] for k, v in self.bytes.items()},
                            "comm_s": round(self.comm_s - s0, 4)})
        self._mark = (dict(self.bytes), self.comm_s)

    def summary(self) -> dict | None:
        if not self.active:
            return None
        return {"world_size": self.world, "backend": self.backend, "rank": self.rank, "bytes": dict(self.bytes),
                "comm_s": round(self.comm_s, 4), "blocks": list(self.blocks)}


class _Rows:
    """Rows arriving on rank 0 (``World.gather_rows_async``): ``result()`` waits for them and concatenates."""

    def __init__(self, world: World, parts: list[torch.Tensor], works: list):
        self.world, self.parts, self.works = world, parts, works

    def result(self) -> torch.Tensor:
        try:
            for w in self.works:
                w.wait()
        except (RuntimeError, ValueError) as e:
            raise self.world.lost(e) from None
        return torch.cat(self.parts)


class _ReadOnly:
    """A block store seen from a rank that writes nothing: onload as the store does, offload = drop."""

    persists = False

    def __init__(self, store):
        self.store = store

    def onload(self, model, i: int, device) -> None:
        self.store.onload(model, i, device)

    def offload(self, model, i: int) -> None:
        self.store.drop(model, i)


_WORLD = World()


def current() -> World:
    """This process's world (one process unless ``init`` made a process group)."""
    return _WORLD


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the same environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device=None) -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK): ``nccl`` on CUDA devices (each process on cuda:LOCAL_RANK), ``gloo`` on CPU. One process: nothing.
    Returns the world, and the device this rank computes on."""
    global _WORLD
    if not launched() or _WORLD.active:
        return _WORLD
    import torch.distributed as dist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is None or local:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                                **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {rank} of {world}: cannot join the process group ({str(e).splitlines()[0][:160]})"
                        ) from None
    _WORLD = World(world, rank, backend, device)
    try:  # the checkpoint's rows travel on their own connections (gloo: CPU tensors on any device)
        _WORLD.side = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {rank} of {world}: cannot join the process group ({str(e).splitlines()[0][:160]})"
                        ) from None
    return _WORLD


def shutdown() -> None:
    """Leave the process group (no-op for one process)."""
    global _WORLD
    if _WORLD.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()
