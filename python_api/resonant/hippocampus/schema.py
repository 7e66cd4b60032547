"""Request and response bodies of the hippocampus service (pydantic), shared by server and client.

The seed service's field names are kept where it had them (`maxepcs`/`maxruns` are accepted for
`epochs`/`runs`; test pattern takes `corrupted` and `target`). Patterns travel as lists of
numbers, one list per pattern; `test_pattern` and `recall` take one pattern or a list of them and
answer in the same form.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from .memory import MAX_UNITS

MAX_ROWS = 1_000_000
MODEL_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"

Row = list[float]
Rows = list[Row]


def _rows(description: str, *, min_length: int = 0):
    return Field(description=description, min_length=min_length, max_length=MAX_ROWS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class UpdateRequest(Strict):
    patterns: Rows = _rows("the training set: N patterns of num_units numbers each (binary 0/1 or real)",
                           min_length=1)
    shape: Optional[list[int]] = Field(None, max_length=16,
                                       description="the patterns' unit shape (e.g. [6, 2, 3, 4]); its product must "
                                                   "equal each pattern's length")
    binary: Optional[bool] = Field(None, description="true: patterns must be 0/1 (recall keeps their activity); "
                                                     "false: real-valued recall; null: detect")


class ModelInfo(BaseModel):
    model: str
    num_units: int
    patterns: int
    binary: bool
    activity: Optional[int] = Field(None, description="active units a binary recall keeps")
    trained: bool
    inverse_temperature: float


class TrainRequest(Strict):
    epochs: int = Field(20, ge=1, le=10_000, validation_alias=AliasChoices("epochs", "maxepcs"),
                        description="passes over the corrupted training copies (seed name: maxepcs)")
    runs: int = Field(1, ge=1, le=100, validation_alias=AliasChoices("runs", "maxruns"),
                      description="independent restarts, the best kept (seed name: maxruns)")
    max_corruption: float = Field(0.9, ge=0.0, le=1.0, description="copies lose a random fraction U(0, this) of "
                                                                    "their (active) units")
    copies: int = Field(16, ge=1, le=10_000, description="corrupted copies of each pattern per epoch")
    batch_size: int = Field(256, ge=1, le=65_536, description="cues per gradient step")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Adam learning rate of log β (ρ: a tenth of it)")
    seed: Optional[int] = Field(None, ge=0, le=2**62, description="random seed of the corruptions and restarts")


class TrainResponse(BaseModel):
    seconds: float = Field(description="wall time the training took")


class RecallRequest(Strict):
    cues: Union[Row, Rows] = Field(description="one cue or a list of cues", max_length=MAX_ROWS)
    steps: int = Field(10, ge=1, le=10_000, description="most reads per cue")


class RecallResponse(BaseModel):
    recalled: Union[Row, Rows]


class TestPatternRequest(Strict):
    __test__ = False  # not a pytest class

    corrupted: Union[Row, Rows] = Field(description="one corrupted pattern or a list of them", max_length=MAX_ROWS)
    target: Union[Row, Rows] = Field(description="the original pattern(s), shaped like corrupted",
                                     max_length=MAX_ROWS)
    steps: int = Field(10, ge=1, le=10_000)


class TestPatternResponse(BaseModel):
    __test__ = False

    recalled: Union[Row, Rows]
    distance: Union[int, list[int]] = Field(description="units where the recall differs from the target")
    closest_index: Union[int, list[int]] = Field(description="index of the training pattern nearest the recall")
    closest_pattern: Union[Row, Rows]


class StepRequest(Strict):
    cues: Rows = _rows("partial cues", min_length=1)
    targets: Rows = _rows("the pattern each cue should recall", min_length=1)
    repeats: int = Field(1, ge=1, le=1_000_000, description="tests per cue (recall is deterministic: all score alike)")
    steps: int = Field(10, ge=1, le=10_000)


class StepResponse(BaseModel):
    rewards: list[float] = Field(description="per cue: num_units − units recalled wrongly, averaged over repeats")


class Health(BaseModel):
    status: str
    models: list[str]


class Error(BaseModel):
    detail: str


__all__ = ["MAX_UNITS", "MAX_ROWS", "MODEL_NAME", "UpdateRequest", "ModelInfo", "TrainRequest", "TrainResponse",
           "RecallRequest", "RecallResponse", "TestPatternRequest", "TestPatternResponse", "StepRequest",
           "StepResponse", "Health", "Error"]
