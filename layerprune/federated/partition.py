"""Client shards from in-memory document lists (no hub).

IID: the documents are shuffled once (seeded) and dealt into ``n_clients`` near-equal shards.
Non-IID: client k draws domain proportions q_k ~ Dirichlet(alpha * 1_D) and then
n_d ~ Multinomial(docs_per_client, q_k) documents from each domain d; each domain's documents are
handed out in a seeded shuffled order without reuse until the domain runs out, then reshuffled.
Smaller alpha = more skewed clients. Same seed -> same shards.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError


def iid_shards(docs: list[str], n_clients: int, seed: int = 0) -> list[list[str]]:
    if len(docs) < n_clients:
        raise UserError(f"{len(docs)} documents cannot fill {n_clients} client shards: use fewer --clients")
    order = np.random.default_rng(seed).permutation(len(docs))
    return [[docs[i] for i in part] for part in np.array_split(order, n_clients)]


def dirichlet_shards(domains: dict[str, list[str]], n_clients: int, alpha: float = 1.0, docs_per_client: int = 50,
                     seed: int = 0) -> tuple[list[list[str]], list[dict[str, int]]]:
    """Shards and, per client, how many documents came from each domain."""
    if alpha <= 0:
        raise UserError(f"--alpha must be > 0 (got {alpha})")
    names = [d for d in domains if domains[d]]
    if not names:
        raise UserError("all domains are empty: nothing to partition")
    rng = np.random.default_rng(seed)
    orders = {d: list(rng.permutation(len(domains[d]))) for d in names}
    shards, counts = [], []
    for _ in range(n_clients):
        q = rng.dirichlet([alpha] * len(names))
        n = rng.multinomial(docs_per_client, q)
        shard, count = [], {}
        for d, k in zip(names, n):
            for _ in range(int(k)):
                if not orders[d]:
                    orders[d] = list(rng.permutation(len(domains[d])))
                shard.append(domains[d][orders[d].pop()])
            count[d] = int(k)
        shards.append(shard)
        counts.append(count)
    return shards, counts
