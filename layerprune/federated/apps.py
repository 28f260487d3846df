"""Flower ServerApp / ClientApp for FedLP (Message API).

``make_server_app`` / ``make_client_app`` build apps around in-memory objects (used by
``run.run_federated`` with the simulation engine). The deployment engine's ``server_app`` / ``client_app``
(SuperLink + SuperNodes, everything read from the Flower run config) live in ``deploy``: see docs/federated.md.

Client round (``client_round``): load the received tensors into a (cached) model of the assigned depth,
train ``local_steps`` AdamW steps on random windows of the client's shard (fixed masks re-applied after
every step), then reply with the shared tensors: all of them (fedavg, hetero) or each unit with
probability ``keep-prob`` (homo). A shallow hetero client with personal heads keeps its exit (final norm, untied
head) in ``context.state`` across rounds; it never leaves the client. Without personal heads it exits through the
global exit it receives every round, and does not send it back.

Every ClientApp answers the strategy's QUERY with its ``partition-id`` and ``num-partitions`` (node config): the server
samples and assigns depths by partition (``partition_reply``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .depth import layout_of, prefix_model, shared_state
from .train import local_train

_MODELS: dict[tuple, torch.nn.Module] = {}  # per process: one skeleton per (config, depth)


def _skeleton(model_config, depth: int) -> torch.nn.Module:
    key = (model_config.to_json_string(), depth)
    if key not in _MODELS:
        _MODELS[key] = prefix_model(model_config, depth)
    return _MODELS[key]


def client_round(content: RecordDict, state: RecordDict, model_config, ids: torch.Tensor, train: dict,
                 partition: int, base_fn=None) -> RecordDict:
    """One client's training round: returns the reply content (arrays + metrics).

    With ``train["lora_rank"]`` the round trains LoRA adapters on the client's frozen base, ``base_fn()`` (a cached
    peft-wrapped model, see ``lora.cached_peft``), and exchanges only the adapters (``lora.client_round``).
    """
    if int(train.get("lora_rank") or 0):
        from .lora import client_round as lora_round

        if base_fn is None:
            raise ValueError("a LoRA round needs the client's base model")
        return lora_round(content, base_fn(), ids, train, partition, state)
    cfg = content["config"]
    depth, rnd = int(cfg["depth"]), int(cfg["server-round"])
    personal = bool(cfg.get("personal-exit", False))
    model = _skeleton(model_config, depth)
    layout = layout_of(model)
    sd = content["arrays"].to_torch_state_dict()
    if personal and "personal" in state.array_records and not cfg.get("exit-init", False):
        sd.update(state["personal"].to_torch_state_dict())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    held = shared_state(model)
    lost = [k for k in missing if k in held]
    if unexpected or lost:
        raise ValueError(f"received tensors do not fit a depth-{depth} model: unexpected {unexpected[:3]}, "
                         f"missing {lost[:3]}")
    masks = None
    if cfg.get("masks", False):
        masks = {k: v == 0 for k, v in held.items() if layout.unit(k).startswith("block.") and v.dim() == 2}
    seed = int(train.get("seed", 0)) * 1_000_003 + rnd * 1009 + partition
    loss = local_train(model, ids, int(train["local_steps"]), int(train["batch_size"]), int(train["seqlen"]),
                       float(train["lr"]), seed, masks)
    out = shared_state(model)
    if personal:
        state["personal"] = ArrayRecord({k: v.clone() for k, v in out.items() if layout.unit(k) == "exit"})
    shallow = bool(cfg.get("shallow", personal))  # its exit (personal or the global one) never goes back
    units = [u for u in layout.units() if not (shallow and u == "exit")]
    if cfg["scheme"] == "homo":
        rng = np.random.default_rng(seed)
        units = [u for u in units if rng.random() < float(cfg["keep-prob"])]
    send = {k: v for k, v in out.items() if layout.unit(k) in set(units)}
    metrics = MetricRecord({"num-examples": int(ids.numel()), "train-loss": loss if math.isfinite(loss) else -1.0,
                            "units-sent": len(units), "depth": depth})
    if personal:
        metrics["personal-params"] = sum(int(v.numel()) for k, v in out.items() if layout.unit(k) == "exit")
    return RecordDict({"arrays": ArrayRecord(send), "metrics": metrics})


def partition_reply(msg: Message, context: Context) -> Message:
    """Reply to the strategy's QUERY: this node's ``partition-id`` and ``num-partitions`` from its node config."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("this node has no partition-id in its node config (flower-supernode --node-config "
                         "'partition-id=K num-partitions=N')")
    return Message(content=RecordDict({"metrics": MetricRecord({
        "partition-id": int(nc["partition-id"]), "num-partitions": int(nc.get("num-partitions", 0))})}),
        reply_to=msg)


def make_client_app(model_config, shards: list[torch.Tensor], train: dict, fail: tuple[int, ...] = (),
                    base: str | None = None) -> ClientApp:
    """ClientApp over in-memory token shards; partitions listed in ``fail`` raise (robustness tests).

    ``base``: LoRA rounds only, a ``save_pretrained`` folder of the frozen base that each client process loads once.
    """
    app = ClientApp()

    def base_fn():
        from .lora import cached_peft, load_saved

        return cached_peft(base, lambda: load_saved(base), int(train["lora_rank"]), float(train["lora_alpha"]))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(int(train.get("threads", 1)))
        pid = int(context.node_config["partition-id"])
        if pid in fail:
            raise RuntimeError(f"injected failure on partition {pid}")
        return Message(content=client_round(msg.content, context.state, model_config, shards[pid], train, pid,
                                            base_fn if base else None), reply_to=msg)

    app.query()(partition_reply)
    return app


def make_server_app(strategy, initial: ArrayRecord, rounds: int, evaluate_fn=None, timeout: float = 3600.0,
                    out: dict | None = None) -> ServerApp:
    """ServerApp that runs ``strategy`` for ``rounds`` rounds; the flwr Result lands in ``out['result']``."""
    app = ServerApp()
    out = {} if out is None else out

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            out["result"] = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=timeout,
                                           evaluate_fn=evaluate_fn)
        except BaseException as e:  # the simulation runs this in a thread: hand the error to the caller
            out["error"] = e
            raise

    return app

