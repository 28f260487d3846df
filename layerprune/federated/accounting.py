"""Communication accounting.

Measured: ``record_bytes`` = the bytes of an ArrayRecord as Flower serializes it for transport (the
record's deflated head plus every Array head plus every ArrayChunk of data), counted per client per
round for the download (what the server sent that client) and the upload (what it replied).

Predicted (the paper's arithmetic, in parameters per client per round, README of Zhuzzq/FedLP):
FedAvg = 2N (full download + full upload); Homo(p) = N + pN = (1+p)N (full download, each layer
uploaded with probability p); Hetero = 2 E[shared(c)] = 2 sum_c P(c) shared(c).
"""
from __future__ import annotations

from flwr.app import ArrayRecord


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of ``record`` once serialized into Flower objects (heads, metadata and data chunks)."""
    total = len(record.deflate())
    for arr in record.values():
        total += len(arr.deflate())
        total += sum(len(chunk.deflate()) for _, chunk in arr.slice_array())
    return total


def fedavg_params(n_params: int) -> float:
    return 2.0 * n_params


def homo_params(n_params: int, p: float) -> float:
    return (1.0 + p) * n_params


def hetero_params(prefix_sizes: list[int], probs: list[float]) -> float:
    return 2.0 * sum(p * s for p, s in zip(prefix_sizes, probs, strict=True))


def unit_params(unit_sizes: dict[str, int], scheme: str, p: float = 1.0, depths: list[int] | None = None,
                depth_p: list[float] | None = None) -> float:
    """Predicted parameters per client per round for an LLM split into units (see ``depth.Layout``).

    homo: every unit is uploaded with probability p; hetero: ``depths`` (block counts) with probabilities
    ``depth_p``; a client of full depth also shares the exit.
    """
    n = sum(unit_sizes.values())
    if scheme == "fedavg":
        return fedavg_params(n)
    if scheme == "homo":
        return homo_params(n, p)
    n_blocks = sum(1 for u in unit_sizes if u.startswith("block."))
    prefix = []
    for c in depths:
        s = unit_sizes.get("embed", 0) + sum(unit_sizes[f"block.{i}"] for i in range(c))
        prefix.append(s + (unit_sizes.get("exit", 0) if c >= n_blocks else 0))
    return hetero_params(prefix, depth_p)
