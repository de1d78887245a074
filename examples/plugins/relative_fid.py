"""A gan_vae expert-expansion rule from a plugin file: a new expert when the nearest one fits the new task much worse
than it fits its own.

    python -m gan_vae.continual --config configs/gan_vae_shared_data.yaml \
        run.plugins=[examples/plugins/relative_fid.py] teacher.expansion=relative_fid teacher.relative_fid.ratio=3

This file alone adds the rule: its name for teacher.expansion, its key teacher.relative_fid.ratio (range-checked,
listed by --help), and the decision with the values it used, which experts.json records under the rule's name.
An absolute threshold (teacher.fid_threshold, the built-in rule) depends on the FID's feature space and on how well
the experts train; a ratio to the expert's own FID does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import opt
from gan_vae.experts import EXPANSION_RULES, Expansion, ExpansionChoice


def relative_fid_decision(fids: list[float], own_fids: list[float], ratio: float,
                          max_experts: int) -> tuple[str, int]:
    """("new", len(fids)) or ("reuse", b), b = argmin_e FID_e the nearest expert:

        new  iff  E = 0  or  (FID_b > ratio * FID_b^own  and  E < max_experts),   E = len(fids)

    FID_e: expert e's samples against the new task's real images; FID_e^own: expert e's samples against the test
    images of the last task it learned (its quality on its own data, measured after it trained). An example rule,
    not one from a paper: a ratio rather than a threshold, so the test does not depend on the scale of the FID's
    features (FID: Heusel et al., NeurIPS 2017)."""
    if not fids:
        return "new", 0
    best = int(np.argmin(fids))
    if fids[best] > ratio * own_fids[best] and len(fids) < max_experts:
        return "new", len(fids)
    return "reuse", best


@dataclass
class RelativeFIDConfig:
    ratio: float = opt(2.0, "a new expert when the nearest expert's FID on the new task exceeds this many times "
                            "its FID on its own last task", gt=0)


@EXPANSION_RULES.register("relative_fid", config=RelativeFIDConfig,
                          help="a new expert when the nearest one's FID on the task exceeds teacher.relative_fid.ratio "
                               "times its FID on its own task (examples/plugins/relative_fid.py)")
def relative_fid(choice: ExpansionChoice) -> Expansion:
    """`relative_fid_decision`; records the ratio, the cap and the nearest expert's own FID it compared with."""
    ratio = float(choice.cfg.teacher.relative_fid.ratio)
    action, index = relative_fid_decision(choice.fids, choice.own_fids, ratio, choice.max_experts)
    values = {"teacher.relative_fid.ratio": ratio, "teacher.max_experts": choice.max_experts}
    if choice.fids:
        best = int(np.argmin(choice.fids))
        values["nearest_expert_own_fid"] = choice.own_fids[best]
    return Expansion(action, index, values)
