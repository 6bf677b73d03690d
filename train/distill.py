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
from minigrok.quantize import quantize_model

from .config import TrainConfig
from .tokenizer import Tokenizer, vocabulary_hash


@dataclass
class Teacher:
    """A loaded teacher: the model, the path it came from, the sha256 of its weight files (what resume checks) and
    its tokenizer.json with the vocabulary_hash of it (None for a Hugging Face directory without one)."""

    model: MiniGrok
    path: str
    sha256: str
    tokenizer_file: Path | None = None
    vocabulary: str | None = None


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


def teacher_model(teacher: Teacher, device: torch.device, dtype: str) -> MiniGrok:
    """The teacher's model on `device` in train.distill_teacher_dtype: fp32, bf16, or int8 (its projections through
    minigrok.quantize's PTQ, the embedding and so a tied head in fp32)."""
    model = teacher.model.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    return quantize_model(model, bits=8) if dtype == "int8" else model


def check_teacher_tokenizer(teacher: Teacher, student: Tokenizer, student_file: Path) -> None:
    """Refuse a teacher whose tokenizer.json has other tokens or merges than the student's: the same ids would mean
    other text, so the KL would compare unrelated distributions."""
    if teacher.vocabulary is not None and teacher.vocabulary != vocabulary_hash(student.to_dict()):
        raise ValueError(
            f"--teacher's {teacher.tokenizer_file} and the student's {student_file} are different tokenizers (their "
            f"vocabularies or merges differ): distil on the teacher's, --tokenizer {teacher.tokenizer_file}"
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
            student_softcap=self.student.config.logit_softcap,
            teacher_softcap=self.teacher.config.logit_softcap,
            backend=self.student.config.backend,
        )
