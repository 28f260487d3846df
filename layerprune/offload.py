"""Where idle decoder blocks live while the engine prunes one block at a time.

The engine calls three methods on a block store::

    store.onload(model, i, device)   # block i's weights become real tensors on `device`
    store.offload(model, i)          # block i is done (maybe modified): take it off the device
    store.save_pretrained(model, out_dir)

``MemoryStore`` keeps the whole model in CPU RAM and moves a block to the device and back.
``DiskStore`` keeps idle blocks on disk: the model is built on the meta device, only the non-block
tensors (embeddings, final norm, output head) are real, and block ``i`` is read from safetensors when it is
onloaded and written to ``<work_dir>/block_{i:04d}.safetensors`` when it is offloaded, so RAM holds
about one block at a time. Its ``save_pretrained`` streams a sharded checkpoint (one shard per block)
that stock ``AutoModelForCausalLM.from_pretrained`` loads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import resource
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import UserError
from .models.adapters import get_adapter
from .passes import cast
from .models.loading import BUILTIN, builtin_gguf, cache_ok, check_complete, checkpoint_dtype, gguf_cache_dir, \
    keep_use_cache, load_gguf, parse_dtype

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


class BlockStore(Protocol):
    def onload(self, model, i: int, device) -> None: ...
    def offload(self, model, i: int) -> None: ...
    def save_pretrained(self, model, out_dir: Path, **kw) -> None: ...


# --- RSS helpers (for benchmarks) ---------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process, in MiB (VmRSS from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Block-sized tensors fall under glibc's (self-raising) mmap threshold, so after many onload/offload
    cycles freed blocks stay in the heap and RSS creeps up by a few MiB per block without this."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


# --- in-memory store ----------------------------------------------------------------------

class MemoryStore:
    """The whole model stays where it is (CPU RAM for the CLI); a block visits the device while it is pruned and
    goes back where it came from."""

    def __init__(self):
        self.home: dict[int, torch.device] = {}

    def onload(self, model, i: int, device) -> None:
        block = get_adapter(model).blocks(model)[i]
        self.home.setdefault(i, next(block.parameters()).device)
        block.to(device)

    def offload(self, model, i: int) -> None:
        get_adapter(model).blocks(model)[i].to(self.home.pop(i, torch.device("cpu")))

    def save_pretrained(self, model, out_dir: Path, **kw) -> None:
        model.save_pretrained(out_dir, **kw)


# --- tensor plumbing ----------------------------------------------------------------------

def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted, relative to ``root``) by ``tensor``."""
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        old = mod._parameters[attr]
        grad = old is not None and old.requires_grad and tensor.is_floating_point()
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=grad)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(name)


def _move_real_buffers(block: nn.Module, device) -> None:
    """Move the buffers that are not on the meta device (the non-persistent ones) to ``device``."""
    for mod in block.modules():
        for k, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)


def _is_real(block: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in block.state_dict().values())


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file holding it, for a single-file or sharded checkpoint."""
    from safetensors import SafetensorError

    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index} is corrupt: re-save or re-download the model") from None
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {k: single for k in f.keys()}
        except SafetensorError as e:
            raise UserError(f"{single} is corrupt or truncated ({str(e)[:100]}): re-save or re-download "
                            "the model") from None
    raise UserError(f"{folder} holds no model.safetensors or {INDEX_NAME}: disk offload needs safetensors "
                    "weights (re-save the model with save_pretrained)")


# safetensors dtype codes -> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file with plain reads into fresh CPU tensors.

    The format is: 8-byte little-endian header length, a JSON header ``{key: {dtype, shape,
    data_offsets}}``, then the raw bytes. ``safe_open`` would memory-map the file instead, so every page
    read counts in RSS on top of the copy until the map is closed; plain reads cost only the tensor."""
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (ValueError, MemoryError, OverflowError):
            raise UserError(f"{path} is corrupt or truncated (unreadable safetensors header): re-save or "
                            "re-download the model") from None
        out = {}
        for k in (keys if keys is not None else [k for k in header if k != "__metadata__"]):
            meta = header[k]
            start, end = meta["data_offsets"]
            t = torch.empty(meta["shape"], dtype=ST_DTYPES[meta["dtype"]])
            f.seek(8 + n + start)
            if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - start:
                raise UserError(f"{path} is truncated (tensor {k}); re-save or re-download the model")
            out[k] = t
    return out


def _read(where: dict[str, tuple[Path, str]], names: list[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` (model keys) from their files, opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(where[n][0], []).append(n)
    out = {}
    for path, keys in by_file.items():
        got = read_safetensors(path, [where[n][1] for n in keys])
        out.update({n: got[where[n][1]] for n in keys})
    return out


def _header(path: Path) -> dict[str, dict]:
    """Key -> {dtype, shape, data_offsets} of every tensor in a safetensors file (its header alone)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _shard_sizes(path: Path) -> dict[str, int]:
    """Key -> byte size of every tensor in a safetensors file, from its header alone."""
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(path).items()}


# --- disk store ---------------------------------------------------------------------------

class DiskStore:
    """Idle blocks live in safetensors files; RAM holds the non-block tensors plus about one block.

    ``where`` maps every model state_dict key to ``(file, key in that file)`` in the source checkpoint.
    A block that was offloaded once is read from its own file in ``work_dir`` instead.
    """

    def __init__(self, model, where: dict[str, tuple[Path, str]], dtype: torch.dtype,
                 work_dir: Path | None = None):
        self.adapter = get_adapter(model)
        self._n_blocks = len(self.adapter.blocks(model))
        self.where = where
        self.dtype = dtype
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="layerprune-blocks-")  # removed with the store
            work_dir = Path(self._tmp.name)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.modified: set[int] = set()
        self.run_dir: Path | None = None  # see bind()
        self.save_dtype: torch.dtype | None = None

    @property
    def persists(self) -> bool:
        """Offloaded blocks are final shards of the run directory (the engine's checkpoint then keeps no copy)."""
        return self.run_dir is not None

    def bind(self, run_dir: Path, save_dtype: torch.dtype) -> None:
        """Write every offloaded block straight into ``run_dir`` as its final shard (``model-<i+2>-of-<n>``, keys as
        in the checkpoint, floats in ``save_dtype``): the run needs no second copy of the model on disk, and the
        shards are the resume state. Blocks whose shard is already there (an interrupted run) count as done."""
        self.run_dir, self.save_dtype = Path(run_dir), save_dtype
        self.work_dir = self.run_dir
        self.modified |= {i for i in range(self._n_blocks) if self.block_file(i).is_file()}

    def restart_at(self, n: int) -> None:
        """Blocks n.. are read from the source again (their shards, if any, are from an uncommitted step)."""
        self.modified = {i for i in self.modified if i < n}

    def prefix(self, i: int) -> str:
        return f"{self.adapter.blocks_path}.{i}."

    def shard_name(self, k: int) -> str:
        """The k-th shard (1-based) of the saved run: 1 holds the non-block tensors, k = i + 2 holds block i."""
        n = self._n_blocks + 1
        return f"model-{k:05d}-of-{n:05d}.safetensors"

    def block_file(self, i: int) -> Path:
        if self.persists:
            return self.run_dir / self.shard_name(i + 2)
        return self.work_dir / f"block_{i:04d}.safetensors"

    def read_block(self, model, i: int, device="cpu") -> dict[str, torch.Tensor]:
        """Block i's tensors (keys relative to the block) as owned tensors on ``device``."""
        if i in self.modified:
            p = self.prefix(i) if self.persists else ""
            return {k[len(p):]: cast(t, device, self.dtype) for k, t in read_safetensors(self.block_file(i)).items()}
        p = self.prefix(i)
        block = self.adapter.blocks(model)[i]
        names = [p + k for k in block.state_dict()]
        return {n[len(p):]: cast(t, device, self.dtype) for n, t in _read(self.where, names).items()}

    def block_shapes(self, i: int) -> dict[str, torch.Tensor]:
        """Block i as offload() wrote it (keys relative to the block): meta tensors of its stored shapes and dtypes,
        from the file's header alone (e.g. the widths of a structurally pruned block, on resume)."""
        p = self.prefix(i) if self.persists else ""
        return {k[len(p):]: torch.empty(v["shape"], dtype=ST_DTYPES[v["dtype"]], device="meta")
                for k, v in _header(self.block_file(i)).items()}

    def onload(self, model, i: int, device) -> None:
        block = self.adapter.blocks(model)[i]
        for k, t in self.read_block(model, i, device).items():
            _set_tensor(block, k, t)
        _move_real_buffers(block, device)

    def offload(self, model, i: int) -> None:
        block = self.adapter.blocks(model)[i]
        state = block.state_dict()
        if any(t.device.type == "meta" for t in state.values()):
            raise RuntimeError(f"block {i} is not onloaded, so there is nothing to offload")
        tmp = self.block_file(i).with_suffix(".tmp")
        if self.persists:  # the final shard: full keys, the saved dtype
            tensors = {self.prefix(i) + k: (t.to(self.save_dtype) if t.is_floating_point() else t).detach()
                       .contiguous().cpu() for k, t in state.items()}
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            save_file({k: t.detach().contiguous().cpu() for k, t in state.items()}, tmp)
        tmp.replace(self.block_file(i))
        self.modified.add(i)
        for k, t in state.items():
            _set_tensor(block, k, t.detach().to("meta"))
        _move_real_buffers(block, "cpu")
        del state
        release_free_memory()

    def drop(self, model, i: int) -> None:
        """Take block i off the device without writing it (another process stores the run: distributed pruning)."""
        block = self.adapter.blocks(model)[i]
        for k, t in block.state_dict().items():
            _set_tensor(block, k, t.detach().to("meta"))
        _move_real_buffers(block, "cpu")
        release_free_memory()

    def measure_sparsity(self, model) -> dict:
        """``models.info.measure_sparsity`` of the stored model, one block in memory at a time (no full load)."""
        per_block, per_layer, zeros_all, numel_all = [], {}, 0, 0
        names = self.adapter.linear_names()
        for i, block in enumerate(self.adapter.blocks(model)):
            local = block.state_dict() if _is_real(block) else self.read_block(model, i)
            zb = nb = 0
            for name in names:
                w = local[f"{name}.weight"]
                z, n = int((w == 0).sum()), w.numel()
                per_layer[f"{i}.{name}"] = z / n
                zb, nb = zb + z, nb + n
            del local
            per_block.append(zb / nb)
            zeros_all, numel_all = zeros_all + zb, numel_all + nb
        return {"overall": zeros_all / numel_all, "per_block": per_block, "per_layer": per_layer,
                "prunable_params": numel_all}

    def save_pretrained(self, model, out_dir: Path, dtype: torch.dtype | None = None, **kw) -> None:
        """Write a sharded checkpoint, one block at a time: shard 1 holds the non-block tensors, shard
        i+2 holds block i; floating tensors cast to ``dtype`` when given. Extra keyword arguments of
        ``PreTrainedModel.save_pretrained`` are ignored."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        blocks = self.adapter.blocks(model)
        shard = self.shard_name
        # shards already written in place by offload() (same folder, same dtype) are kept as they are
        in_place = {i for i in self.modified if self.persists and out_dir.resolve() == self.run_dir.resolve()
                    and (dtype is None or dtype == self.save_dtype)}
        keep = {shard(i + 2) for i in in_place}
        for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:  # stale shards, as HF does
            if old.name not in keep:
                old.unlink(missing_ok=True)

        state = model.state_dict()
        head = {k: t for k, t in state.items() if not k.startswith(self.adapter.blocks_path + ".")}
        for target, source in getattr(model, "all_tied_weights_keys", {}).items():
            if target in head and source in head and head[target].data_ptr() == head[source].data_ptr():
                del head[target]  # a tied weight is stored once, like save_pretrained does
        weight_map, total = {}, 0

        def write(k_shard: int, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            tensors = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
                       .detach().contiguous().cpu()
                       for k, t in tensors.items()}
            save_file(tensors, out_dir / shard(k_shard), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = shard(k_shard)
                total += t.numel() * t.element_size()

        write(1, head)
        del state, head
        for i, block in enumerate(blocks):
            if i in in_place and not _is_real(block):
                for k, nbytes in _shard_sizes(self.block_file(i)).items():
                    weight_map[k] = shard(i + 2)
                    total += nbytes
                continue
            local = block.state_dict() if _is_real(block) else self.read_block(model, i)
            write(i + 2, {self.prefix(i) + k: t for k, t in local.items()})
            del local
            release_free_memory()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)


# --- lazy loading -------------------------------------------------------------------------

def _gguf_cache_dir(gguf: Path, dtype: torch.dtype) -> Path | None:
    """The dequantized cache folder ``load_gguf`` wrote for this GGUF file (same dtype first, then
    float32, then any), if one exists and passes its manifest check."""
    want = gguf_cache_dir(gguf, dtype)
    root, sha = want.parent, want.name.split("-")[0]
    names = [want.name, f"{sha}-float32"] + sorted(p.name for p in root.glob(f"{sha}-*"))
    for name in dict.fromkeys(names):
        if (root / name).is_dir() and cache_ok(root / name):
            return root / name
    return None


def _has_safetensors(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / INDEX_NAME).is_file())


def resolve_safetensors_dir(spec: str | Path, dtype: str | torch.dtype = "float32") -> Path | None:
    """A local folder with config.json + safetensors weights for a model spec, or None.

    Built-in names and GGUF files resolve to their dequantized cache folder (created by
    ``load_model``); a directory resolves to itself; a hub id to its snapshot in the local HF cache.
    """
    dtype = parse_dtype(dtype)
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in BUILTIN:
        return _gguf_cache_dir(builtin_gguf(spec), dtype)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_cache_dir(path, dtype)
    if path.is_dir():
        return path if _has_safetensors(path) else None
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not a hub id, or not in the local cache
        return None
    return folder if _has_safetensors(folder) else None


def _source_dir(source: str | Path, dtype: torch.dtype) -> Path:
    if Path(source).expanduser().is_dir():
        check_complete(Path(source).expanduser())
    folder = resolve_safetensors_dir(source, dtype)
    if folder is not None:
        return folder
    spec = str(source)
    gguf = builtin_gguf(spec) if spec in BUILTIN else Path(spec).expanduser()
    if gguf.is_file() and gguf.suffix.lower() == ".gguf":
        log.warning("no dequantized cache for %s yet: building it with a full in-memory load (once)", spec)
        load_gguf(gguf, torch.float32)  # writes the cache folder; the model is dropped right away
        folder = resolve_safetensors_dir(source, dtype)
        if folder is not None:
            return folder
    raise UserError(f"disk offload needs a local model folder with safetensors weights and {spec} gives none; "
                    "pass a model directory, a GGUF file or a built-in name (or use --offload none)")


def load_model_lazy(source: str | Path, dtype: str | torch.dtype = "float32", work_dir: Path | None = None):
    """Return ``(model, tokenizer, DiskStore)`` with only the non-block tensors in RAM.

    The model is built with parameters on the meta device (buffers, such as rotary ``inv_freq``, are
    computed on CPU by the modules' own constructors); embeddings, final norm and output head are read from
    the checkpoint and cast to ``dtype``; tied weights are re-tied. Blocks stay on meta until onloaded.
    The tokenizer is None when the folder has none.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    folder = _source_dir(source, dtype)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)

    files = _tensor_files(folder)
    want = list(model.state_dict())
    where, prefix = {}, model.base_model_prefix + "."
    for k in want:  # checkpoints may store keys without the base-model prefix (e.g. GPT-2 "h.0.")
        alt = k.removeprefix(prefix)
        if k in files or alt in files:
            src = k if k in files else alt
            where[k] = (files[src], src)
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    missing = [k for k in want if k not in where and k not in tied]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} weights the model needs (e.g. {missing[0]}); "
                        "the checkpoint does not match its config.json")

    in_block = lambda k: k.startswith(adapter.blocks_path + ".")  # noqa: E731
    for k, t in _read(where, [k for k in want if k in where and not in_block(k)]).items():
        _set_tensor(model, k, cast(t, "cpu", dtype))
    model.tie_weights()
    left = [k for k, t in model.state_dict().items() if t.device.type == "meta" and not in_block(k)]
    if left:
        raise UserError(f"{folder}: weight {left[0]} was not found in the checkpoint; re-save the model "
                        "with save_pretrained")
    release_free_memory()
    model.eval()
    keep_use_cache(model)
    tok = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder)
    model.layerprune_source_dtype = checkpoint_dtype(folder) if Path(str(source)).expanduser().is_dir() else None
    return model, tok, DiskStore(model, where, dtype, work_dir)


def run_disk_need(model, nsamples: int, seqlen: int, act_dtype, offload: str) -> int:
    """Peak bytes a prune run writes under --out.

    Under --out: the checkpoint (every pruned block, plus the latest and the next block inputs while the latter is
    written) and the saved run (the model once more). With --offload disk the pruned blocks are the saved run's shards
    (no second copy), plus the disk-offloaded activation buffers (two)."""
    size = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731 (meta tensors too)
    model_bytes = size(model.parameters())
    block_bytes = sum(size(b.parameters()) for b in get_adapter(model).blocks(model))
    acts = nsamples * seqlen * model.config.hidden_size * torch.empty((), dtype=act_dtype).element_size()
    if offload == "disk":  # pruned blocks are written once, as the run's own shards (DiskStore.bind)
        return model_bytes + 4 * acts
    return block_bytes + 2 * acts + model_bytes
