"""What a pruning run is asked to do: ``PruneConfig`` (the pruning and its calibration: what decides the result) and
``RunConfig`` (a whole ``layerprune prune`` run: the model to load, where to save, what to evaluate), and the dtypes
by name (the one list).

Below the engine: ``validate`` reads N:M from ``solvers.nm``; the method's and the allocation's names are checked where
the config is used (``api``, ``engine.preflight``). A config is validated once (``validate()`` again after no change
is free; a changed field is checked again).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .dtypes import DTYPES  # noqa: F401 (the dtypes by name, also importable from here)
from .errors import UserError

OFFLOAD_MODES = ("none", "cpu", "disk")
CHECKPOINT_MODES = ("full", "weights", "none")  # what a run keeps to be resumed (checkpoint.checkpoint_mode)
CHECKPOINT_EVERY_S = 60.0  # seconds between two commits of a run's checkpoint (a resume redoes at most about this)
CALIBRATION_FIELDS = ("calib", "nsamples", "seqlen", "seed")  # how the calibration windows are drawn
CALIBRATION_DEFAULTS = {"calib": "c4", "nsamples": 128, "seqlen": None, "seed": 0}  # seqlen None: 2048, capped


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = None  # None: 0.5, or n/m with ``nm``
    nm: tuple[int, int] | str | None = None  # (n pruned, of m), or "n:m"
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)
    solver_options: dict = field(default_factory=dict)
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per block forward
    compute_dtype: str = "float32"  # dtype of the forward passes; statistics and solves are always fp32
    offload: str = "none"
    skip: tuple[str, ...] | str = ()  # linear names (e.g. "mlp.down_proj") left dense; a comma list as text works
    # calibration windows drawn from these settings (None: CALIBRATION_DEFAULTS); a caller passing the windows
    # themselves (``prune(..., calibration=)``) leaves them unset
    calib: str | None = None  # c4, wikitext2-valid, ptb-valid or a file
    nsamples: int | None = None
    seqlen: int | None = None  # None: 2048, capped at the model's maximum
    seed: int | None = None
    # whether the sparsity was given (not the 0.5 default): set by the first validate(); not a result setting
    sparsity_given: bool | None = None
    reconstruct: str = "none"  # after each block's solve: "none" or "block" (layerprune.reconstruct)
    reconstruct_options: dict = field(default_factory=dict)

    def validate(self) -> PruneConfig:
        """Check every setting and normalise (N:M text to a pair, the sparsity of N:M, skip as a tuple); returns
        self. Bad values raise a one-line UserError naming the flag."""
        key = repr(self._key())
        if getattr(self, "_validated", None) == key:
            return self
        from .solvers.nm import check_nm, parse_nm

        if self.sparsity_given is None:
            self.sparsity_given = self.sparsity is not None
        if isinstance(self.nm, str):
            self.nm = parse_nm(self.nm)
        if self.nm is not None:  # N:M fixes the sparsity: n/m, recorded as such
            n, m = check_nm(tuple(self.nm), 0)
            self.nm = (n, m)
            if self.sparsity is None:
                self.sparsity = n / m
            elif abs(self.sparsity - n / m) > 1e-9:
                raise UserError(f"--sparsity {self.sparsity} conflicts with --nm {n}:{m}, which prunes {n / m:g}: "
                                "drop --sparsity (N:M sets it)")
        if self.sparsity is None:
            self.sparsity = 0.5
        if not (0.0 <= self.sparsity < 1.0):
            raise UserError(f"--sparsity {self.sparsity} is outside [0, 1): use e.g. 0.5 for 50%")
        if self.offload not in OFFLOAD_MODES:
            raise UserError(f"--offload {self.offload!r} is unknown: use one of {', '.join(OFFLOAD_MODES)}")
        if self.compute_dtype not in DTYPES:
            *first, last = DTYPES
            raise UserError(f"--compute-dtype {self.compute_dtype!r} is unknown: use {', '.join(first)} or {last}")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if isinstance(self.skip, str):
            self.skip = tuple(s.strip() for s in self.skip.split(",") if s.strip())
        self.skip = tuple(self.skip)
        if self.nsamples is not None and self.nsamples < 1:
            raise UserError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen {self.seqlen} is too small: use at least 2")
        self._validated = repr(self._key())
        return self

    def _key(self) -> tuple:
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))

    def calibration_settings(self) -> dict:
        """calib/nsamples/seqlen/seed, the defaults filled in (seqlen None: the caller caps 2048 at the model's
        maximum)."""
        given = {k: getattr(self, k) for k in CALIBRATION_FIELDS}
        return {k: CALIBRATION_DEFAULTS[k] if v is None else v for k, v in given.items()}

    def calibration_given(self) -> list[str]:
        return [k for k in CALIBRATION_FIELDS if getattr(self, k) is not None]

    def result_settings(self) -> str:
        """The settings that decide the result, as JSON (offload and batch size do not; the calibration windows are
        fingerprinted themselves): a checkpoint's key."""
        c = asdict(self)
        for k in ("offload", "batch_size", "sparsity_given", *CALIBRATION_FIELDS):
            c.pop(k)
        c["nm"] = list(c["nm"]) if c["nm"] is not None else None
        c["skip"] = list(c["skip"])
        if c["reconstruct"] == "none":  # as before reconstruction existed: the same key for the same result
            del c["reconstruct"], c["reconstruct_options"]
        return json.dumps(c, sort_keys=True, default=str)


@dataclass
class RunConfig:
    """A whole ``layerprune prune`` run: load ``model``, draw the calibration, prune by ``prune``, save to ``out``
    with its record, recipe and model card, and evaluate perplexity before and after (``layerprune.run_prune``)."""

    model: str = "smollm2-135m"  # built-in name, .gguf file, model directory or hub id
    out: str | Path | None = None  # the run directory to write (required)
    prune: PruneConfig = field(default_factory=PruneConfig)
    dtype: str = "float32"  # weights as loaded
    save_dtype: str = "auto"  # auto: the input checkpoint's
    eval: tuple[str, ...] | str = ("wikitext2",)  # datasets evaluated before and after ("" or (): none)
    eval_seqlen: int | None = None  # None: the calibration seqlen
    max_windows: int | None = None  # evaluate only the first N windows
    dense_eval: bool = True  # evaluate the dense model first
    device: str | None = None  # None: cuda when present
    data_dir: str | Path | None = None
    use_cache: bool = True  # the dequantized GGUF cache
    force: bool = False  # replace ``out`` if it holds a layerprune run
    resume: bool = False  # continue an interrupted run in ``out``
    checkpoint: str | None = None  # resume state kept in ``out``: full, weights or none (None: full on a CPU, weights
    # on a GPU; ``checkpoint.checkpoint_mode``)
    checkpoint_every: float = CHECKPOINT_EVERY_S  # seconds between two commits of it (0: after every block)
    progress: bool = True
    command_line: str | None = None  # shown in the model card (the CLI fills it in)
    inputs: tuple = ()  # other local inputs (e.g. the recipe read) that ``out`` must stay apart from
    # a chained run: the step run first, into ``<out>.parent``, whose result is this run's model (``model`` unused)
    parent: RunConfig | None = None
    replays: dict | None = None  # the recipe this run replays: a run in ``out`` holding it is reused as a parent step

    def validate(self) -> RunConfig:
        key = repr(tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "prune"))
        if getattr(self, "_validated", None) != key:
            if self.out is None:
                raise UserError("a run needs an output directory: pass --out DIR (out= in Python)")
            if self.resume and self.force:
                raise UserError("--resume continues the run in --out and --force starts it over: pass one of them")
            for name in ("dtype", "save_dtype"):
                if getattr(self, name) not in (*DTYPES, *(("auto",) if name == "save_dtype" else ())):
                    raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is unknown: use one of "
                                    f"{', '.join(DTYPES)}")
            if isinstance(self.eval, str):
                self.eval = tuple(d.strip() for d in self.eval.split(",") if d.strip())
            self.eval = tuple(self.eval or ())
            if self.max_windows is not None and self.max_windows < 1:
                raise UserError(f"--max-windows {self.max_windows} must be at least 1")
            if not self.checkpoint_every >= 0:
                raise UserError(f"--checkpoint-every {self.checkpoint_every} must be >= 0 seconds (0: after every "
                                "block)")
            if self.checkpoint not in (None, *CHECKPOINT_MODES):
                raise UserError(f"--checkpoint {self.checkpoint!r} is unknown: use one of "
                                f"{', '.join(CHECKPOINT_MODES)}")
            self._validated = repr(tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "prune"))
        self.prune.validate()
        if self.parent is not None:
            self.parent.validate()
        return self

    @classmethod
    def from_settings(cls, **settings) -> RunConfig:
        """A RunConfig from keywords: RunConfig's own fields and PruneConfig's (routed into ``prune``)."""
        own = {f.name for f in fields(cls)} - {"prune"}
        pruning = {f.name for f in fields(PruneConfig)}
        unknown = sorted(set(settings) - own - pruning)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; a run takes {', '.join(sorted(own))} and "
                            f"PruneConfig's {', '.join(sorted(pruning))}")
        return cls(**{k: v for k, v in settings.items() if k in own},
                   prune=PruneConfig(**{k: v for k, v in settings.items() if k in pruning}))
