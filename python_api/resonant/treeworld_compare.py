"""The notebook's published numbers and the demo's verdict on each.

The notebook drew its memories without a seed, so a published number that depends on a memory
draw is one sample of a distribution. The demo measures the range of each such number over
several memory seeds and calls a published value "inside" when it lies within that range.
Numbers that depend only on the world (the closest tree, the sensor at the far corner) are
compared directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# Published in the notebook (its world, bge-large-en-v1.5 embeddings, E = 1024), keyed like ours.
NOTEBOOK = {
    "sensor_at_origin.closest_distance": 23.07,
    "recall_grid.error": dict(min=0.0, mean=0.0, max=0.0, std=0.0),
    "drive_classifier.accuracy": 1.0,
    "drive_classifier.loss": 0.30583107471466064,
    # 24 of 25: it printed Elizabeth's manchineel (poisonous) as edible (89.43%)
    "drive_classifier.tree_accuracy": 0.96,
    "value_of_apple_for_hunger": 1.2691352367401123,
    "sample.free_T1_sigma25": dict(deviation=53.28778076171875, avg_hunger=0.9949816465377808,
                                   min_hunger=0.4727088510990143),
    "sample.sqrtE_temperature": dict(deviation=70.107177734375, avg_hunger=0.7755414843559265,
                                     min_hunger=0.12780991196632385),
    "sample.location_biased": dict(deviation=32.35943603515625, avg_hunger=0.9999754428863525,
                                   min_hunger=0.9981056451797485),
    "sample.memory_location_temperature_100": dict(deviation=31.077287673950195, avg_hunger=0.6531907916069031,
                                                   min_hunger=0.11184682697057724),
    "leave_one_out.error": dict(min=0.0016184506239369512, mean=0.12764671444892883, max=4.752317905426025,
                                std=0.2841464579105377),
    "leave_one_out.dependencies": dict(min=0.0, mean=16.591796875, max=45.0, std=10.440792083740234),
    "prune.candidates_at_0.05": 273,
    "prune.candidates_at_0.01": 7,
    "prune.removed_per_step": [273, 127, 75, 28, 6, 6, 0],
    "prune.final_size": 509,
    "prune.read_change": dict(min=0.0, mean=0.010287650860846043, max=0.6817408204078674, std=0.04173653572797775),
    "prune.error_vs_sensor_before": dict(min=2.1720796209291453e-15, mean=0.4647279381752014, max=6.12962007522583,
                                         std=0.8044621348381042),
    "prune.error_vs_sensor_after": dict(min=2.1720796209291453e-15, mean=0.4682459533214569, max=6.12962007522583,
                                        std=0.8031671643257141),
    "regress.loss_every_10_steps": [0.0018476002151146531, 0.0009380565606988966, 0.000766694953199476,
                                    0.0006861960282549262, 0.000640565063804388, 0.0006383216823451221,
                                    0.0006177577306516469, 0.0006020850269123912, 0.0005893675261177123,
                                    0.0005786488763988018],
    "regress.read_change": dict(min=0.0, mean=0.005942051764577627, max=0.517316460609436, std=0.02310255914926529),
    "regress.error_vs_sensor_after": dict(min=2.1720796209291453e-15, mean=0.46631109714508057,
                                          max=6.12962007522583, std=0.8038018941879272),
    "memory_prune.final_size": 558,
}

SAMPLING_RUNS = {
    "sample.free_T1_sigma25": "free search, T = 1, σ × 25",
    "sample.sqrtE_temperature": "free search, T = √E",
    "sample.location_biased": "search biased to (100, 100) m",
    "sample.memory_location_temperature_100": "memory.sample near (100, 100) m",
}


@dataclass(frozen=True)
class Compared:
    label: str
    key: tuple  # (number name, then dict keys / list indices)
    target: bool = False  # the targets: published value inside our range


def _rows() -> list[Compared]:
    rows = [
        Compared("leave-one-out error: mean", ("leave_one_out.error", "mean"), True),
        Compared("leave-one-out error: max", ("leave_one_out.error", "max")),
        Compared("leave-one-out error: std", ("leave_one_out.error", "std")),
        Compared("dependencies per entry: mean", ("leave_one_out.dependencies", "mean")),
        Compared("prune candidates at max error 0.05", ("prune.candidates_at_0.05",), True),
        Compared("prune candidates at max error 0.01", ("prune.candidates_at_0.01",)),
    ]
    rows += [Compared(f"removed by prune step {i + 1}", ("prune.removed_per_step", i)) for i in range(7)]
    rows += [
        Compared("memory size after pruning", ("prune.final_size",), True),
        Compared("memory size after memory.prune (2nd draw)", ("memory_prune.final_size",)),
        Compared("grid read error vs sensor: mean", ("prune.error_vs_sensor_before", "mean"), True),
        Compared("grid read error vs sensor: max", ("prune.error_vs_sensor_before", "max")),
        Compared("grid read error vs sensor: std", ("prune.error_vs_sensor_before", "std")),
        Compared("grid read error after pruning: mean", ("prune.error_vs_sensor_after", "mean")),
        Compared("read change from pruning: mean", ("prune.read_change", "mean")),
        Compared("read change from pruning: max", ("prune.read_change", "max")),
        Compared("regression loss at step 0", ("regress.loss_every_10_steps", 0)),
        Compared("regression loss at step 90", ("regress.loss_every_10_steps", 9)),
        Compared("read change after regression: mean", ("regress.read_change", "mean")),
        Compared("grid read error after regression: mean", ("regress.error_vs_sensor_after", "mean")),
    ]
    for key, words in SAMPLING_RUNS.items():
        rows += [Compared(f"hunger at samples, {words}: mean", (key, "avg_hunger")),
                 Compared(f"hunger at samples, {words}: min", (key, "min_hunger")),
                 Compared(f"sample spread, {words}", (key, "deviation"))]
    return rows


COMPARED = _rows()


def value_at(numbers: dict, key: tuple) -> Optional[float]:
    """The number at key, or None where it was not measured (e.g. fewer regression steps)."""
    if key[0] not in numbers:
        return None
    value = numbers[key[0]]
    for part in key[1:]:
        if isinstance(value, list) and isinstance(part, int) and part >= len(value):
            # a prune stops after a step that removes nothing: every later step removes nothing too
            return 0 if key[0] == "prune.removed_per_step" else None
        value = value[part]
    return float(value)


@dataclass
class Verdict:
    label: str
    ours: Optional[float]
    low: Optional[float]
    high: Optional[float]
    published: float
    target: bool
    verdict: str

    def as_dict(self) -> dict:
        return dict(label=self.label, ours=self.ours, range=[self.low, self.high], notebook=self.published,
                    target=self.target, verdict=self.verdict)


def compare(ours: dict, draws: Sequence[dict], rows: Iterable[Compared] = COMPARED) -> list[Verdict]:
    """One verdict per row: the published value against the range of `draws` (one dict of numbers
    per memory seed); `ours` is the run whose figures were drawn."""
    verdicts = []
    for row in rows:
        values = [v for v in (value_at(d, row.key) for d in draws) if v is not None]
        published = value_at(NOTEBOOK, row.key)
        low, high = (min(values), max(values)) if values else (None, None)
        if not values:
            verdict = "no range measured"
        elif low <= published <= high:
            verdict = "inside"
        else:
            verdict = "below range" if published < low else "above range"
        verdicts.append(Verdict(row.label, value_at(ours, row.key), low, high, published, row.target, verdict))
    return verdicts


def exact(label: str, ours: float, published: float, rel_tol: float) -> Verdict:
    """A world-only number: equal to the published one within rel_tol, or not."""
    close = abs(ours - published) <= rel_tol * abs(published)
    verdict = f"matches (within {rel_tol:.1%})" if close else f"differs by {ours / published - 1:+.1%}"
    return Verdict(label, ours, None, None, published, False, verdict)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{int(value)}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def table(verdicts: Sequence[Verdict], seed: int, num_seeds: int) -> list[str]:
    head = f"{'number':<58} {f'seed {seed}':>10} {f'range over {num_seeds} seeds':>24} {'notebook':>10}  verdict"
    lines = [head, "-" * len(head)]
    for v in verdicts:
        rng = f"{fmt(v.low)} - {fmt(v.high)}" if v.low is not None else "-"
        mark = " (target)" if v.target else ""
        lines.append(f"{v.label:<58} {fmt(v.ours):>10} {rng:>24} {fmt(v.published):>10}  {v.verdict}{mark}")
    return lines


def summary(verdicts: Sequence[Verdict]) -> list[str]:
    targets = [v for v in verdicts if v.target]
    missed = [v for v in targets if v.verdict != "inside"]
    ranged = [v for v in verdicts if v.low is not None]
    inside = sum(v.verdict == "inside" for v in ranged)
    lines = [f"targets inside our range: {len(targets) - len(missed)} of {len(targets)}; "
             f"all ranged numbers inside: {inside} of {len(ranged)}"]
    lines += [f"  MISSED target: {v.label}: notebook {fmt(v.published)}, our range {fmt(v.low)} - {fmt(v.high)}"
              for v in missed]
    return lines
