"""Flower deployment engine entry points (SuperLink + SuperNodes): ``server_app`` and ``client_app``.

Everything comes from the Flower run config (``flwr_app/pyproject.toml``, ``--run-config``): the ServerApp runs
``run.serve`` (the same experiment as the simulation, with clients on remote SuperNodes); each ClientApp loads the
model config and its partition's tokens once per process (``run.client_setup``) and trains with
``apps.client_round``; with ``lora-rank`` > 0 the SuperNode loads the frozen base from ``model`` once and only the
adapters travel. Kept apart from ``apps`` so that the imports run one way: deploy -> run -> apps.
"""
from __future__ import annotations

import json

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .apps import client_round, partition_reply
from .run import FedConfig, client_setup, loaded_base, serve

server_app = ServerApp()
client_app = ClientApp()
client_app.query()(partition_reply)


@server_app.main()
def _deployed_server(grid: Grid, context: Context) -> None:
    serve(FedConfig.from_run_config(context.run_config), grid)


@client_app.train()
def _deployed_client(msg: Message, context: Context) -> Message:
    cfg = FedConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.threads)
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    model_config, ids = client_setup(cfg, pid, n)
    return Message(content=client_round(msg.content, context.state, model_config, ids, cfg.train_dict(), pid,
                                        lambda: lora_base(cfg)), reply_to=msg)


def lora_base(cfg: FedConfig):
    """The SuperNode's frozen base (``cfg.model``, loaded here once per process) wrapped with LoRA."""
    from .lora import cached_peft

    key = json.dumps([cfg.model, cfg.num_blocks])
    return cached_peft(key, lambda: loaded_base(cfg), cfg.lora_rank, cfg.lora_alpha_value())
