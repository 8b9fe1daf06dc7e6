"""Training losses built from the differentiable saliency metrics.

A loss spec names terms and weights, e.g. "kld=1,cc=0.5" (the default) or "mse=1" (the
reference recipe). Every term is turned into "lower is better": kld, mse as they are, 1 - cc,
1 - sim, and -nss.

Why the default: KL divergence treats the map as the probability distribution of fixations,
which is what a density map is, and it led the published SALICON recipes (SAM, UNISAL,
TranSalNet, SimpleNet all combine KLD with CC); CC adds a scale-free pixel-wise agreement term
that keeps the shape of the map right where KLD is dominated by peaks. NSS, which needs
fixation points, can be added ("kld=1,cc=0.5,nss=0.1") when the data has them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from train.metrics import cc_torch, kld_torch, nss_torch, sim_torch

DEFAULT_LOSS = "kld=1,cc=0.5"


def _mse(pred: torch.Tensor, gt: torch.Tensor, fix: torch.Tensor) -> torch.Tensor:
    # The reference compared the sigmoid output with the map scaled to a peak of 1.
    peak = gt.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return ((pred - gt / peak) ** 2).flatten(1).mean(1)


TERMS: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    # name: (per-sample loss (B,), which target it needs)
    "kld": (lambda p, g, f: kld_torch(p, g), "map"),
    "cc": (lambda p, g, f: 1.0 - cc_torch(p, g), "map"),
    "sim": (lambda p, g, f: 1.0 - sim_torch(p, g), "map"),
    "nss": (lambda p, g, f: -nss_torch(p, f), "fixations"),
    "mse": (_mse, "map"),
}


def parse_loss(spec: str) -> dict[str, float]:
    """"kld=1,cc=0.5" -> {"kld": 1.0, "cc": 0.5}, with one clear error for anything else."""
    terms: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip().lower()
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r} in --loss {spec!r}; use terms from {sorted(TERMS)}.")
        try:
            terms[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"the weight of {name!r} in --loss {spec!r} is not a number.") from None
    if not terms:
        raise ValueError(f"--loss {spec!r} names no term; e.g. --loss {DEFAULT_LOSS}.")
    return terms


class SaliencyLoss(torch.nn.Module):
    """Weighted sum of metric losses, averaged over the samples each term applies to.

    pred: B x 1 x H x W model output in [0, 1]; gt: B x 1 x H x W density map; fix: B x 1 x H x W
    binary fixations. Samples whose crop lost every fixation (or the whole map) are left out of
    the terms that need them instead of raising. Computed in float32 whatever the autocast.
    """

    def __init__(self, spec: str = DEFAULT_LOSS) -> None:
        super().__init__()
        self.terms = parse_loss(spec)

    def forward(self, pred: torch.Tensor, gt: torch.Tensor, fix: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        pred, gt, fix = pred.float(), gt.float(), fix.float()
        has = {"map": gt.flatten(1).amax(1) > 0, "fixations": fix.flatten(1).amax(1) > 0}
        total = pred.new_zeros(())
        parts: dict[str, float] = {}
        for name, weight in self.terms.items():
            fn, needs = TERMS[name]
            keep = has[needs]
            if not bool(keep.any()):
                continue
            value = fn(pred[keep], gt[keep], fix[keep]).mean()
            total = total + weight * value
            parts[name] = float(value.detach())
        return total, parts
