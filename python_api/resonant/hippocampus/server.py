"""The hippocampus REST service: named PatternMemory models behind FastAPI.

Routes (the seed service's, plus recall, step, health and model management):

    PUT  /dataset/train/update   replace the training set (creates the model on first use)
    POST /model/train            fit the memory; blocks until done, returns the seconds taken
    POST /model/testpattern      recall from corrupted pattern(s): distance and closest pattern
    POST /model/step             per cue, num_units − units recalled wrongly
    POST /model/recall           the recalled patterns
    GET  /model                  the model's size and parameters
    GET  /health                 liveness and the model names

The routes above act on the model named "default"; the same routes under /models/{name} act on
model `name` (DELETE /models/{name} removes one). Operations on one model run one at a time (a
lock per model); different models run concurrently in the server's thread pool (the kernels
release the GIL). An operation that fails leaves the model as it was: PatternMemory swaps a new
training set or new parameters in only when complete. Bad input answers 4xx with a message:
422 for invalid bodies (and training longer than max_train_passes), 404 for a model that has no
training set yet, 409 past max_models.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..extras import require

require("fastapi", "serve", "the hippocampus server")
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from . import schema  # noqa: E402
from .memory import PatternMemory  # noqa: E402

DEFAULT_MODEL = "default"


@dataclass
class Slot:
    """One named model: its memory (None until the first update) and the lock that serialises it."""

    name: str
    memory: Optional[PatternMemory] = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Registry:
    """The server's models by name; creating and removing names is serialised by one lock."""

    def __init__(self, *, backend: str, device, max_models: int, max_train_passes: int):
        self.backend, self.device, self.max_models = backend, device, max_models
        self.max_train_passes = max_train_passes
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, s in self._slots.items() if s.memory is not None)

    def slot(self, name: str, *, create: bool) -> Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                if not create:
                    raise HTTPException(404, f"model {name!r} has no training set: PUT its dataset/train/update "
                                             "first")
                if len(self._slots) >= self.max_models:
                    raise HTTPException(409, f"the server already holds max_models={self.max_models} models; "
                                             "DELETE one first")
                slot = self._slots[name] = Slot(name)
            return slot

    def holds(self, slot: Slot) -> bool:
        with self._lock:
            return self._slots.get(slot.name) is slot

    def discard_empty(self, slot: Slot) -> None:
        """Forgets a slot whose first update failed (it holds no model), so it takes no place."""
        with self._lock:
            if slot.memory is None and self._slots.get(slot.name) is slot:
                del self._slots[slot.name]

    def remove(self, name: str) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                raise HTTPException(404, f"model {name!r} does not exist")
        with slot.lock:  # waits for the model's running operation
            with self._lock:
                if self._slots.get(name) is slot:
                    del self._slots[name]

    def new_memory(self, num_units: int) -> PatternMemory:
        return PatternMemory(num_units, backend=self.backend, device=self.device)


def _rows_out(t) -> list:
    return t.tolist()


def _info(name: str, memory: PatternMemory) -> schema.ModelInfo:
    return schema.ModelInfo(model=name, num_units=memory.num_units, patterns=len(memory), binary=bool(memory.binary),
                            activity=memory.activity, trained=memory.trained,
                            inverse_temperature=memory.inverse_temperature)


def _trained_memory(slot: Slot) -> PatternMemory:
    if slot.memory is None:
        raise HTTPException(404, f"model {slot.name!r} has no training set: PUT its dataset/train/update first")
    return slot.memory


def _update(registry: Registry, slot: Slot, body: schema.UpdateRequest, num_units: int) -> schema.ModelInfo:
    """Replaces the slot's training set (the caller holds slot.lock); a new PatternMemory when the
    model is new or the unit count changed, swapped in only once its update succeeded."""
    memory = slot.memory
    if memory is None or memory.num_units != num_units:
        memory = registry.new_memory(num_units)
    try:
        memory.update(body.patterns, binary=body.binary)
    except Exception:
        if slot.memory is None:
            registry.discard_empty(slot)
        raise
    slot.memory = memory
    return _info(slot.name, memory)


def _model_routes(registry: Registry, name_of: Callable, tag: str, op_prefix: str) -> APIRouter:
    """The per-model operations, with the model name from `name_of` (a FastAPI dependency)."""
    router = APIRouter(tags=[tag])
    errors = {404: {"model": schema.Error}, 409: {"model": schema.Error}, 422: {"model": schema.Error}}

    def existing(name: str = Depends(name_of)) -> Slot:
        return registry.slot(name, create=False)

    @router.put("/dataset/train/update", response_model=schema.ModelInfo, responses=errors,
                operation_id=f"{op_prefix}update", summary="Replace the training set (creates the model)")
    def update(body: schema.UpdateRequest, name: str = Depends(name_of)):
        num_units = len(body.patterns[0])
        if body.shape is not None and math.prod(body.shape) != num_units:
            raise ValueError(f"shape {body.shape} has {math.prod(body.shape)} units but each pattern has {num_units}")
        while True:
            slot = registry.slot(name, create=True)
            with slot.lock:
                if registry.holds(slot):  # not removed while this request waited for the lock
                    return _update(registry, slot, body, num_units)

    @router.get("/model", response_model=schema.ModelInfo, responses=errors, operation_id=f"{op_prefix}info",
                summary="The model's training set size and parameters")
    def info(slot: Slot = Depends(existing)):
        with slot.lock:
            return _info(slot.name, _trained_memory(slot))

    @router.post("/model/train", response_model=schema.TrainResponse, responses=errors,
                 operation_id=f"{op_prefix}train", summary="Train; blocks until done")
    def train(body: schema.TrainRequest, slot: Slot = Depends(existing)):
        passes = body.epochs * body.runs * body.copies
        if passes > registry.max_train_passes:
            raise ValueError(f"epochs × runs × copies = {passes} exceeds this server's max_train_passes="
                             f"{registry.max_train_passes} (a model answers nothing else while it trains)")
        with slot.lock:
            seconds = _trained_memory(slot).train(epochs=body.epochs, runs=body.runs,
                                                  max_corruption=body.max_corruption, copies=body.copies,
                                                  batch_size=body.batch_size, lr=body.lr, seed=body.seed)
        return schema.TrainResponse(seconds=seconds)

    @router.post("/model/recall", response_model=schema.RecallResponse, responses=errors,
                 operation_id=f"{op_prefix}recall", summary="Complete cues")
    def recall(body: schema.RecallRequest, slot: Slot = Depends(existing)):
        with slot.lock:
            return schema.RecallResponse(recalled=_rows_out(_trained_memory(slot).recall(body.cues, steps=body.steps)))

    @router.post("/model/testpattern", response_model=schema.TestPatternResponse, responses=errors,
                 operation_id=f"{op_prefix}testpattern", summary="Test recall of corrupted pattern(s)")
    def test_pattern(body: schema.TestPatternRequest, slot: Slot = Depends(existing)):
        with slot.lock:
            result = _trained_memory(slot).test_pattern(body.corrupted, body.target, steps=body.steps)
        return schema.TestPatternResponse(recalled=_rows_out(result.recalled), distance=result.distance.tolist(),
                                          closest_index=result.closest_index.tolist(),
                                          closest_pattern=_rows_out(result.closest_pattern))

    @router.post("/model/step", response_model=schema.StepResponse, responses=errors,
                 operation_id=f"{op_prefix}step", summary="Gym-like step: reward per cue")
    def step(body: schema.StepRequest, slot: Slot = Depends(existing)):
        with slot.lock:
            rewards = _trained_memory(slot).step(body.cues, body.targets, body.repeats, steps=body.steps)
        return schema.StepResponse(rewards=rewards.reshape(-1).tolist())

    return router


def create_app(*, backend: str = "auto", device=None, max_models: int = 64, max_train_passes: int = 160_000) -> FastAPI:
    """The service as an ASGI app (run it with uvicorn, or `resonant serve hippocampus`).

    max_models bounds the models held at once; max_train_passes bounds epochs × runs × copies
    (corrupted passes over the training set) of one train request, since a model answers nothing
    else while it trains."""
    registry = Registry(backend=backend, device=device, max_models=max_models, max_train_passes=max_train_passes)
    app = FastAPI(title="resonant hippocampus",
                  description="Pattern completion on fused Gaussian-kernel reads: store patterns, train, "
                              "recall from partial cues.",
                  version="1")
    app.state.registry = registry

    def default_name() -> str:
        return DEFAULT_MODEL

    def path_name(name: str = Path(pattern=schema.MODEL_NAME, description="model name")) -> str:
        return name

    app.include_router(_model_routes(registry, default_name, "default model", ""))
    app.include_router(_model_routes(registry, path_name, "named models", "named_"), prefix="/models/{name}")

    @app.get("/health", response_model=schema.Health, operation_id="health", tags=["service"])
    def health():
        return schema.Health(status="ok", models=registry.names())

    @app.delete("/models/{name}", status_code=204, responses={404: {"model": schema.Error}},
                operation_id="delete_model", tags=["named models"])
    def delete(name: str = Path(pattern=schema.MODEL_NAME)):
        registry.remove(name)

    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    def invalid_argument(_request: Request, exc: Exception):
        # PatternMemory's argument checks: the message names the argument and the valid range
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    def invalid_body(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return JSONResponse(status_code=422, content={"detail": problems or "invalid request"})

    return app
