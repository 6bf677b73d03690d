"""Knowledge distillation: a frozen teacher beside the student and the fused distillation loss of their hidden states
(run.py records the teacher in run.json, so --resume continues with the same one)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigrok.checkpoint import file_sha256
from minigrok.functional import DistillationLoss, linear_distillation_loss
from minigrok.model import MiniGrok

from .config import TrainConfig


@dataclass
class Teacher:
    """A loaded teacher: the model, the path it came from and the sha256 of its weight files (what resume checks)."""

    model: MiniGrok
    path: str
    sha256: str


def weights_sha256(files: list[Path]) -> str:
    """One sha256 over the weight files (each file's sha256, in order)."""
    return hashlib.sha256("".join(file_sha256(path) for path in files).encode()).hexdigest()


def check_teacher_vocab(teacher: Teacher, student_vocab: int) -> None:
    vocab = teacher.model.config.vocab_size
    if vocab != student_vocab:
        raise ValueError(
            f"--teacher {teacher.path} has vocab_size={vocab} but the student has vocab_size={student_vocab}: "
            "distil with the teacher's tokenizer (--tokenizer TEACHER/tokenizer.json) and vocabulary"
        )


class DistilledStudent(nn.Module):
    """The student and its frozen teacher in one module whose forward is the distillation loss, so DDP sees the
    student's forward and syncs its gradients only (the teacher's weights need none and get none)."""

    def __init__(self, student: MiniGrok, teacher: MiniGrok, config: TrainConfig):
        super().__init__()
        self.student, self.teacher, self.config = student, teacher.eval().requires_grad_(False), config

    def train(self, mode: bool = True) -> DistilledStudent:
        self.student.train(mode)  # the teacher stays in eval mode
        return self

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> DistillationLoss:
        with torch.no_grad():
            teacher_hidden = self.teacher.hidden_states(input_ids)
        hidden = self.student.hidden_states(input_ids)
        return linear_distillation_loss(
            hidden.flatten(0, 1),
            self.student.head_weight,
            teacher_hidden.flatten(0, 1),
            self.teacher.head_weight,
            targets.flatten(),
            alpha=self.config.distill_alpha,
            temperature=self.config.distill_temperature,
            kind=self.config.distill_kind,
            backend=self.student.config.backend,
        )
