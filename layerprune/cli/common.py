"""Helpers shared by the sub-commands: the parser and help format, model/device arguments, tables, and the flags
that the method registries declare (``_method_flags`` / ``_method_options``)."""
from __future__ import annotations

import argparse

from layerprune.config import CALIBRATION_DEFAULTS
from layerprune.config import DTYPES as _CONFIG_DTYPES
from layerprune.errors import UserError
from layerprune.registry import Registry, positive_int, resolve

DATA_DIR_HELP = "data directory (default: $LAYERPRUNE_DATA, else ../shared/data when present, else the hub)"
DTYPES = list(_CONFIG_DTYPES)  # the one dtype-by-name map, layerprune.config
_positive = positive_int


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option shows its default once: appended as "(default: X)" unless its help already says it, or there is
    none to show (None, False); examples in the epilog keep their line breaks."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "default" in h.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            return h
        return h + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit 2
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        """As argparse, and a mistyped flag gets "did you mean" with the closest flags of its sub-command."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            parser = sub.choices.get(getattr(namespace, sub.dest, None), self) if sub is not None else self
            parser.error(f"unrecognized arguments: {' '.join(extras)}{did_you_mean(extras, parser)}")
        return namespace

    def parse_known_args(self, args=None, namespace=None):
        """As argparse, and ``namespace.explicit_dests`` lists the options given on the command line (so a recipe
        fills in only the others, even where a flag repeats its default)."""
        namespace = namespace if namespace is not None else argparse.Namespace()
        unset = object()
        pending = [a for a in self._actions if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS
                   and not hasattr(namespace, a.dest)]
        for a in pending:
            setattr(namespace, a.dest, unset)
        namespace, extras = super().parse_known_args(args, namespace)
        given = set()
        for a in pending:
            if getattr(namespace, a.dest) is unset:  # not given: the default, converted as argparse does
                default = a.default
                if isinstance(default, str) and a.type is not None:
                    default = self._get_value(a, default)
                setattr(namespace, a.dest, default)
            else:
                given.add(a.dest)
        namespace.explicit_dests = getattr(namespace, "explicit_dests", set()) | given
        return namespace, extras


def did_you_mean(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """"; did you mean --sparsity?" for the flags among ``extras`` close to one of ``parser``'s."""
    import difflib

    known = [s for s in parser._option_string_actions if s.startswith("--")]
    hints = []
    for x in extras:
        if x.startswith("--"):
            close = difflib.get_close_matches(x.split("=", 1)[0], known, n=2, cutoff=0.7)
            hints += [c for c in close if c not in hints]
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {x}" for x in lines)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weight dtype (bfloat16/float16 mainly for GPUs)")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cuda when present)")
    p.add_argument("--no-cache", action="store_true", help="do not use the dequantized GGUF cache")


def _model_arg(p: argparse.ArgumentParser, help: str) -> None:
    """The model as a positional argument or as --model (prune takes --model; both work everywhere)."""
    p.add_argument("model", nargs="?", default=None, help=help)
    p.add_argument("--model", dest="model_opt", default=None, metavar="MODEL", help="the same as the positional MODEL")


def _model_spec(args) -> str:
    a, b = args.model, getattr(args, "model_opt", None)
    if a and b and a != b:
        raise UserError(f"two models given ({a} and --model {b}): pass one")
    if not (a or b):
        raise UserError("no model given: pass MODEL or --model MODEL (e.g. smollm2-135m or a run directory)")
    args.model = a or b
    return args.model


def _device(name: str | None):
    from layerprune.api import resolve_device

    return resolve_device(name)


def seqlen_type(v: str) -> int:
    """An argparse type: a window length, at least 2 tokens."""
    n = positive_int(v)
    if n < 2:
        raise argparse.ArgumentTypeError(f"{v} is too small: use at least 2")
    return n


def calibration_args(p: argparse.ArgumentParser, *, nsamples: int | None = None, seqlen: int | None = None,
                     what: str = "calibration", seed_flag: str = "--seed") -> None:
    """--calib, --nsamples, --seqlen and --seed (or ``seed_flag``), declared once for every command that draws
    windows from a text pool: the library's defaults (PruneConfig: c4, 128, 2048 capped, 0) unless a command names
    shorter ones, the same checks everywhere."""
    g = p.add_argument_group(f"{what} windows")
    g.add_argument("--calib", default=CALIBRATION_DEFAULTS["calib"],
                   help=f"{what} text: c4 (pool: docs 1000-1999), wikitext2-valid, ptb-valid or a .txt/.jsonl file")
    g.add_argument("--nsamples", type=positive_int, default=nsamples or CALIBRATION_DEFAULTS["nsamples"],
                   help=f"{what} windows drawn from the pool")
    g.add_argument("--seqlen", type=seqlen_type, default=seqlen,
                   help="tokens per window" + (" (default: 2048, capped at the model's maximum)" if seqlen is None
                                                else ""))
    g.add_argument(seed_flag, type=int, default=CALIBRATION_DEFAULTS["seed"], help=f"{what} sampling seed")


def _load(args, to_device: bool = True):
    """The model and tokenizer; on ``--device`` unless ``to_device`` is False (prune keeps the model in CPU RAM and
    moves one block at a time to the device)."""
    from layerprune.models.loading import load_model

    device = _device(args.device)  # checked before the load
    model, tok = load_model(args.model, args.dtype, use_cache=not args.no_cache)
    return (model.to(device) if to_device else model), tok


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in cols]] + [[_fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _eval_all(model, tok, datasets, seqlen, data_dir, max_windows, batch_size, device=None) -> dict:
    from layerprune.api import evaluate_datasets

    return evaluate_datasets(model, tok, datasets, seqlen, data_dir, max_windows, batch_size, device)


def _method_list(registry: Registry, last: str = ", or ") -> str:
    """"a, b, or c (summary)": the registered names (or their ``usage``), for the --method / --allocation help."""
    items = [getattr(cls, "usage", name) + (f" ({cls.summary})" if getattr(cls, "summary", None) else "")
             for name, cls in registry.items()]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + last + items[-1]


def _method_flags(p: argparse.ArgumentParser, registry: Registry) -> None:
    """One flag per option declared by the registry's methods, in a help group named after the methods declaring it
    ("sparsegpt options"; "allocation options" when every method does)."""
    groups = {}
    for flag, (o, owners) in registry.options().items():
        title = f"{registry.kind} options" if len(owners) == len(registry) > 1 else f"{', '.join(owners)} options"
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        if o.type is bool:  # a flag that flips the default
            groups[title].add_argument(flag, dest=o.dest, action="store_true", help=o.help)
        else:
            groups[title].add_argument(flag, dest=o.dest, type=o.type, default=o.default, choices=o.choices,
                                       help=o.help + _keyword_default(o, [registry.get(n) for n in owners]))


def _keyword_default(o, classes) -> str:
    """" (default: X)" for an option whose flag default is None ("the method's own"), X read from the method's
    constructor; "" when the help already says it, or the owners disagree or declare none."""
    import inspect
    import re

    if o.default is not None or "default" in o.help.lower() or re.search(r"\([\d.]+\)$", o.help):  # "... (0.01)"
        return ""
    found = set()
    for cls in classes:
        param = inspect.signature(cls).parameters.get(o.name)
        found.add(None if param is None or param.default is inspect.Parameter.empty else param.default)
    value = found.pop() if len(found) == 1 else None
    return "" if value is None else f" (default: {value})"


def _flag_value(o, args):
    v = getattr(args, o.dest)
    return (not o.default if v else o.default) if o.type is bool else v


def _method_options(registry: Registry, select: str, name: str, args) -> dict:
    """The keyword options of method ``name`` from the parsed flags; a flag that only other methods declare is
    refused when it was given (``select`` is the flag choosing the method, e.g. --method)."""
    cls = registry.get(name)
    mine = {o.cli_flag for o in cls.options}
    for flag, (o, owners) in registry.options().items():
        if flag not in mine and _flag_value(o, args) != o.default:
            raise UserError(f"{flag} needs {select} {' or '.join(owners)}, not {name}")
    return resolve(cls, {o.name: _flag_value(o, args) for o in cls.options})
