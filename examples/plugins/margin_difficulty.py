"""A difficulty score from a plugin file: one minus the top-2 margin of a model's softmax.

    python train_student_rl.py run.plugins=[examples/plugins/margin_difficulty.py] difficulty.score=margin
    python train_student_rl.py run.plugins=[examples/plugins/margin_difficulty.py] difficulty.score=margin \
        difficulty.margin.model=teacher

This file alone adds the score: its name for difficulty.score, its key difficulty.margin.model (checked, listed by
--help) and the formula. The curriculum calls it at every difficulty refresh with the teacher's and the student's
logits on the training images' evaluation views, and the keys of its section as keyword arguments; the run's
config.yaml records both keys, so a resume is checked against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import opt
from models import DIFFICULTY_SCORES


@dataclass
class MarginConfig:
    model: str = opt("student", "whose probabilities give the margin: the student's (what it still confuses) or "
                                "the teacher's (what is ambiguous in itself)", choices=("student", "teacher"))


@DIFFICULTY_SCORES.register("margin", config=MarginConfig,
                            help="1 - (p_(1) - p_(2)), the top-2 margin of the student's or the teacher's softmax "
                                 "(difficulty.margin.*; examples/plugins/margin_difficulty.py)")
def margin_difficulty(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      model: str = "student") -> torch.Tensor:
    """Difficulty as one minus the margin between the two most probable classes:

        D = 1 - (p_(1) - p_(2)),   p = softmax(logits of `model`),  p_(1) >= p_(2) its two largest entries

    0 for a confident prediction, 1 when two classes tie. Margin sampling (Scheffer, Decomain and Wrobel, "Active
    Hidden Markov Models for Information Extraction", IDA 2001; Settles, "Active Learning Literature Survey", 2009,
    Sec. 3.1). Computed in float32 at temperature 1. Shapes: teacher_logits, student_logits [N, C], C >= 2 -> D [N]
    in [0, 1]."""
    logits = student_logits if model == "student" else teacher_logits
    top2 = F.softmax(logits.float(), dim=1).topk(2, dim=1).values
    return (1.0 - (top2[:, 0] - top2[:, 1])).clamp(0.0, 1.0)
