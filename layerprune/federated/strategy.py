"""FedLP server strategy: layer-wise aggregation over the clients that sent each tensor.

For every key k of the global model (paper: Zhuzzq/FedLP ``fed_dropout`` / ``fed_hetero``):

    S_k = {clients whose accepted reply carries k}
    w_g[k] <- sum_{c in S_k} n_c w_c[k] / sum_{c in S_k} n_c      (weighted=True, n_c = num-examples)
    w_g[k] <- (1/|S_k|) sum_{c in S_k} w_c[k]                      (weighted=False, the paper's code)
    w_g[k] unchanged when S_k is empty.

Stock FedAvg refuses replies whose ArrayRecords have different keys, so this subclass skips that check
and validates each reply itself: one ArrayRecord, a numeric ``num-examples``, only keys the client was
allowed to send, the global shape and dtype, finite values. A bad reply is dropped with a logged reason
and never touches the global model; failed clients (error replies) and clients that did not answer in
time are dropped from the round, which still completes.

Schemes: ``fedavg`` (full download, full upload), ``homo`` (full download, each unit uploaded with
probability p, drawn by the client), ``hetero`` (client of depth c downloads and uploads the embedding
and its first c blocks; the exit is shared only by full-depth clients; with personal heads it is sent once
to initialise the personal exit of shallower ones, without them every round and never taken back).
Fixed pruning masks (True = kept) are re-applied after aggregation.

Sampling is by *partition ID*, not by Flower node ID (the simulation gives partition i a random node ID): before its
first round the strategy asks every connected node for its ``partition-id`` (a QUERY message; the ClientApp answers
from its node config), then each round draws the partitions with a generator seeded by (seed, round) alone, so two
runs, or two schemes, with the same seed and the same connected partitions train the same partitions every round.
A hetero client's depth is ``depths[partition]``. Replies are aggregated in partition order (bit-identical sums).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ..errors import UserError
from .accounting import record_bytes
from .depth import Layout

SCHEMES = ("fedavg", "homo", "hetero")
CLIENT_METRICS = ("train-loss", "train-seconds", "peak-rss-mib", "personal-params", "personal-rounds")


def sample_partitions(partitions: Iterable[int], size: int, seed: int, server_round: int) -> list[int]:
    """``size`` of ``partitions`` (sorted), drawn by a generator seeded by (seed, round) only."""
    pool = sorted(set(int(p) for p in partitions))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round)])
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=min(size, len(pool)), replace=False))


def fixed_masks(state: dict[str, torch.Tensor], layout: Layout,
                min_sparsity: float = 0.01) -> dict[str, np.ndarray] | None:
    """Masks (True = kept) of the 2-D block weights, from their zeros at round 0.

    None when those weights are less than ``min_sparsity`` zero (a dense model: nothing to keep fixed).
    """
    keys = [k for k, v in state.items() if layout.unit(k).startswith("block.") and v.dim() == 2]
    zeros = sum(int((state[k] == 0).sum()) for k in keys)
    total = sum(state[k].numel() for k in keys)
    if not total or zeros / total < min_sparsity:
        return None
    return {k: (state[k] != 0).cpu().numpy() for k in keys}


def masked_sparsity(arrays: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> float:
    zeros = sum(int((arrays[k] == 0).sum()) for k in masks)
    return zeros / max(1, sum(m.size for m in masks.values()))


class FedLPStrategy(FedAvg):
    """FedAvg subclass with per-key (layer-wise) aggregation and per-client download plans."""

    def __init__(self, layout: Layout, scheme: str = "homo", keep_prob: float = 0.5, depths: list[int] | None = None,
                 weighted: bool = True, masks: dict[str, np.ndarray] | None = None, fraction_train: float = 1.0,
                 min_train_nodes: int = 2, min_available_nodes: int = 2, seed: int = 0, personal_heads: bool = True,
                 query_timeout: float = 600.0):
        if scheme not in SCHEMES:
            raise UserError(f"unknown FedLP scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
        if not 0.0 <= keep_prob <= 1.0:
            raise UserError(f"--keep-prob {keep_prob} is not a probability: use a value in [0, 1]")
        if scheme == "hetero" and not depths:
            raise UserError("hetero FedLP needs client depths (draw them with depth.draw_depths)")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes)
        self.layout, self.scheme, self.keep_prob, self.weighted = layout, scheme, keep_prob, weighted
        self.depths = list(depths or [])
        self.masks = masks
        self.seed, self.personal_heads, self.query_timeout = int(seed), bool(personal_heads), float(query_timeout)
        self.global_arrays: ArrayRecord | None = None
        self.partition_of: dict[int, int] = {}  # node ID -> partition ID (asked once per node)
        self.exit_sent: set[int] = set()  # partitions whose personal exit was initialised
        self.plan: dict[int, dict] = {}  # node -> what was sent / may be sent back this round
        self.history: list[dict] = []

    # --- download ----------------------------------------------------------------------------
    def partition_depth(self, partition: int) -> int:
        """The depth of a partition's client: full for fedavg/homo, ``depths[partition]`` for hetero."""
        if self.scheme != "hetero":
            return self.layout.n_blocks
        if not 0 <= partition < len(self.depths):
            raise ValueError(f"partition {partition} has no depth: {len(self.depths)} depths were drawn")
        return self.depths[partition]

    def learn_partitions(self, grid: Grid, nodes: list[int]) -> None:
        """Ask the nodes not asked yet for their partition ID (QUERY message, answered from the node config)."""
        new = [n for n in nodes if n not in self.partition_of]
        if not new:
            return
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        for rep in grid.send_and_receive(msgs, timeout=self.query_timeout):
            node = rep.metadata.src_node_id
            m = next(iter(rep.content.metric_records.values()), None) if not rep.has_error() else None
            pid = m.get("partition-id") if m is not None else None
            if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
                log(WARNING, "node %d did not report a partition ID: it will not be sampled", node)
                continue
            clash = [n for n, p in self.partition_of.items() if p == pid and n != node]
            if clash:
                raise ValueError(f"nodes {clash[0]} and {node} both report partition-id {pid}: give every node its "
                                 "own partition-id in --node-config")
            self.partition_of[node] = int(pid)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_arrays = arrays
        self.plan = {}
        self._t0 = time.time()
        if self.fraction_train == 0.0:
            return []
        n_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        size = max(n_nodes, self.min_train_nodes)
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, size)  # waits until enough nodes are up
        self.learn_partitions(grid, list(all_nodes))
        node_of = {self.partition_of[n]: n for n in all_nodes if n in self.partition_of}
        chosen = sample_partitions(node_of, size, self.seed, server_round)
        full_bytes = record_bytes(arrays)
        messages = []
        for pid in chosen:
            node, depth = node_of[pid], self.partition_depth(pid)
            shared = set(self.layout.shared_units(depth))
            shallow = self.scheme == "hetero" and depth < self.layout.n_blocks
            personal = shallow and self.personal_heads
            exit_init = personal and pid not in self.exit_sent
            send = shared | {"exit"} if (not shallow or exit_init or not personal) else shared
            keys = [k for k in arrays if self.layout.unit(k) in send]
            rec = arrays if len(keys) == len(arrays) else ArrayRecord({k: arrays[k] for k in keys})
            if exit_init:
                self.exit_sent.add(pid)
            cfg = ConfigRecord(dict(config))
            cfg.update({"server-round": server_round, "scheme": self.scheme, "keep-prob": float(self.keep_prob),
                        "depth": depth, "exit-init": exit_init, "masks": self.masks is not None,
                        "personal-exit": personal, "shallow": shallow, "partition-id": pid})
            allowed = {k for k in arrays if self.layout.unit(k) in shared}
            self.plan[node] = {"partition": pid, "depth": depth, "allowed": allowed, "down_bytes": record_bytes(rec),
                               "fedavg_bytes": 2 * full_bytes}
            messages.append(Message(content=RecordDict({self.arrayrecord_key: rec, self.configrecord_key: cfg}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
        log(INFO, "configure_train: round %d, partitions %s, scheme %s", server_round, chosen, self.scheme)
        return messages

    # --- upload -------------------------------------------------------------------------------
    def check_reply(self, node: int, content: RecordDict) -> tuple[str | None, dict[str, np.ndarray], float]:
        """(reason to reject or None, the sent tensors as numpy, the reply's weight)."""
        if node not in self.plan:
            return f"node {node} was not sampled this round", {}, 0.0
        if list(content.array_records.keys()) != [self.arrayrecord_key]:
            return f"expected one ArrayRecord named {self.arrayrecord_key!r}", {}, 0.0
        metrics = list(content.metric_records.values())
        n = metrics[0].get(self.weighted_by_key) if len(metrics) == 1 else None
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not n > 0:
            return f"expected one MetricRecord with a positive {self.weighted_by_key!r}", {}, 0.0
        arrays, out = content.array_records[self.arrayrecord_key], {}
        allowed = self.plan[node]["allowed"]
        for k, arr in arrays.items():
            if k not in self.global_arrays:
                return f"unknown key {k!r}", {}, 0.0
            if k not in allowed:
                return f"key {k!r} is not shared by a depth-{self.plan[node]['depth']} client", {}, 0.0
            g = self.global_arrays[k]
            if tuple(arr.shape) != tuple(g.shape) or arr.dtype != g.dtype:
                return f"{k!r} has shape {tuple(arr.shape)} {arr.dtype}, expected {tuple(g.shape)} {g.dtype}", {}, 0.0
            try:
                x = arr.numpy()
            except (TypeError, ValueError) as e:
                return f"{k!r} does not deserialize ({e})", {}, 0.0
            if tuple(x.shape) != tuple(g.shape) or not np.isfinite(x).all():
                return f"{k!r} holds non-finite values or a mismatched payload", {}, 0.0
            out[k] = x
        return None, out, float(n) if self.weighted else 1.0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        clients = {node: {"partition": p["partition"], "depth": p["depth"], "down_bytes": p["down_bytes"],
                          "up_bytes": 0, "fedavg_bytes": p["fedavg_bytes"], "status": "timeout",
                          "reason": "no reply in time", "units": 0} for node, p in self.plan.items()}
        unplanned = lambda n: {"partition": self.partition_of.get(n, -1)}  # noqa: E731
        for msg in errors:
            c = clients.setdefault(msg.metadata.src_node_id, unplanned(msg.metadata.src_node_id))
            reason = str(msg.error.reason).strip().splitlines()[-1]
            c.update(status="failed", reason=reason.split("Message: ")[-1].strip("'>")[:200])
        accepted, losses = [], []
        def order(m):
            return self.plan.get(m.metadata.src_node_id, {}).get("partition", -1), m.metadata.src_node_id

        for msg in sorted(valid, key=order):  # partition order: the sums below do not depend on reply order
            node = msg.metadata.src_node_id
            c = clients.setdefault(node, unplanned(node))
            rec = msg.content.array_records.get(self.arrayrecord_key)
            c["up_bytes"] = record_bytes(rec) if rec is not None else 0
            reason, arrays, w = self.check_reply(node, msg.content)
            if reason is not None:
                log(WARNING, "aggregate_train: rejected reply from node %d: %s", node, reason)
                c.update(status="rejected", reason=reason)
                continue
            c.update(status="ok", reason="", units=len({self.layout.unit(k) for k in arrays}))
            accepted.append((w, arrays))
            m = next(iter(msg.content.metric_records.values()))
            for key in CLIENT_METRICS:  # what the client measured about itself (LoRA clients: seconds, memory)
                if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool):
                    c[key.replace("-", "_")] = float(m[key])
            if isinstance(m.get("train-loss"), (int, float)):
                losses.append((w, float(m["train-loss"])))
        new, kept = {}, []
        for k, g in self.global_arrays.items():
            parts = [(w, a[k]) for w, a in accepted if k in a]
            if not parts:
                new[k] = g
                kept.append(k)
                continue
            total = sum(w for w, _ in parts)
            acc = sum(w * x.astype(np.float64) for w, x in parts) / total
            if self.masks is not None and k in self.masks:
                acc = np.where(self.masks[k], acc, 0.0)
            new[k] = Array(np.ascontiguousarray(acc.astype(g.numpy().dtype)))
        record = ArrayRecord(new)
        sparsity = None
        if self.masks is not None:
            sparsity = masked_sparsity({k: record[k].numpy() for k in self.masks}, self.masks)
        kept_units = sorted({self.layout.unit(k) for k in kept}, key=self.layout.units().index)
        planned = sorted(self.plan.values(), key=lambda p: p["partition"])
        row = {"round": server_round, "seconds": time.time() - getattr(self, "_t0", time.time()),
               "partitions": [p["partition"] for p in planned],
               "clients": sorted(clients.values(), key=lambda c: c["partition"]), "accepted": len(accepted),
               "kept_previous_units": kept_units, "masked_sparsity": sparsity}
        if self.scheme == "hetero":
            row["depths"] = [p["depth"] for p in planned]
        self.history.append(row)
        log(INFO, "aggregate_train: round %d, %d accepted, %d failed/timed out, %d rejected; kept previous: %s",
            server_round, len(accepted), sum(c["status"] in ("failed", "timeout") for c in clients.values()),
            sum(c["status"] == "rejected" for c in clients.values()), kept_units or "none")
        metrics = MetricRecord({"clients-accepted": len(accepted)})
        if losses:
            metrics["train-loss"] = sum(w * l for w, l in losses) / sum(w for w, _ in losses)
        return (record if accepted else None), metrics
