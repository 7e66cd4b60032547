"""DriveClassifier: which drive (poison / edible / neutral) a sensory vector speaks to.

As in the notebook, s_m(z) = y_m · z + b_m and P(z satisfies m) = softmax_m(s_m): one linear
layer whose rows y_m double as search keys for `SpatialMemory.sample` (y_edible finds food).
It is trained on the fruit embeddings scaled by an amount in [0, max_amount]: a sensor reading is
a tree embedding times 10^(−(dist/100)²), so a faint reading (amount below neutral_below, i.e.
far from every tree) must classify as neutral and a strong one as its fruit's drive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

DRIVES = ("poison", "edible", "neutral")  # the notebook's red / green / blue


@dataclass
class TrainingReport:
    loss: float
    accuracy: float
    steps: int


class DriveClassifier(nn.Module):
    def __init__(self, embed_dim: int, drives: tuple[str, ...] = DRIVES):
        super().__init__()
        self.drives = tuple(drives)
        self.drive_keys = {name: i for i, name in enumerate(self.drives)}
        self.drive_embeddings = nn.Linear(embed_dim, len(self.drives))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.drive_embeddings(z.to(self.drive_embeddings.weight.dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., num_drives) probabilities."""
        return torch.softmax(self.logits(z), dim=-1)

    def key(self, drive: str) -> torch.Tensor:
        """The search key y_drive (E,), detached."""
        if drive not in self.drive_keys:
            raise KeyError(f"unknown drive {drive!r}; drives are {self.drives}")
        return self.drive_embeddings.weight[self.drive_keys[drive]].detach()

    @classmethod
    def train_on_fruits(cls, fruit_embeddings: Mapping[str, torch.Tensor], poisonous: Iterable[str], *,
                        steps: int = 300, lr: float = 0.05, neutral_below: float = 0.1, max_amount: float = 1.5,
                        amounts: int = 64, seed: int = 0) -> tuple["DriveClassifier", TrainingReport]:
        """Fits the classifier to every fruit at `amounts` strengths (deterministic for a seed)."""
        poisonous = set(poisonous)
        unknown = poisonous - set(fruit_embeddings)
        if unknown:
            raise ValueError(f"poisonous fruits {sorted(unknown)} have no embedding")
        names = sorted(fruit_embeddings)
        emb = torch.stack([fruit_embeddings[n].to(torch.float32) for n in names])
        scale = torch.linspace(0.0, max_amount, amounts)
        z = (scale[:, None, None] * emb[None]).reshape(-1, emb.shape[-1])
        fruit_label = torch.tensor([DRIVES.index("poison" if n in poisonous else "edible") for n in names])
        labels = torch.where(scale[:, None] < neutral_below, DRIVES.index("neutral"), fruit_label[None]).reshape(-1)

        torch.manual_seed(seed)
        model = cls(emb.shape[-1])
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model.logits(z), labels)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = model.logits(z)
            report = TrainingReport(float(nn.functional.cross_entropy(logits, labels)),
                                    float((logits.argmax(-1) == labels).float().mean()), steps)
        return model.requires_grad_(False), report
