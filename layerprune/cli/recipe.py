"""``recipe.yaml``, read: ``layerprune prune --recipe FILE --out DIR`` fills the prune flags from the recipe that every
run directory holds (written by ``layerprune.recipe`` from the run's config).

``LAYOUT`` places the core flags (by argparse dest) in the recipe's sections; the chosen method's and allocation's
declared options (layerprune.registry) fill ``solver_options`` and ``allocation_options`` by option name. Values are
checked against the flag's own type and choices. Flags given on the command line win over the recipe; ``--out``,
``--force``, ``--resume``, ``--checkpoint``, ``--data-dir``, ``--device`` and ``--no-cache`` are never part of a recipe
(where and how a run is written or computed, not what it computes).

Chained runs: a run whose ``--model`` was another run directory stores that run's recipe under ``parent`` (nested for
longer chains). ``--recipe`` with a parent first replays the parent into ``OUT.parent`` (kept, reused when it already
holds that recipe's run) and prunes that, so one recipe reproduces every step; ``--model`` on the command line skips
the replay and prunes the given model instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from layerprune.errors import UserError
from layerprune.recipe import FORMAT
from layerprune.registry import Registry

# section (None: top level) -> {recipe key: argparse dest of the prune parser}
LAYOUT: dict[str | None, dict[str, str]] = {
    None: {"model": "model", "dtype": "dtype", "method": "method", "sparsity": "sparsity", "nm": "nm",
           "allocation": "allocation", "skip": "skip", "reconstruct": "reconstruct"},
    "calibration": {"calib": "calib", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"},
    "compute": {"compute_dtype": "compute_dtype", "batch_size": "batch_size", "offload": "offload",
                "true_sequential": "true_sequential"},
    "eval": {"datasets": "eval", "seqlen": "eval_seqlen", "max_windows": "max_windows",
             "no_dense_eval": "no_dense_eval"},
    "save": {"dtype": "save_dtype"},
}
OPTION_SECTIONS = {"solver_options": "method", "allocation_options": "allocation",  # section -> the key choosing it
                   "reconstruct_options": "reconstruct"}
NOT_RECORDED = {"out", "force", "resume", "checkpoint", "checkpoint_every", "recipe", "data_dir", "device", "no_cache",
                "help"}


def _method_name(spec) -> str:
    return str(spec).strip().partition(":")[0].lower()


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def core_dests() -> set[str]:
    return {d for sec in LAYOUT.values() for d in sec.values()}


def _where(section, key) -> str:
    return f"{section}.{key}" if section else key


def parent_of(path) -> dict | None:
    """The ``parent`` recipe of a chained recipe (checked to be a recipe itself), or None."""
    parent = load(path).get("parent")
    if parent is None:
        return None
    if not isinstance(parent, dict) or parent.get("layerprune_recipe") != FORMAT:
        raise UserError(f"--recipe {path}: parent must be the recipe of the step before (a mapping starting with "
                        f"'layerprune_recipe: {FORMAT}'), got {str(parent)[:80]!r}")
    return parent


# --- reading ------------------------------------------------------------------------------------------------------
def load(path) -> dict:
    """The recipe file as a mapping; any problem is one line naming the file."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--recipe {path}: no such file: pass the recipe.yaml of a prune run")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--recipe {path} is not UTF-8 text: pass the recipe.yaml of a prune run") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"--recipe {path} is not valid YAML ({what}{where}): fix that line") from None
    if not isinstance(data, dict) or data.get("layerprune_recipe") != FORMAT:
        raise UserError(f"--recipe {path} is not a layerprune recipe (its first key must be "
                        f"'layerprune_recipe: {FORMAT}'): pass the recipe.yaml of a prune run")
    return data


def _coerce(action: argparse.Action, value, where: str, path) -> object:
    """``value`` checked against the flag's type and choices (the recipe holds parsed values, not flag text)."""
    bad = lambda why: UserError(f"--recipe {path}: {where}: {why}")  # noqa: E731
    if value is None:
        if action.default is None:
            return None
        raise bad(f"null is not allowed: give a value (default {action.default!r})")
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)):
        raise bad(f"expected a single value, got a {type(value).__name__}")
    if action.type is None:
        if not isinstance(value, str):
            raise bad(f"expected text, got {value!r}: put the value in quotes (YAML reads an unquoted 2:4 as the "
                      "number 124)")
        converted = value
    else:
        try:
            converted = action.type(str(value)) if not isinstance(value, bool) else None
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise bad(f"{value!r} is not valid ({e})") from None
        kind = getattr(action.type, "__name__", "value")
        if converted is None or (not isinstance(value, type(converted))
                                 and not (isinstance(converted, float) and isinstance(value, int))):
            raise bad(f"expected a {kind} value, got {value!r}")
    if action.choices is not None and converted not in action.choices:
        raise bad(f"{converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def apply(path, args, parser: argparse.ArgumentParser, registries: dict[str, Registry]) -> None:
    """Fill ``args`` from the recipe at ``path``: every setting not given on the command line. Unknown keys, wrong
    types and unregistered methods are refused with one line naming the key, before any model is loaded."""
    recipe = load(path)
    actions = _actions(parser)
    explicit = getattr(args, "explicit_dests", set())
    known = ({k for k in LAYOUT[None]} | {s for s in LAYOUT if s} | set(OPTION_SECTIONS)
             | {"layerprune_recipe", "parent"})
    for key in recipe:
        if key not in known:
            raise UserError(f"--recipe {path}: unknown key {key!r}: remove it (known keys: {', '.join(sorted(known))})")
    chosen = {}
    for section, keys in LAYOUT.items():
        block = recipe if section is None else recipe.get(section, {})
        if not isinstance(block, dict):
            raise UserError(f"--recipe {path}: {section} must be a mapping of keys to values, got {block!r}")
        if section is not None:
            unknown = sorted(set(block) - set(keys))
            if unknown:
                raise UserError(f"--recipe {path}: unknown key {section}.{unknown[0]}: remove it (known in {section}: "
                                f"{', '.join(keys)})")
        for key, dest in keys.items():
            if key in block:
                value = _coerce(actions[dest], block[key], _where(section, key), path)
                if dest not in explicit:
                    setattr(args, dest, value)
                chosen[key] = value
    for section, chooser in OPTION_SECTIONS.items():
        registry = registries[section]
        given = getattr(args, LAYOUT[None][chooser])
        name = _method_name(given)
        if chooser in chosen:  # the recipe's method must be registered, even when a flag overrides it
            try:
                registry.get(_method_name(chosen[chooser]))
            except UserError as e:
                raise UserError(f"--recipe {path}: {chooser}: {e}") from None
        opts = recipe.get(section, {})
        if not isinstance(opts, dict):
            raise UserError(f"--recipe {path}: {section} must be a mapping of option names to values, got {opts!r}")
        if chooser in chosen and _method_name(chosen[chooser]) != name:
            continue  # the command line chose another method: the recipe's options were the other one's
        declared = {o.name: o for o in registry.get(name).options}
        for key, value in opts.items():
            o = declared.get(key)
            if o is None:
                raise UserError(f"--recipe {path}: {section}.{key}: {registry.kind} {name!r} has no option {key!r}; "
                                f"remove it (its options: {', '.join(declared) or 'none'})")
            action = actions[o.dest]
            if o.type is bool:
                if not isinstance(value, bool):
                    raise UserError(f"--recipe {path}: {section}.{key}: expected true or false, got {value!r}")
                flag_value = value != o.default
            else:
                flag_value = _coerce(action, value, f"{section}.{key}", path)
            if o.dest not in explicit:
                setattr(args, o.dest, flag_value)
