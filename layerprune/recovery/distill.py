"""Logit distillation loss: KL divergence from the teacher's next-token distribution to the student's.

For every position, with temperature T, p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

    KD = T^2 * mean over positions of  sum_v p_v (log p_v - log q_v)

(the T^2 factor keeps the gradient scale independent of T, as in Hinton et al.). With ``topk = k`` the sum runs over
k + 1 buckets instead of the vocabulary: the teacher's k most likely tokens, and one bucket holding all the other
tokens' probability mass (for p and for q alike), so the teacher side needs only k + 1 numbers per position.

The functions are pure (no state, no model): ``teacher_targets`` turns one batch of teacher logits into the targets,
``kd_loss`` compares student logits with them. Both work in float32 (or float64 when given float64 logits).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from layerprune.errors import UserError


class KDTargets(NamedTuple):
    """What the loss needs of the teacher: ``logp`` (..., V) log-probabilities at the temperature, or with ``index``
    (..., k) the log-probabilities of those k tokens followed by the log of the remaining mass (..., k + 1)."""
    logp: torch.Tensor
    index: torch.Tensor | None = None


def check_kd_options(temperature: float, alpha: float, topk: int | None, vocab: int | None = None) -> None:
    if not temperature > 0:
        raise UserError(f"--kd-temperature must be > 0 (got {temperature})")
    if not 0 <= alpha <= 1:
        raise UserError(f"--kd-alpha is the weight of the distillation term and must be in [0, 1] (got {alpha})")
    if topk is not None and (topk < 1 or (vocab is not None and topk >= vocab)):
        raise UserError(f"--kd-topk must be between 1 and the vocabulary size - 1 ({vocab}) (got {topk})")


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``index`` (last dim), computed by a log-sum-exp over the other tokens."""
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)


@torch.no_grad()
def teacher_targets(teacher_logits: torch.Tensor, temperature: float = 1.0, topk: int | None = None) -> KDTargets:
    """The distillation targets of one batch of teacher logits (..., V); ``topk``: keep the k most likely tokens and
    the lumped rest (None, or k >= V: the whole distribution)."""
    logp = F.log_softmax(_float(teacher_logits) / temperature, dim=-1)
    if topk is None or topk >= logp.shape[-1]:
        return KDTargets(logp)
    top, index = logp.topk(topk, dim=-1)
    return KDTargets(torch.cat([top, _rest(logp, index)], dim=-1), index)


def kd_loss(student_logits: torch.Tensor, targets: KDTargets, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher || student) at temperature T (see the module docstring)."""
    logq = F.log_softmax(_float(student_logits) / temperature, dim=-1)
    if targets.index is not None:
        logq = torch.cat([logq.gather(-1, targets.index), _rest(logq, targets.index)], dim=-1)
    if logq.shape != targets.logp.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} do not match the teacher targets "
                        f"{tuple(targets.logp.shape)}: teacher and student need the same vocabulary and windows")
    logp = targets.logp.to(logq.dtype)
    p = logp.exp()
    nonzero = p > 0  # a bucket the teacher gives probability 0 adds nothing (and its log is -inf)
    kl = torch.where(nonzero, p * (torch.where(nonzero, logp, 0.0) - logq), 0.0).sum(-1)
    return kl.mean() * temperature ** 2


def kd_loss_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                        topk: int | None = None) -> torch.Tensor:
    """``kd_loss(student_logits, teacher_targets(teacher_logits, temperature, topk), temperature)``."""
    return kd_loss(student_logits, teacher_targets(teacher_logits, temperature, topk), temperature)


def kd_objective(teacher, temperature: float = 1.0, alpha: float = 1.0, topk: int | None = None):
    """The training loss ``loss_fn(student, x)`` of ``recovery.train``: alpha * KD + (1 - alpha) * LM on the windows x.

    The teacher runs in eval mode without gradients, one batch at a time, and only its targets (the whole
    distribution, or k + 1 numbers per position with ``topk``) are kept while the student's graph is built."""
    teacher.eval()

    def loss_fn(student, x):
        with torch.no_grad():
            targets = teacher_targets(teacher(input_ids=x).logits, temperature, topk)
        logits = student(input_ids=x).logits
        kd = kd_loss(logits, targets, temperature)
        parts = {"kd": kd.item()}
        loss = kd
        if alpha < 1:
            lm = F.cross_entropy(_float(logits[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            parts["lm"] = lm.item()
            loss = alpha * kd + (1 - alpha) * lm
        return loss, parts

    return loss_fn
