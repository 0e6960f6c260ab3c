"""A small, learnable synthetic snapshot (tests, benchmarks, notebooks).

Windows are stored as the dataset builder stores them, featuriser-neutral (``readings``:
JSON, oldest first), from made-up readings with an obvious cause: a pump whose bearing runs hot fails with ``BRG``,
a milling machine that vibrates hard fails with ``TWF``, everything else is ``ok``.  A
model that learns anything at all beats the majority label on it.

    python -m finetune.synthetic /tmp/snap --train 600 --eval 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from flywheel.base.features import readings_json

PUMP = {"vibration_mm_s": (2.0, 0.3), "bearing_temp_k": (330.0, 2.0), "discharge_pressure_bar": (6.0, 0.2),
        "motor_current_a": (20.0, 0.8)}
MILLING = {"air_temp_k": (300.0, 1.0), "process_temp_k": (310.0, 1.0), "rotational_speed_rpm": (1539.0, 90.0),
           "torque_nm": (40.0, 5.0), "vibration_mm_s": (2.0, 0.3), "spindle_current_a": (12.0, 0.8)}


def _window(rng: np.random.Generator, kind: str, label: str, length: int) -> str:
    base = PUMP if kind == "pump" else MILLING
    rows = []
    for i in range(length):
        ramp = (i + 1) / length
        r = {name: float(mu + sd * rng.standard_normal()) for name, (mu, sd) in base.items()}
        if label == "BRG":
            r["bearing_temp_k"] += 12.0 + 8.0 * ramp
        elif label == "TWF":
            r["vibration_mm_s"] += 1.8 + 1.5 * ramp
        rows.append(r)
    return readings_json(rows)


def make_rows(n: int, seed: int, failure_frac: float = 0.3, length: int = 6, label_noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = "pump" if rng.random() < 0.5 else "milling"
        fail = rng.random() < failure_frac
        label = ("BRG" if kind == "pump" else "TWF") if fail else "ok"
        readings = _window(rng, kind, label, length)
        if label_noise and rng.random() < label_noise:
            label = str(rng.choice(["ok", "BRG", "TWF"]))
        rows.append({"line": "L1", "machine": f"{kind[0]}{i % 4}", "kind": kind, "start_seq": i * length,
                     "end_seq": i * length + length - 1, "start_ts": float(i * 600), "end_ts": float(i * 600 + 590),
                     "readings": readings, "label": label, "label_source": "synthetic"})
    return rows


def write_snapshot(path: str | Path, *, n_train: int = 400, n_eval: int = 120, seed: int = 0,
                   failure_frac: float = 0.3, dataset_id: str | None = None, train_rows: list[dict] | None = None,
                   eval_rows: list[dict] | None = None, n_calibration: int = 0) -> Path:
    """Write train.parquet, eval.parquet (and calibration.parquet with ``n_calibration`` > 0)
    and manifest.json; returns the snapshot directory."""
    import pandas as pd

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    train = train_rows if train_rows is not None else make_rows(n_train, seed, failure_frac)
    evals = eval_rows if eval_rows is not None else make_rows(n_eval, seed + 10_000, failure_frac)
    cols = ["line", "machine", "kind", "start_seq", "end_seq", "start_ts", "end_ts", "readings", "label",
            "label_source"]
    pd.DataFrame(train, columns=cols).to_parquet(out / "train.parquet", index=False)
    pd.DataFrame(evals, columns=cols).to_parquet(out / "eval.parquet", index=False)
    splits = {"train": train, "eval": evals}
    if n_calibration:
        splits["calibration"] = make_rows(n_calibration, seed + 20_000, failure_frac)
        pd.DataFrame(splits["calibration"], columns=cols).to_parquet(out / "calibration.parquet", index=False)
    digest = hashlib.sha256()
    for split in splits:
        digest.update((out / f"{split}.parquet").read_bytes())

    def counts(rows):
        c: dict[str, int] = {}
        for r in rows:
            c[r["label"]] = c.get(r["label"], 0) + 1
        return c

    manifest = {"dataset_id": dataset_id or out.name, "content_hash": digest.hexdigest(),
                "splits": list(splits), "counts": {name: counts(rows) for name, rows in splits.items()},
                "window": {"length": 6, "stride_s": 600.0, "horizon_s": 3600.0}, "window_format": "readings-json/1",
                "source": "finetune.synthetic"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_snapshot(a.path, n_train=a.train, n_eval=a.eval, seed=a.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
