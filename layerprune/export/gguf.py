"""Write a model as a GGUF file that llama.cpp runs (``layerprune export RUN --to gguf``), with the ``gguf`` package.

What goes in:
- The weights, named by ``gguf``'s own HF -> GGUF tensor map for the family's llama.cpp architecture (the adapter
  names it: ``Adapter.gguf_target``). Linear weights are taken ``[out, in]`` (GPT-2's Conv1D transposed). Where
  llama.cpp rotates adjacent pairs of a head (llama, granite, deci) and HF rotates its two halves, the q and k rows
  of every head are permuted: row ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and
  ``2i + 1`` (``interleave_heads``), biases alike. A tied output head is left out (llama.cpp reuses the embedding).
- The architecture's metadata (``Adapter.gguf_hparams``). A SlimGPT run with per-block widths becomes llama.cpp's
  ``deci`` architecture: per-layer arrays ``attention.head_count``, ``attention.head_count_kv`` and
  ``feed_forward_length`` (llama-style families only; others are refused before any work). Equal widths in a
  per-block config (one the stock config refused) are written as the family's stock architecture with those widths.
- The tokenizer: copied from the source GGUF when the run came from one (the built-in ``smollm2-135m``); otherwise
  built from the run's ``tokenizer.json`` (byte-level BPE: tokens, token types, merges, special ids), with the
  pre-tokenizer name looked up in ``models/gguf_vocab.PRE_TOKENIZERS`` (an unknown one is refused).
- ``--type``: ``f32`` (all float32), ``f16`` (2-D weights float16, 1-D float32) or ``q8_0`` (2-D weights Q8_0; a
  weight whose rows are not a multiple of 32 stays float16, counted in the returned summary).
- ``--align`` (default 32): a block whose FFN width is not a multiple of it gets zero channels up to the next one
  (zero rows of gate/up and their biases, zero columns of down: the outputs are exactly the same). llama.cpp's fast
  CPU matmul (llamafile's tinyBLAS) runs only when the inner dimension is a multiple of 16 (AVX-512) or 8 (AVX2)
  and falls back to a much slower path otherwise, and Q8_0 needs rows that are a multiple of 32; SlimGPT's widths
  are arbitrary. ``--align 1`` writes the widths as they are. Only families whose FFN SlimGPT resizes (separate
  gate/up/down) are padded; the others keep their model's own widths.
- The ownership mark ``layerprune.written_by = "layerprune"`` as the second key of the file, so ``--force`` replaces
  only a GGUF that layerprune wrote (``outputs.prepare_file``). The file is written beside the target and renamed in
  when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models.gguf_vocab import PRE_TOKENIZERS, TOKENIZER_MODEL
from ..outputs import GGUF_MARK_KEY, MARK, RECORD_NAME, check_free_space, prepare_file, written_by_us

TYPES = ("f32", "f16", "q8_0")

_NORMAL, _CONTROL, _USER, _UNUSED = 1, 3, 4, 5  # llama.cpp token types


def interleave_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from HF's rotary layout (two halves) to adjacent pairs; works on weights and biases."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _source(spec: str) -> tuple[Path | None, dict]:
    """(run directory or None, its run record or {})."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / RECORD_NAME).is_file():
        try:
            return path, json.loads((path / RECORD_NAME).read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path / RECORD_NAME} is not valid JSON: the run is damaged; rerun the prune") from None
    return None, {}


def default_out(spec: str, qtype: str) -> Path | None:
    run, _ = _source(spec)
    return run / f"model-{qtype}.gguf" if run else None


def _source_gguf(spec: str, record: dict) -> Path | None:
    """The GGUF the model came from (built-in name or .gguf path), itself or through the run record."""
    from ..models.loading import BUILTIN, builtin_gguf

    for s in (record.get("model"), spec):
        if isinstance(s, str):
            if s in BUILTIN:
                return builtin_gguf(s)
            if s.lower().endswith(".gguf") and Path(s).expanduser().is_file():
                return Path(s).expanduser()
    return None


def _per_block(config) -> list[tuple[int, int, int]] | None:
    lists = [getattr(config, f, None) for f in ("layer_heads", "layer_kv_heads", "layer_intermediate")]
    return list(zip(*lists)) if all(isinstance(v, list) for v in lists) else None


def _differ(widths) -> bool:
    """Whether per-block widths really differ. A ``layerprune_<type>`` config may hold equal widths that the stock
    config refuses (e.g. gemma3 validates hidden_size % heads although head_dim is decoupled): those go to the
    family's stock architecture, which llama.cpp reads with any head count."""
    return widths is not None and len(set(widths)) > 1


# ----------------------------------------------------------------------------- tokenizer

def _tokenizer_from_gguf(path: Path) -> list[tuple]:
    """The source GGUF's ``tokenizer.*`` keys as (key, value, type, sub type)."""
    from gguf import GGUFReader, GGUFValueType

    out = []
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return out


def _tokenizer_from_json(tok, vocab_size: int) -> list[tuple]:
    """Byte-level BPE tokenizer keys from a fast tokenizer's tokenizer.json."""
    from gguf import GGUFValueType as V

    from ..data.bos import needs_bos

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the run's tokenizer has no tokenizer.json (not a fast tokenizer): GGUF export needs one")
    j = json.loads(backend.to_str())
    kind = j["model"].get("type")
    if kind != "BPE":
        raise UserError(f"the tokenizer is a {kind} model; GGUF export writes byte-level BPE tokenizers only")
    pre = json.dumps(j.get("pre_tokenizer"), sort_keys=True)
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"unknown pre-tokenizer {pre[:120]}: llama.cpp would split text differently; known: "
                        f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))} (add it to PRE_TOKENIZERS)")
    ids = {t: i for t, i in j["model"]["vocab"].items()}
    types = {i: _NORMAL for i in ids.values()}
    for a in j.get("added_tokens", []):
        ids[a["content"]] = a["id"]
        types[a["id"]] = _CONTROL if a.get("special") else _USER
    n = max(ids.values()) + 1
    if n > vocab_size:
        raise UserError(f"the tokenizer has {n} ids but the model's embedding only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for t, i in ids.items():
        tokens[i] = t
    token_types = [types.get(i, _UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"].get("merges", [])]
    out = [("tokenizer.ggml.model", TOKENIZER_MODEL, V.STRING, None),
           ("tokenizer.ggml.pre", PRE_TOKENIZERS[pre], V.STRING, None),
           ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
           ("tokenizer.ggml.token_type", token_types, V.ARRAY, V.INT32),
           ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
           ("tokenizer.ggml.add_bos_token", needs_bos(tok), V.BOOL, None),
           ("tokenizer.ggml.add_eos_token", False, V.BOOL, None)]
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{name}_token_id", None)
        if isinstance(i, int) and 0 <= i < vocab_size:
            out.append((f"tokenizer.ggml.{'padding' if name == 'pad' else 'unknown' if name == 'unk' else name}"
                        "_token_id", i, V.UINT32, None))
    if isinstance(getattr(tok, "chat_template", None), str):
        out.append(("tokenizer.chat_template", tok.chat_template, V.STRING, None))
    return out


# ----------------------------------------------------------------------------- tensors

def ffn_widths(model, adapter, align: int) -> list[tuple[int, int]] | None:
    """Per block (FFN width, width written) with the width rounded up to a multiple of ``align``; None for a family
    whose FFN layout is not padded (see ``--align``)."""
    if not adapter.structured:
        return None
    hd = adapter.geometry(model.config).head_dim
    widths = [adapter.widths(b, hd)[2] for b in adapter.blocks(model)]
    return [(ff, ff + (-ff % max(align, 1))) for ff in widths]


def pad_ffn(sd: dict, prefix: str, adapter, extra: int) -> None:
    """Append ``extra`` zero channels to one block's FFN in ``sd`` (in place): gate/up rows (and biases), down
    columns. The padded channels contribute nothing: their down columns are zero whatever the activation gives."""
    for role in (adapter.gate, adapter.up):
        for kind in ("weight", "bias"):
            key = f"{prefix}.{role}.{kind}"
            if key in sd:
                t = sd[key]
                sd[key] = torch.nn.functional.pad(t, (0, 0, 0, extra) if t.ndim == 2 else (0, extra))
    key = f"{prefix}.{adapter.down}.weight"
    sd[key] = torch.nn.functional.pad(sd[key], (0, extra))


def _tensors(model, adapter, interleave: bool, ffn: list[tuple[int, int]] | None = None):
    """(HF name, [out, in] float32 tensor) for every tensor llama.cpp reads, q/k permuted when ``interleave``, FFN
    channels padded to the widths ``ffn`` gives."""
    sd = {k: v for k, v in model.state_dict().items()}
    hd = adapter.geometry(model.config).head_dim
    for i, block in enumerate(adapter.blocks(model)):
        for name, mod in adapter.linears(block).items():
            sd[f"{adapter.blocks_path}.{i}.{name}.weight"] = adapter.get_weight(mod)
        if ffn and ffn[i][1] > ffn[i][0]:
            pad_ffn(sd, f"{adapter.blocks_path}.{i}", adapter, ffn[i][1] - ffn[i][0])
        if interleave:
            for role in (adapter.q, adapter.k):
                for kind in ("weight", "bias"):
                    key = f"{adapter.blocks_path}.{i}.{role}.{kind}"
                    if key in sd:
                        sd[key] = interleave_heads(sd[key], hd)
    head = adapter.lm_head(model).weight
    if any(e.weight is head or e.weight.data_ptr() == head.data_ptr() for e in adapter.embeddings(model)):
        sd.pop(f"{adapter.lm_head_path}.weight", None)  # tied: llama.cpp reuses token_embd
    for name, t in sd.items():
        yield name, adapter.gguf_tensor(name, t.detach().to("cpu", torch.float32))


def _encode(t: torch.Tensor, qtype: str):
    """(array, GGML type) for one tensor at the requested type."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = t.contiguous().numpy()
    if a.ndim < 2 or qtype == "f32":
        return a.astype(np.float32), Q.F32
    if qtype == "q8_0" and a.shape[-1] % 32 == 0:
        return quantize(a.astype(np.float32), Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), Q.F16


def _bytes_per_param(qtype: str) -> float:
    return {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}[qtype]


# ----------------------------------------------------------------------------- the export

def plan(spec: str, qtype: str = "f16", out=None, force: bool = False, align: int = 32) -> dict:
    """Every check that needs no weights: the type, the family and its llama.cpp architecture, the output path
    (absent, or ours with ``force``). Returns what ``export`` needs."""
    from ..models.adapters import get_adapter
    from ..models.loading import load_skeleton

    if qtype not in TYPES:
        raise UserError(f"unknown --type {qtype!r}: use one of {', '.join(TYPES)}")
    if not isinstance(align, int) or align < 1:
        raise UserError(f"--align {align} should be a positive integer (1: FFN widths as they are)")
    run, record = _source(spec)
    if out is None:
        out = default_out(spec, qtype)
        if out is None:
            raise UserError(f"{spec} is not a run directory: give the output file with --out FILE.gguf")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {out} should end in .gguf")
    src_gguf = _source_gguf(spec, record)
    prepare_file(out, force, inputs=[p for p in (src_gguf, None if run else spec) if p], flag="--out")
    skeleton = load_skeleton(spec)
    target = None
    if skeleton is not None:
        adapter = get_adapter(skeleton)
        target = adapter.gguf_target(skeleton.config, _differ(_per_block(skeleton.config)))
        need = int(sum(p.numel() for p in skeleton.parameters()) * _bytes_per_param(qtype)) + (64 << 20)
        check_free_space(out.parent, need, f"the {qtype} GGUF file")
    return {"spec": spec, "type": qtype, "out": out, "run": run, "record": record, "source_gguf": src_gguf,
            "target": target}


def export(spec: str, qtype: str = "f16", out=None, force: bool = False, model=None, tokenizer=None,
           align: int = 32) -> dict:
    """Write ``spec`` (a run directory or any model ``load_model`` takes) as a GGUF file; returns a summary (path,
    architecture, tensors per type, bytes, FFN channels padded). ``model``/``tokenizer``: an already loaded copy of
    ``spec``; ``align``: FFN widths rounded up to a multiple of it with zero channels (module docstring)."""
    import gguf

    from ..models.adapters import get_adapter
    from ..models.loading import load_model

    p = plan(spec, qtype, out, force, align)
    if model is None:
        model, tokenizer = load_model(spec, "float32")
    adapter = get_adapter(model)
    widths = _per_block(model.config)
    per_block = _differ(widths)
    arch, interleave = adapter.gguf_target(model.config, per_block)
    if p["target"] is None:  # no skeleton was at hand before the load
        need = int(sum(t.numel() for t in model.parameters()) * _bytes_per_param(qtype)) + (64 << 20)
        check_free_space(p["out"].parent, need, f"the {qtype} GGUF file")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    n_blocks = adapter.num_blocks(model)
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    tok_keys = (_tokenizer_from_gguf(p["source_gguf"]) if p["source_gguf"] is not None
                else _tokenizer_from_json(tokenizer, model.config.vocab_size))

    out = p["out"]
    tmp = out.parent / f".{out.name}.layerprune-tmp"
    if tmp.exists() and not written_by_us(tmp):  # a leftover of an interrupted export of ours is replaced
        raise UserError(f"{tmp} exists and layerprune did not write it: move it away and rerun")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, arch)
    w.add_string(GGUF_MARK_KEY, MARK)  # second key, right after general.architecture: outputs.py reads it
    w.add_type("model")
    w.add_name(p["run"].name if p["run"] else Path(spec).name)
    hparams = adapter.gguf_hparams(model.config, widths)
    ffn = ffn_widths(model, adapter, align)
    if ffn is not None:
        written = [b for _, b in ffn]
        hparams[gguf.Keys.LLM.FEED_FORWARD_LENGTH] = written if per_block else written[0]
    for key, value in hparams.items():
        key = key.format(arch=arch)
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(ftype)
    if qtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_keys:
        w.add_key_value(key, value, vtype, sub_type=sub)

    counts: dict[str, int] = {}
    tensors = (list(_tensors(model, adapter, interleave, ffn))
               + list(adapter.gguf_extra_tensors(model.config).items()))
    for hf_name, t in tensors:
        name = hf_name if hf_name.startswith("rope_freqs") else names.get_name(hf_name, try_suffixes=(".weight",
                                                                                                      ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no name in llama.cpp's {arch} architecture; this model cannot "
                            "be exported")
        data, dtype = _encode(t, qtype)
        counts[dtype.name] = counts.get(dtype.name, 0) + 1
        w.add_tensor(name, data, raw_dtype=dtype if dtype == gguf.GGMLQuantizationType.Q8_0 else None)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"out": str(out), "type": qtype, "architecture": arch, "per_block_widths": per_block,
            "tensors": counts, "bytes": out.stat().st_size, "align": align,
            "ffn_channels_padded": sum(b - a for a, b in ffn or []),
            "tokenizer": "copied from " + p["source_gguf"].name if p["source_gguf"] else "built from tokenizer.json"}
