"""``recipe.yaml``, written: the settings of a prune run that decide its result, from its ``RunConfig``.

Read back by ``layerprune prune --recipe FILE --out DIR`` (``cli/recipe.py``, whose ``LAYOUT`` maps these keys to the
prune flags). The chosen method's and allocation's declared options (layerprune.registry) fill ``solver_options`` and
``allocation_options`` by option name, so a new solver's options appear in recipes without a change here. Where and
how a run is written or computed (out, force, resume, data directory, device, cache) is never part of a recipe.
"""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig

RECIPE_NAME = "recipe.yaml"
FORMAT = 1  # the value of the recipe's first key, ``layerprune_recipe``
HEADER = ("# layerprune recipe: the settings that decide this run's result.\n"
          "# Rerun it: layerprune prune --recipe recipe.yaml --out DIR  (flags given on the command line override\n"
          "# these values; --out, --data-dir and --device are never taken from a recipe)\n")


def _declared(registry, spec: str, options: dict) -> dict:
    """Every option the method declares, as the flag would hold it (its default when the run did not set it)."""
    cls = registry.get(str(spec).strip().partition(":")[0].lower())
    return {o.name: options.get(o.name, o.default) for o in cls.options}


def build_recipe(run: RunConfig, resolved: dict, parent: dict | None = None) -> dict:
    """The recipe of a validated run, in the layout of ``cli/recipe.LAYOUT``. ``resolved``: the values the run really
    used where the config left them to be decided later (model path, seqlen and eval seqlen capped by the model,
    the save dtype; ``sparsity`` None for a run that had none, e.g. depth's ``drop``). ``parent``: the recipe of the
    run this one pruned further (its model was a run directory), kept whole under ``parent`` so one recipe replays
    every step (``cli/recipe.parent_of``)."""
    from .allocation import ALLOCATORS
    from .reconstruct import RECONSTRUCTORS
    from .solvers import SOLVER_REGISTRY

    cfg = run.prune
    calib = cfg.calibration_settings()
    recipe = {
        "layerprune_recipe": FORMAT, "model": resolved["model"], "dtype": run.dtype, "method": cfg.method,
        "sparsity": resolved.get("sparsity", None if cfg.nm else cfg.sparsity),
        "nm": f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else None,
        "allocation": inline_user_file(cfg.allocation), "skip": ",".join(cfg.skip) or None,
        "reconstruct": cfg.reconstruct,
        "solver_options": _declared(SOLVER_REGISTRY, cfg.method, cfg.solver_options),
        "allocation_options": _declared(ALLOCATORS, cfg.allocation, cfg.allocation_options),
        "reconstruct_options": _declared(RECONSTRUCTORS, cfg.reconstruct, cfg.reconstruct_options),
        "calibration": {"calib": calib["calib"], "nsamples": calib["nsamples"], "seqlen": resolved["seqlen"],
                        "seed": calib["seed"]},
        "compute": {"compute_dtype": cfg.compute_dtype, "batch_size": cfg.batch_size, "offload": cfg.offload,
                    "true_sequential": cfg.true_sequential},
        "eval": {"datasets": ",".join(run.eval), "seqlen": resolved["eval_seqlen"], "max_windows": run.max_windows,
                 "no_dense_eval": not run.dense_eval},
        "save": {"dtype": resolved["save_dtype"]},
    }
    if parent is not None:
        recipe["parent"] = parent
    return recipe


def run_recipe(run_dir) -> dict | None:
    """The recipe a run directory holds (its ``recipe.yaml``), or None (a run made through the Python API)."""
    import yaml

    p = Path(run_dir).expanduser() / RECIPE_NAME
    return yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None


def dump(recipe: dict) -> str:
    import yaml

    return HEADER + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, allow_unicode=True)


def model_path(spec: str) -> str:
    """A local model path made absolute for the recipe (a recipe replays from any directory); names stay as given."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def inline_user_file(spec: str) -> str:
    """``user:FILE.json`` becomes ``user:0.4,0.5,...`` in the recipe, so the recipe holds the sparsities themselves."""
    from .allocation import split_spec
    from .allocation.user import parse_sparsities

    name, arg = split_spec(spec)
    if name == "user" and arg and Path(arg).is_file():
        return "user:" + ",".join(repr(v) for v in parse_sparsities(arg))
    return spec
