"""The one sweep over plans: a score per (N, plan), beside what the plan saves, as rows.

`eval` (a task metric per CR), the demo (embedding agreement per CR, voltage first) and the
experiment grids (N x CR x logit bias) are all this loop with another `score`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from prism_jax import cost
from prism_jax.configs import ModelConfig
from prism_jax.partition import edge_mesh
from prism_jax.plan import Plan

# (mesh, plan) -> the metric (a float) or several named values (a dict)
Score = Callable[..., float | dict]


def cases(
    devices: Sequence[int],
    crs: Callable[[int], Sequence[int]],
    biases: Sequence[str],
    template: Plan | None = None,
) -> list[tuple[int, Plan]]:
    """(N, prism plan) for every N, every CR of `crs(N)`, every logit bias, each plan the
    `template` (exchange, compressor; default `Plan()`) at that CR and bias; at CR = 1 the
    biases coincide (log 1 = 0), so that case is listed once, with the first bias."""
    template = template or Plan()
    return [
        (n, dataclasses.replace(template, strategy="prism", cr=cr, logit_bias=bias))
        for n in devices
        for cr in crs(n)
        for bias in (biases[:1] if cr == 1 else biases)
    ]


def sweep(
    cfg: ModelConfig,
    plans: Sequence[tuple[int, Plan]],
    score: Score,
    *,
    metric: str,
    seq_len: int,
    progress: bool = True,
    desc: str = "",
    measure: bool = True,
) -> list[dict]:
    """Score every (N, plan) and, with `measure`, its savings measured from the compiled
    program (batch 1, T = `seq_len`; once per N and plan but its bias, which changes nothing).

    Returns one row per plan: devices, strategy, cr, logit_bias, `plan` (every field of the
    plan, `exchange` resolved for the model: a compressor's rows are told apart by it),
    `metric` (or the score's named values), bytes_per_device, comm_reduction and
    compute_reduction.
    """
    measured: dict[tuple, cost.CostReport] = {}
    rows = []
    for n, plan in tqdm(plans, desc=desc or metric, disable=not progress):
        value = score(edge_mesh(n), plan)
        row = {"devices": n, "strategy": plan.strategy, "cr": plan.cr}
        row |= {"logit_bias": plan.logit_bias, "plan": dataclasses.asdict(plan.for_model(cfg))}
        row |= value if isinstance(value, dict) else {metric: value}
        if measure:
            key = (n, dataclasses.replace(plan, logit_bias="none"))  # the bias costs nothing
            if key not in measured:
                measured[key] = cost.measure(cfg, plan, devices=n, seq_len=seq_len)
            row |= {"bytes_per_device": measured[key].bytes_sent}
            row |= {"comm_reduction": measured[key].comm_reduction}
            row |= {"compute_reduction": measured[key].compute_reduction}
        rows.append(row)
    return rows
