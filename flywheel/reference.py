"""The reference plant: a yardstick no policy touched and no model trained on.

Once a model runs the plant it prevents the failures it learnt, so the eval split of later
turns (drawn from periods it ran) holds few of them and moves with the data, not with the
model.  The reference set does not move: at the campaign's first learning turn a **twin of
the plant** (same scenario, a fixed seed of its own: the campaign seed + ``seed_offset``)
runs in-process under run-to-failure for ``period`` of plant time; its telemetry is
windowed by the same code the dataset builder and the bridge use
(:func:`flywheel.base.features.windows`) and labelled by the builder's own label join
(:func:`ingest.labels.label_windows`).  Windows whose outcome is unknown (the horizon runs
past the twin's end) are left out.  Every learning turn scores the challenger and the
champion it is gated against on it (``reference.challenger.<metric>``,
``reference.champion.<metric>``, the ``eval.*`` metric names without ``eval.``), and the
report draws the curve: does data make the model better, or not?

The reference family trained in the same turn (the trees) is scored on it too
(``reference.<family>.<metric>``), so the report's data-value curve shows both families
against the data they were trained on.

This is a simulator's capability: a real plant has no twin.  Its equivalent is the campaign's
**control fleet** (``control_fleet``): a share of machines, chosen by seed, that keep the
fixed-interval policy and whose outcomes are scored apart.

    ref = build_reference_set(scenario, seed=1_000_003, period_s=43_200, window=WindowConfig())
    scores = score_on_reference(ref, "adapter/", device=pick_device())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flywheel.base.config import ConfigError, parse_duration

#: Columns of the reference set, as a snapshot split has them.
COLUMNS = ("line", "machine", "kind", "start_seq", "end_seq", "start_ts", "end_ts", "readings", "label",
           "label_source")


@dataclass
class ReferenceConfig:
    period: str = field(default="12h", metadata={
        "help": "plant time the twin runs under run-to-failure to make the reference set; '0' = no reference set"})
    seed_offset: int = field(default=1_000_003, metadata={
        "help": "the twin's seed is the campaign seed plus this (its own randomness, fixed per campaign seed)"})

    def __post_init__(self):
        try:
            seconds = parse_duration(self.period) if self.period not in ("0", "") else 0.0
        except ConfigError as exc:
            raise ConfigError(f"reference.period: {exc}") from None
        if seconds < 0:
            raise ConfigError(f"reference.period should be a plant time such as 12h, or 0, got {self.period!r}")

    @property
    def period_s(self) -> float:
        return 0.0 if self.period in ("0", "") else parse_duration(self.period)


def build_reference_set(scenario, *, seed: int, period_s: float, window):
    """The twin's windows with their labels (a pandas DataFrame in snapshot-split columns)."""
    import pandas as pd

    from factory_sim import Plant
    from flywheel.base import contract
    from flywheel.base.features import readings_json, windows
    from ingest import label_windows

    plant = Plant(scenario, seed=seed)
    messages: list = []
    plant.run(period_s, sink=messages.append)        # no policy: run to failure
    by_machine: dict[tuple[str, str], list] = {}
    last_ts: dict[tuple[str, str], float] = {}
    events = []
    for m in messages:
        key = (m.line, m.machine)
        last_ts[key] = max(last_ts.get(key, m.ts), m.ts)
        if isinstance(m, contract.Telemetry):
            by_machine.setdefault(key, []).append(m)
        else:
            events.append(contract.to_dict(m))
    rows = [{"line": w.line, "machine": w.machine, "kind": w.kind, "start_seq": w.start_seq, "end_seq": w.end_seq,
             "start_ts": w.start_ts, "end_ts": w.end_ts, "readings": readings_json(w.readings)}
            for key in sorted(by_machine) for w in windows(by_machine[key], window)]
    win = pd.DataFrame(rows, columns=list(COLUMNS[:8]))
    ev = pd.DataFrame(events) if events else pd.DataFrame(columns=["line", "machine", "ts", "seq", "type", "mode",
                                                                  "finding"])
    labeled = label_windows(win, ev, window.horizon_s, last_ts)
    return labeled[labeled["known"]].drop(columns=["known"]).reset_index(drop=True)[list(COLUMNS)]


def load_or_build_reference_set(path, build: Callable[[], Any], log: Callable[[str], None]):
    """The reference set an earlier turn saved at ``path``, else ``build()``, saved there (whole or
    not at all).  A saved file that does not read (damaged, cut short by a crash of a version that
    wrote it in place) is moved to ``<name>.unreadable``, said in one line to ``log``, and made again:
    the twin's seed is fixed, so it gives the same windows."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.base.errors import one_line
    from ingest import Lake

    if path.is_file():
        try:   # pages' CRCs checked, where the file has them: changed bytes fail the read
            return pq.read_table(path, page_checksum_verification=True).to_pandas()
        except (OSError, ValueError, pa.ArrowException) as exc:
            kept = path.with_name(path.name + ".unreadable")
            os.replace(path, kept)
            log(f"the reference plant's windows {path} do not read ({one_line(exc)}): made again from the "
                f"scenario and its fixed seed (the same windows); the unreadable file is kept as {kept}")
    reference = build()   # written as the lake writes its files: zstd, page CRCs, atomically
    Lake.open(str(path.parent)).write_table(pa.Table.from_pandas(reference, preserve_index=False), str(path))
    return reference


def score_on_reference(reference, adapter_dir: str, *, batch_size: int = 64, device=None, threshold=None,
                       costs=None, family: str = "lora") -> dict:
    """A model's ``eval.*`` metrics on the reference set, named without ``eval.``: a LoRA adapter
    or a tree model, as its directory records (``family`` is only a hint for readers). With its operating point (``threshold``) and
    the decision costs (``costs``, :class:`finetune.evaluate.WindowCosts`) also
    ``cost_per_1k_windows``: the money its decisions would cost per 1,000 reference windows."""
    from finetune import evaluate_model_report, frame_decision_cost
    from flywheel.base.contract import LABELS

    t0 = time.perf_counter()
    report = evaluate_model_report(adapter_dir, reference, batch_size, device)
    out = {k.removeprefix("eval."): v for k, v in report.metrics.items() if k.count(".") == 1}
    out.pop("predict_s", None)
    if threshold is not None and costs is not None and len(reference) and report.probs is not None:
        _, money = frame_decision_cost(1.0 - report.probs[:, LABELS.index("ok")], reference, costs, float(threshold))
        out["cost_per_1k_windows"] = 1000.0 * money / len(reference)
    out["score_s"] = time.perf_counter() - t0
    return out
