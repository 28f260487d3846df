"""``run_federated(config) -> dict``: build the model and client shards, run FedLP on Flower's
simulation engine, evaluate the global model after every round, write JSON + a PNG plot.

The global model is evaluated on the server (PPL on WikiText-2 test and the C4 evaluation documents,
``eval_windows`` non-overlapping windows of ``eval_seqlen`` tokens). Communication is the measured
serialized size of every ArrayRecord sent and received (see ``accounting.record_bytes``), per client
per round, next to what FedAvg would have moved for the same clients (full download + full upload).
Tensors travel as float32 (numpy has no bfloat16), so the model is converted to float32 first.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, MetricRecord
from ..progress import tqdm

from ..data.bos import bos_id
from ..errors import UserError
from ..models.adapters import get_adapter
from .accounting import unit_params
from .apps import make_client_app, make_server_app
from .depth import depth_levels, depth_probs, draw_depths, layout_of, shared_state
from .partition import dirichlet_shards, iid_shards
from .strategy import SCHEMES, FedLPStrategy, fixed_masks, masked_sparsity


@dataclass
class FedConfig:
    model: str = "smollm2-135m"       # spec for layerprune.models.loading.load_model
    scheme: str = "homo"            # fedavg | homo | hetero
    keep_prob: float = 0.5          # homo: layer-preserving rate p
    clients: int = 8
    fraction: float = 1.0           # fraction of clients sampled per round
    rounds: int = 10
    local_steps: int = 4            # AdamW steps per client per round
    batch_size: int = 2
    seqlen: int = 128
    lr: float = 1e-4
    lora_rank: int = 0              # > 0: FedLP over LoRA adapters of this rank (base frozen, never sent);
    #                                 0: full weights
    lora_alpha: float | None = None  # LoRA alpha (scale alpha / rank); default 2 x rank
    weighted: bool = True           # False: the paper's unweighted per-layer mean
    depth_flag: int | None = None   # hetero: level with P = 0.6 (1-based); None = uniform
    n_levels: int = 5               # hetero: number of depth levels
    personal_heads: bool | None = None  # hetero: shallow clients keep a personal exit (None: on for hetero)
    head_steps: int | None = None   # LoRA personal heads: steps fitting a new head alone first (None: local_steps)
    personal_head: str = "translator"  # LoRA personal heads: translator (d x d after block c) | head-lora
    partition: str = "iid"          # iid (C4 pool) | dirichlet (C4 / WikiText-2 valid / PTB valid)
    alpha: float = 1.0
    docs_per_client: int = 50
    max_client_tokens: int = 20_000
    eval_seqlen: int = 256
    eval_windows: int | None = 8
    eval_sets: tuple[str, ...] = ("wikitext2", "c4")
    data_dir: str | None = None
    masks: str = "auto"             # auto (fixed masks when block weights are >= 1% zero) | on | off
    num_blocks: int | None = None   # keep only the first N blocks of the loaded model
    fail_clients: tuple[int, ...] = ()  # partitions whose ClientApp raises (robustness demo / CI)
    round_timeout: float = 3600.0
    seed: int = 0
    threads: int = 1                # torch threads per client
    client_cpus: float = 1.0        # Ray resources per client (simulation)
    sim_cpus: int | None = None     # CPUs the simulation may use (clients at a time = sim_cpus / client_cpus);
    #                                 None: all
    save_dir: str | None = None     # LoRA: write the merged global model (mask kept) here as a run directory
    force: bool = False             # replace a layerprune run at save_dir
    out_dir: str | None = None
    name: str | None = None         # output file stem (default fed_<scheme>)
    progress: bool = True
    verbose: bool = False           # Flower's DEBUG log lines

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown --scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")
        if self.partition not in ("iid", "dirichlet"):
            raise UserError(f"unknown --partition {self.partition!r}: use iid or dirichlet")
        if self.clients < 1 or self.rounds < 1:
            raise UserError("--clients and --rounds must be at least 1")
        if self.masks not in ("auto", "on", "off"):
            raise UserError(f"--masks {self.masks!r}: use auto, on or off")
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank {self.lora_rank} must be 0 (full weights) or a positive rank")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha {self.lora_alpha} must be positive")
        if self.save_dir and not self.lora_rank:
            raise UserError("--save writes the merged LoRA model: give --lora-rank too")
        if self.fraction <= 0 or self.fraction > 1:
            raise UserError(f"--fraction {self.fraction} must be in (0, 1]")
        if self.depth_flag is not None and not 1 <= int(self.depth_flag) <= self.n_levels:
            raise UserError(f"--depth-flag {self.depth_flag} is not a depth level: "
                            f"use u or a level in 1..{self.n_levels}")
        if self.personal_heads and self.scheme != "hetero":
            raise UserError(f"--personal-heads is for --scheme hetero (shallow clients' exits), not {self.scheme}")
        if self.head_steps is not None and int(self.head_steps) < 0:
            raise UserError(f"--head-steps {self.head_steps} must be 0 or more")
        if self.personal_head not in ("translator", "head-lora"):
            raise UserError(f"--personal-head {self.personal_head!r}: use translator or head-lora")
        if self.personal_head != "translator" and not self.lora_rank:
            raise UserError("--personal-head head-lora is a LoRA-mode head: give --lora-rank too")
        if self.personal_heads is None:
            self.personal_heads = self.scheme == "hetero"
        self.personal_heads = bool(self.personal_heads)
        self.eval_sets = tuple(self.eval_sets)
        self.fail_clients = tuple(int(x) for x in self.fail_clients)

    def output_files(self) -> list[Path]:
        """The result JSON and plot this run writes (none without ``out_dir``)."""
        if not self.out_dir:
            return []
        stem = self.name or f"fed_{self.scheme}"
        return [Path(self.out_dir) / f"{stem}.json", Path(self.out_dir) / f"{stem}.png"]

    def train_dict(self) -> dict:
        return {"local_steps": self.local_steps, "batch_size": self.batch_size, "seqlen": self.seqlen,
                "lr": self.lr, "seed": self.seed, "threads": self.threads, "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha_value(),
                "head_steps": self.local_steps if self.head_steps is None else int(self.head_steps),
                "personal_head": self.personal_head}

    def lora_alpha_value(self) -> float:
        return float(2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @classmethod
    def from_run_config(cls, rc) -> FedConfig:
        """From a Flower run config (``[tool.flwr.app.config]``, keys with dashes)."""
        kw = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in rc:
                continue
            v = rc[key]
            if f.name in ("eval_sets", "fail_clients"):
                v = tuple(x for x in str(v).split(",") if x.strip())
            elif f.name == "personal_heads":
                v = None if str(v) in ("", "none", "None") else str(v).lower() in ("1", "true", "yes", "on")
            elif f.name in ("depth_flag", "num_blocks", "eval_windows", "data_dir", "out_dir", "name", "save_dir",
                            "lora_alpha", "sim_cpus", "head_steps"):
                v = None if str(v) in ("", "u", "none", "None") else v
                if v is not None and f.name not in ("data_dir", "out_dir", "name", "save_dir"):
                    v = float(v) if f.name == "lora_alpha" else int(v)
            kw[f.name] = v
        return cls(**kw)


# --- model and data ----------------------------------------------------------------------------------
def truncate_blocks(model, n: int):
    """Keep the first ``n`` decoder blocks (a smaller model initialised from the first blocks)."""
    adapter = get_adapter(model)
    if not 1 <= n <= adapter.num_blocks(model):
        raise UserError(f"--num-blocks {n} is outside 1..{adapter.num_blocks(model)}")
    adapter.truncate(model, n)
    return model


def load(cfg: FedConfig):
    from ..models.loading import load_model

    model, tokenizer = load_model(cfg.model, dtype="float32")
    if cfg.num_blocks:
        truncate_blocks(model, cfg.num_blocks)
    return model.float().eval(), tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def default_domains(data_dir) -> dict[str, list[str]]:
    """C4 calibration-pool documents, WikiText-2 valid paragraphs, PTB valid (20 sentences a document)."""
    from ..data.corpora import C4_POOL_DOCS, c4_documents, corpus_rows, resolve_data_dir

    d = resolve_data_dir(data_dir)
    docs = c4_documents(d)
    wiki = [r for r in corpus_rows("wikitext2-valid", d)[0] if r.strip() and not r.strip().startswith("=")]
    ptb = corpus_rows("ptb-valid", d)[0]
    return {"c4": [docs[i] for i in C4_POOL_DOCS], "wikitext2": wiki,
            "ptb": [" ".join(ptb[i:i + 20]) for i in range(0, len(ptb), 20)]}


def client_texts(cfg: FedConfig, domains: dict[str, list[str]], n_clients: int) -> tuple[list[list[str]], list]:
    if cfg.partition == "iid":
        return iid_shards(domains["c4"] if "c4" in domains else sum(domains.values(), []), n_clients, cfg.seed), []
    return dirichlet_shards(domains, n_clients, cfg.alpha, cfg.docs_per_client, cfg.seed)


def shard_ids(tokenizer, docs: list[str], max_tokens: int, seqlen: int) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids += encode(tokenizer, doc + "\n\n")
        if len(ids) >= max_tokens:
            break
    if len(ids) < seqlen + 2:
        raise UserError(f"a client shard has only {len(ids)} tokens (< --seqlen {seqlen} + 2): "
                        "use fewer --clients, more --docs-per-client or a shorter --seqlen")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def eval_ids(cfg: FedConfig, tokenizer, eval_texts: dict[str, str] | None) -> dict[str, torch.Tensor]:
    if eval_texts is None:
        from ..data.corpora import load_text, resolve_data_dir

        d = resolve_data_dir(cfg.data_dir)
        eval_texts = {name: load_text(name, d) for name in cfg.eval_sets}
    out = {}
    for name, text in eval_texts.items():
        if cfg.eval_windows:  # only the first windows are scored: tokenize a generous prefix
            text = text[: cfg.eval_windows * cfg.eval_seqlen * 12]
        out[name] = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    return out


_CLIENT_CACHE: dict[tuple, tuple] = {}


def client_setup(cfg: FedConfig, pid: int, n: int):
    """Deployment client: model config + this partition's token ids (cached per process)."""
    key = (json.dumps(asdict(cfg), sort_keys=True, default=str), pid, n)
    if key not in _CLIENT_CACHE:
        model, tok = load(cfg)
        texts, _ = client_texts(cfg, default_domains(cfg.data_dir), n)
        _CLIENT_CACHE[key] = (model.config, shard_ids(tok, texts[pid], cfg.max_client_tokens, cfg.seqlen))
        if cfg.lora_rank:  # the LoRA client's frozen base: handed to deploy.lora_base instead of loading it again
            _LOADED_BASE[json.dumps([cfg.model, cfg.num_blocks])] = model
    return _CLIENT_CACHE[key]


_LOADED_BASE: dict[str, torch.nn.Module] = {}


def loaded_base(cfg: FedConfig):
    """The base model ``client_setup`` already loaded for this process (once), else a fresh load."""
    model = _LOADED_BASE.pop(json.dumps([cfg.model, cfg.num_blocks]), None)
    return model if model is not None else load(cfg)[0]


# --- the experiment ------------------------------------------------------------------------------------
def _ppl(model, ids: torch.Tensor, seqlen: int, windows: int | None, bos: int | None = None) -> float:
    from ..evaluation.perplexity import perplexity

    return perplexity(model, ids, seqlen, max_windows=windows, progress=False, bos=bos).ppl


def prepare(cfg: FedConfig, model=None, tokenizer=None, domains=None, eval_texts=None, with_shards=True):
    """Model, strategy, initial arrays, server-side evaluation and (optionally) client shards."""
    if model is None:
        model, tokenizer = load(cfg)
    model = model.float().eval()
    lora = None
    if cfg.lora_rank:  # the exchanged state is the adapters; the base stays where it is
        from . import lora as L

        a = cfg.lora_alpha_value()
        lora = SimpleNamespace(rank=cfg.lora_rank, alpha=a, scale=a / cfg.lora_rank,
                               masks=L.masks_if_sparse(model, cfg.masks), base=L.base_weights(model))
        lora.sparsity_init = L.zero_pattern_check(model, lora.masks)["sparsity"] if lora.masks else None
        if cfg.save_dir:
            from ..models.info import measure_sparsity

            lora.measured_sparsity_init = measure_sparsity(model)["overall"]
        state = L.initial_adapters(model, cfg.lora_rank, cfg.lora_alpha_value(), cfg.seed)
        layout = L.lora_layout(model)
        masks = None  # adapters carry no masks: the mask is applied where they are merged
    else:
        layout = layout_of(model)
        state = shared_state(model)
        masks = None if cfg.masks == "off" else fixed_masks(state, layout, 0.0 if cfg.masks == "on" else 0.01)
    levels = depth_levels(layout.n_blocks, cfg.n_levels)
    depths = draw_depths(cfg.clients, levels, cfg.depth_flag, cfg.seed) if cfg.scheme == "hetero" else None
    strategy = FedLPStrategy(layout, cfg.scheme, cfg.keep_prob if cfg.scheme == "homo" else 1.0, depths, cfg.weighted,
                             masks, fraction_train=cfg.fraction,
                             min_train_nodes=max(1, round(cfg.fraction * cfg.clients)),
                             min_available_nodes=cfg.clients, seed=cfg.seed, personal_heads=cfg.personal_heads)
    ev = eval_ids(cfg, tokenizer, eval_texts)
    sizes: dict[str, int] = {}
    for k, v in state.items():
        sizes[layout.unit(k)] = sizes.get(layout.unit(k), 0) + v.numel()
    prep = SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer, layout=layout, strategy=strategy, masks=masks,
                           initial=ArrayRecord.from_torch_state_dict(state), evals=[], levels=levels, depths=depths,
                           unit_sizes=sizes, shards=None, partition_counts=[], t0=time.time(), bar=None, lora=lora)

    bos = bos_id(tokenizer) if callable(tokenizer) and hasattr(tokenizer, "bos_token_id") else None  # HF tokenizers

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        zero = None
        if lora is not None:
            from . import lora as L

            L.merge_adapters(model, lora.base, arrays.to_torch_state_dict(), lora.scale, lora.masks)
            zero = L.zero_pattern_check(model, lora.masks) if lora.masks else None
        else:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        ppl = {name: _ppl(model, ids, cfg.eval_seqlen, cfg.eval_windows, bos) for name, ids in ev.items()}
        prep.evals.append({"round": rnd, "ppl": ppl, "elapsed_s": time.time() - prep.t0, "zero_pattern": zero})
        if cfg.progress:
            if prep.bar is None:
                prep.bar = tqdm(total=cfg.rounds, desc=f"fed {cfg.scheme}", unit="round")
            prep.bar.update(1 if rnd else 0)
            h = strategy.history[-1] if rnd and strategy.history else None
            comm = ""
            if h:
                moved = sum(c.get("down_bytes", 0) + c.get("up_bytes", 0) for c in h["clients"])
                fedavg = sum(c.get("fedavg_bytes", 0) for c in h["clients"])
                comm = (f" | {h['accepted']}/{len(h['clients'])} clients ok | moved {moved / 2**20:.2f} MiB "
                        f"(fedavg {fedavg / 2**20:.2f}) | {h['seconds']:.1f}s")
            prep.bar.write(f"[fed {cfg.scheme}] round {rnd}/{cfg.rounds} "
                           + " ".join(f"{k} ppl {v:.2f}" for k, v in ppl.items()) + comm, file=sys.stderr)
            if rnd >= cfg.rounds:
                prep.bar.close()
        return MetricRecord({f"ppl-{k}": v for k, v in ppl.items()})

    prep.evaluate = evaluate
    if with_shards:
        domains = default_domains(cfg.data_dir) if domains is None else domains
        texts, prep.partition_counts = client_texts(cfg, domains, cfg.clients)
        prep.shards = [shard_ids(tokenizer, t, cfg.max_client_tokens, cfg.seqlen) for t in texts]
    return prep


def summarize(prep) -> dict:
    """Rows per round (PPL, measured bytes per client, FedAvg-equivalent, cumulative) + summary."""
    cfg, strategy = prep.cfg, prep.strategy
    rows, cum, cum_fedavg = [], 0, 0
    for ev in prep.evals:
        row = {"round": ev["round"], "ppl": ev["ppl"], "elapsed_s": round(ev["elapsed_s"], 2)}
        if ev["round"] > 0 and ev["round"] <= len(strategy.history):
            h = strategy.history[ev["round"] - 1]
            cl = h["clients"]
            down = sum(c.get("down_bytes", 0) for c in cl)
            up = sum(c.get("up_bytes", 0) for c in cl)
            fed = sum(c.get("fedavg_bytes", 0) for c in cl)
            cum += down + up
            cum_fedavg += fed
            row.update(partitions=h["partitions"], **({"depths": h["depths"]} if "depths" in h else {}))
            row.update(clients=cl, accepted=h["accepted"], down_bytes=down, up_bytes=up, fedavg_bytes=fed,
                       per_client_bytes=(down + up) / max(1, len(cl)), kept_previous_units=h["kept_previous_units"],
                       masked_sparsity=h["masked_sparsity"], round_seconds=round(h["seconds"], 2))
            secs = [c["train_seconds"] for c in cl if "train_seconds" in c]
            if secs:
                row.update(client_train_seconds_mean=sum(secs) / len(secs), client_train_seconds_max=max(secs))
        if ev.get("zero_pattern") is not None:
            row.update(zero_pattern=ev["zero_pattern"], masked_sparsity=ev["zero_pattern"]["sparsity"])
        row.update(cum_bytes=cum, cum_fedavg_bytes=cum_fedavg)
        rows.append(row)
    n_params = sum(prep.unit_sizes.values())
    probs = depth_probs(len(prep.levels), cfg.depth_flag)
    predicted = unit_params(prep.unit_sizes, cfg.scheme, cfg.keep_prob, prep.levels, probs)
    measured = [r["per_client_bytes"] for r in rows if "per_client_bytes" in r]
    final = rows[-1]["ppl"] if rows else {}
    lora = None
    if prep.lora is not None:
        from . import lora as L

        tokens = cfg.local_steps * cfg.batch_size * cfg.seqlen
        depths = sorted(set(prep.depths or [prep.layout.n_blocks]))
        L_ = prep.layout.n_blocks
        head_tokens = cfg.train_dict()["head_steps"] * cfg.batch_size * cfg.seqlen
        lora = {"rank": prep.lora.rank, "alpha": prep.lora.alpha, "adapter_params": n_params,
                "fixed_mask": prep.lora.masks is not None, "masked_sparsity_init": prep.lora.sparsity_init,
                "personal_heads": cfg.personal_heads,
                "personal_head": cfg.personal_head if cfg.personal_heads else None,
                "client_cost": {str(d): L.client_cost(prep.model, d, prep.lora.rank, tokens, cfg.personal_heads and
                                                      d < L_, head_tokens, cfg.personal_head) for d in depths}}
    personal = None
    if cfg.scheme == "hetero" and cfg.personal_heads:  # kept on the clients: never in the bytes above
        held = {}
        for r in rows:
            for c in r.get("clients", []):
                if c.get("status") == "ok" and c["depth"] < prep.layout.n_blocks:
                    held[c["partition"]] = c.get("personal_params", personal_exit_params(prep, c["depth"]))
        personal = {"partitions": sorted(held),
                    "params_per_partition": {str(k): int(v) for k, v in sorted(held.items())},
                    "params_total": int(sum(held.values())), "sent_bytes": 0}
    peak = [c["peak_rss_mib"] for r in rows for c in r.get("clients", []) if "peak_rss_mib" in c]
    seconds = [r["round_seconds"] for r in rows if "round_seconds" in r]
    return {
        "config": asdict(cfg),
        "lora": lora,
        "model": {"params": n_params, "blocks": prep.layout.n_blocks, "unit_params": prep.unit_sizes,
                  "masked_sparsity_init": masked_sparsity({k: v.numpy() for k, v in prep.initial.items()
                                                           if k in prep.masks}, prep.masks) if prep.masks else None},
        "personal": personal,
        "depth_levels": prep.levels, "client_depths": prep.depths, "partition_counts": prep.partition_counts,
        "rounds": rows,
        "summary": {"final_ppl": final, "initial_ppl": rows[0]["ppl"] if rows else {},
                    "total_bytes": cum, "fedavg_equivalent_bytes": cum_fedavg,
                    "bytes_ratio_vs_fedavg": cum / cum_fedavg if cum_fedavg else None,
                    "mean_bytes_per_client_round": sum(measured) / len(measured) if measured else None,
                    "predicted_params_per_client_round": predicted,
                    "predicted_fp32_bytes_per_client_round": 4 * predicted,
                    "fedavg_params_per_client_round": 2 * n_params,
                    "mean_round_seconds": sum(seconds) / len(seconds) if seconds else None,
                    "client_peak_rss_mib": max(peak) if peak else None,
                    "wall_s": round(time.time() - prep.t0, 2)},
    }


def personal_exit_params(prep, depth: int) -> int:
    """Parameters of one personal exit (LoRA: translator + norm; full weights: the exit unit's tensors)."""
    if prep.lora is not None:
        from . import lora as L

        return L.personal_params(prep.model, prep.cfg.personal_head, prep.cfg.lora_rank)
    return int(prep.unit_sizes.get("exit", 0))


def plot(results: list[dict], path: Path) -> None:
    """PPL vs cumulative communication (MiB), one line per run and evaluation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({k for r in results for row in r["rounds"] for k in row["ppl"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for r in results:
            c = r["config"]
            label = c["scheme"] + (f"(p={c['keep_prob']})" if c["scheme"] == "homo" else "")
            label += f"(flag={c['depth_flag'] or 'u'})" if c["scheme"] == "hetero" else ""
            xs = [row["cum_bytes"] / 2**20 for row in r["rounds"]]
            ax.plot(xs, [row["ppl"][name] for row in r["rounds"]], marker="o", label=label)
        ax.set_xlabel("cumulative communication (MiB, measured)")
        ax.set_ylabel(f"{name} perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": "layerprune"})
    plt.close(fig)


def write(result: dict, cfg: FedConfig) -> dict:
    from ..outputs import write_json

    if cfg.out_dir:
        js, png = cfg.output_files()
        js.parent.mkdir(parents=True, exist_ok=True)
        write_json(js, result)
        plot([result], png)
        result["files"] = [str(js), str(png)]
    return result


def quiet_flower(verbose: bool) -> None:
    """Each Flower log line once (its logger has its own handler: no propagation to ours); DEBUG only if verbose."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def check_outputs(cfg: FedConfig) -> None:
    """Before any work: the save directory may be written (absent, empty, or a layerprune run with force)."""
    if cfg.save_dir:
        from ..outputs import prepare_dir

        prepare_dir(cfg.save_dir, cfg.force, inputs=[cfg.model], flag="--save", create=False)


def run_federated(config: FedConfig | dict, model=None, tokenizer=None, domains: dict[str, list[str]] | None = None,
                  eval_texts: dict[str, str] | None = None) -> dict:
    """Run one FedLP experiment on Flower's simulation engine (Ray) and return its record.

    ``model``/``tokenizer`` (any object with ``encode(text) -> ids``) replace loading ``config.model``;
    ``domains`` (name -> documents) and ``eval_texts`` (name -> text) replace the local corpora.
    With ``lora_rank`` the frozen base is handed to the simulated clients once, through a temporary
    ``save_pretrained`` folder they load from (as deployed clients load ``config.model`` themselves).
    """
    import tempfile

    from flwr.simulation import run_simulation

    cfg = config if isinstance(config, FedConfig) else FedConfig(**config)
    check_outputs(cfg)
    quiet_flower(cfg.verbose)
    prep = prepare(cfg, model, tokenizer, domains, eval_texts)
    out: dict = {}
    server = make_server_app(prep.strategy, prep.initial, cfg.rounds, prep.evaluate, cfg.round_timeout, out)
    cpus = cfg.sim_cpus or max(1, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="layerprune-fed-base-") as tmp:
        if cfg.lora_rank:
            prep.model.save_pretrained(tmp)  # the pristine base: no evaluation has merged adapters into it yet
        client = make_client_app(prep.model.config, prep.shards, cfg.train_dict(), cfg.fail_clients,
                                 base=tmp if cfg.lora_rank else None)
        run_simulation(server, client, num_supernodes=cfg.clients,
                       backend_config={"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": cpus, "logging_level": "error",
                                                     "log_to_driver": True}})
    if "error" in out:
        raise out["error"]
    if "result" not in out:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    res = summarize(prep)
    if cfg.save_dir:
        res["saved"] = save_merged(prep, out["result"].arrays, res)
    return write(res, cfg)


def save_merged(prep, arrays: ArrayRecord, result: dict) -> dict:
    """Merge the final adapters into the base (mask re-applied), check the zero pattern, save a run directory."""
    from ..models.info import measure_sparsity
    from ..outputs import RECORD_NAME, finish_dir, prepare_dir
    from ..record import read_record, save_run, versions
    from . import lora as L

    cfg, lora, model = prep.cfg, prep.lora, prep.model
    L.merge_adapters(model, lora.base, arrays.to_torch_state_dict(), lora.scale, lora.masks)
    zero = L.zero_pattern_check(model, lora.masks) if lora.masks else None
    if zero and zero["pruned_now_nonzero"]:  # merge_adapters makes this impossible; checked because it is the claim
        raise UserError(f"{zero['pruned_now_nonzero']} pruned weights are nonzero after merging; nothing was saved")
    src = Path(cfg.model)
    record = dict(read_record(src)) if (src / RECORD_NAME).is_file() else {"model": cfg.model}
    sp_after = measure_sparsity(model)["overall"]
    s = result["summary"]
    record["federated_finetune"] = {
        "source": cfg.model, "method": "fedlp-lora", "scheme": cfg.scheme, "config": asdict(cfg),
        "ppl_per_round": [{"round": r["round"], "ppl": r["ppl"]} for r in result["rounds"]],
        "eval": {"seqlen": cfg.eval_seqlen, "windows": cfg.eval_windows},
        "sparsity_before": lora.measured_sparsity_init, "sparsity_after": sp_after, "zero_pattern": zero,
        "zero_pattern_identical": zero is None or (zero["pruned_now_nonzero"] == 0 and zero["kept_now_zero"] == 0),
        "total_bytes": s["total_bytes"], "fedavg_equivalent_bytes": s["fedavg_equivalent_bytes"]}
    record["measured_sparsity"] = sp_after
    record["versions"] = versions() | {"peft": _version("peft"), "flwr": _version("flwr")}
    tok = prep.tokenizer if hasattr(prep.tokenizer, "save_pretrained") else None
    work = prepare_dir(cfg.save_dir, force=cfg.force, inputs=[cfg.model], flag="--save")
    save_run(model, tok, work, record)
    finish_dir(work, Path(cfg.save_dir))
    return {"dir": cfg.save_dir, "sparsity_before": lora.measured_sparsity_init, "sparsity_after": sp_after,
            "zero_pattern": zero, "zero_pattern_identical": record["federated_finetune"]["zero_pattern_identical"]}


def _version(pkg):
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def serve(cfg: FedConfig, grid) -> dict:
    """Deployment engine ServerApp body: same experiment, clients on remote SuperNodes."""
    check_outputs(cfg)
    prep = prepare(cfg, with_shards=False)
    result = prep.strategy.start(grid=grid, initial_arrays=prep.initial, num_rounds=cfg.rounds,
                                 timeout=cfg.round_timeout, evaluate_fn=prep.evaluate)
    res = summarize(prep)
    if cfg.save_dir:
        res["saved"] = save_merged(prep, result.arrays, res)
    return write(res, cfg)
