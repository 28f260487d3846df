"""Allocation searches on Ray: candidate evaluations as tasks on actors that each hold a copy of the proxy.

    ev = RayEvaluator(ProxyFactory(model, calib, eval_ids, 0.7, ...), workers=2)       # a local Ray, 2 actors
    evolutionary_search(..., evaluate_batch=ev.dsa)      # DSA searches: a batch of function keys
    level_search(..., evaluate_batch=ev.levels)          # level search: a batch of (block sparsities, windows)

The searches draw a whole batch before evaluating it and log the results in the order they were drawn, so a search
with the same seed and candidate budget logs the same candidates and fitness values as the serial one (timings
aside). Each actor runs with one thread (``torch.set_num_threads(1)``, OMP/MKL_NUM_THREADS=1) and builds its proxy once
(the dense statistics come from the proxy's cache file when the factory names one). ``address``: join a running
cluster (``ray.init(address=...)``; the cache file and the model must then be reachable from every node); without it a
local Ray with ``workers`` CPUs is started.
"""
from __future__ import annotations

import math
import time

from layerprune.errors import UserError

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class ProxyFactory:
    """Builds a ``Proxy`` in a worker: ``model`` is a model object (sent by value) or a name/path to load there."""

    def __init__(self, model, calib, eval_ids, target: float, load_dtype: str = "float32", **proxy_kwargs):
        self.model, self.calib, self.eval_ids, self.target = model, calib, eval_ids, target
        self.load_dtype, self.kwargs = load_dtype, proxy_kwargs

    def __call__(self):
        import copy

        from layerprune.search.proxy import Proxy

        if isinstance(self.model, str):
            from layerprune.models.loading import load_model

            model, _ = load_model(self.model, self.load_dtype)
        else:
            model = copy.deepcopy(self.model)
        return Proxy(model, self.calib, self.eval_ids, self.target, **self.kwargs)


class _Worker:
    def __init__(self, factory):
        import torch

        torch.set_num_threads(1)
        self.proxy = factory()

    def ready(self) -> bool:
        return True

    def run(self, kind: str, arg):
        from layerprune.allocation.dsa.functions import InvalidCandidate

        t0 = time.monotonic()
        try:
            v = float(self.proxy.fitness(arg) if kind == "dsa" else self.proxy.evaluate_on(*arg))
            err = None if math.isfinite(v) else f"non-finite fitness {v}"
        except InvalidCandidate as e:  # a bad candidate: logged as failed, the search goes on; any other error
            v, err = math.inf, f"{type(e).__name__}: {e}"  # reaches the search through ray.get and stops it
        return (v if err is None else math.inf), err, time.monotonic() - t0


class RayEvaluator:
    def __init__(self, factory, workers: int, address: str | None = None):
        if workers < 1:
            raise UserError(f"--workers {workers} must be at least 1")
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise UserError("Ray is not installed: pip install 'ray' (or flwr[simulation]), or run with --workers 1")
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            kw = dict(address=address) if address else dict(num_cpus=workers, include_dashboard=False)
            ray.init(runtime_env={"env_vars": THREAD_ENV}, log_to_driver=False, **kw)
            self.started = True
        actor = ray.remote(num_cpus=1)(_Worker)
        self.actors = [actor.remote(factory) for _ in range(workers)]
        t0 = time.monotonic()
        ray.get([a.ready.remote() for a in self.actors])  # every actor has built its proxy: setup, not search time
        self.setup_seconds = time.monotonic() - t0
        self.pool = ActorPool(self.actors)

    def _map(self, kind: str, args: list) -> list:
        return list(self.pool.map(lambda a, x: a.run.remote(kind, x), args))  # results in submission order

    def dsa(self, keys: list[str]) -> list:
        return self._map("dsa", keys)

    def levels(self, jobs: list) -> list:
        return self._map("levels", [(list(bs), int(w)) for bs, w in jobs])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
