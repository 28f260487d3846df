"""Local training shared by the full-weight and the LoRA client rounds (``apps`` and ``lora`` both import it)."""
from __future__ import annotations

import torch


def local_train(model, ids: torch.Tensor, steps: int, batch_size: int, seqlen: int, lr: float, seed: int,
                masks: dict[str, torch.Tensor] | None = None, only=None) -> float:
    """``steps`` AdamW steps of next-token loss on random windows of ``ids``; mean loss.

    ``masks`` (name -> bool, True = zeroed) are re-applied after every step, so pruned weights stay zero.
    ``only`` (a module): train its parameters alone, every other parameter frozen for these steps (autograd then
    stops at that module: nothing before it is differentiated).
    """
    if only is not None:
        mine = {id(p) for p in only.parameters()}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return local_train(model, ids, steps, batch_size, seqlen, lr, seed, masks)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    ids = ids.reshape(-1)
    seqlen = min(seqlen, ids.numel() - 1)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen, (batch_size,), generator=g)
        x = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if masks:
            with torch.no_grad():
                for name, m in masks.items():
                    params[name].masked_fill_(m, 0.0)
        losses.append(loss.item())
    model.eval()
    return sum(losses) / max(1, len(losses))
