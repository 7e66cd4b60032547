"""`Client(url)`: a PatternMemory served by `resonant serve hippocampus`, over HTTP (httpx).

It has PatternMemory's methods and return types (tensors, PatternTest), so code written against
a local memory runs against a server unchanged. A request the server rejects (4xx) raises
ValueError with the server's message, as the local memory would.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..extras import require
from .memory import PatternTest

httpx = require("httpx", "serve", "resonant.hippocampus.Client")


def _rows(x) -> list:
    """Tensors, arrays and nested lists to JSON lists (the server checks shapes and values)."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return [_rows(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v for v in x]


class Client:
    """A PatternMemory on a server at `url`; `model` names which of the server's models (the
    server's default model when None)."""

    def __init__(self, url: str = "http://127.0.0.1:1323", *, model: Optional[str] = None, timeout: float = 600.0,
                 dtype: torch.dtype = torch.float32):
        self.url, self.model, self.dtype = url.rstrip("/"), model, dtype
        self._prefix = "" if model is None else f"/models/{model}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __repr__(self) -> str:
        return f"Client({self.url!r}, model={self.model!r})"

    # ---- plumbing -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Optional[dict] = None, *, model_route: bool = True) -> dict:
        response = self._http.request(method, (self._prefix if model_route else "") + path, json=body)
        if 400 <= response.status_code < 500:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ValueError(f"{self.url}{path}: {detail} (HTTP {response.status_code})")
        response.raise_for_status()
        return response.json() if response.content else {}

    def _tensor(self, x) -> torch.Tensor:
        return torch.tensor(x, dtype=self.dtype)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the PatternMemory methods ---------------------------------------------------------------

    def update(self, patterns, *, binary: Optional[bool] = None) -> None:
        self._call("PUT", "/dataset/train/update", {"patterns": _rows(patterns), "binary": binary})

    def train(self, epochs: int = 20, runs: int = 1, *, max_corruption: float = 0.9, copies: int = 16,
              batch_size: int = 256, lr: float = 0.1, seed: Optional[int] = None) -> float:
        body = {"epochs": epochs, "runs": runs, "max_corruption": max_corruption, "copies": copies,
                "batch_size": batch_size, "lr": lr, "seed": seed}
        return float(self._call("POST", "/model/train", body)["seconds"])

    def recall(self, cues, steps: int = 10) -> torch.Tensor:
        return self._tensor(self._call("POST", "/model/recall", {"cues": _rows(cues), "steps": steps})["recalled"])

    def test_pattern(self, corrupted, target, *, steps: int = 10) -> PatternTest:
        out = self._call("POST", "/model/testpattern",
                         {"corrupted": _rows(corrupted), "target": _rows(target), "steps": steps})
        return PatternTest(self._tensor(out["recalled"]), torch.tensor(out["distance"]),
                           torch.tensor(out["closest_index"]), self._tensor(out["closest_pattern"]))

    def step(self, cues, targets, repeats: int = 1, *, steps: int = 10) -> torch.Tensor:
        cues, targets = _rows(cues), _rows(targets)
        single = bool(cues) and not isinstance(cues[0], list)  # one cue: the server takes lists of cues
        body = {"cues": [cues] if single else cues, "targets": [targets] if single else targets,
                "repeats": repeats, "steps": steps}
        rewards = self._tensor(self._call("POST", "/model/step", body)["rewards"])
        return rewards[0] if single else rewards

    # ---- service ---------------------------------------------------------------------------------

    def info(self) -> dict:
        """The model's num_units, patterns, binary, activity, trained and inverse_temperature."""
        return self._call("GET", "/model")

    def health(self) -> dict:
        return self._call("GET", "/health", model_route=False)

    def delete(self) -> None:
        """Removes this named model from the server."""
        if self.model is None:
            raise ValueError("the default model cannot be deleted; name a model with Client(url, model=...)")
        self._call("DELETE", f"/models/{self.model}", model_route=False)
