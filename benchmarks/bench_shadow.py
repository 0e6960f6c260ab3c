"""What a shadow challenger costs a plant period: the tiny campaign with trees, two learning turns,
with ``serve.shadow=challenger train.promote_after_shadow=true`` and without a shadow, same seed.

    python benchmarks/bench_shadow.py [--workdir DIR] [--seed N]

Turn 2 is where a shadow runs (turn 1 has no champion to shadow beside); its ``plant`` stage
(``turn.stage_s.plant``: the period in lockstep with the bridge) is the figure compared, and the
``shadow`` stage (scoring both models on the period's outcomes) is added on top.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run(workdir: Path, name: str, overrides: list[str]) -> dict:
    from flywheel.campaign import default_config_path, load_campaign
    from flywheel.loop import run_campaign

    cfg = load_campaign(str(default_config_path("tiny")), [
        f"campaign={name}", "turns=2", "train.family=gbdt", "train.reference_family=", "reference.period=0",
        *overrides])
    t0 = time.monotonic()
    state = run_campaign(cfg, workdir / name, view=False)
    t2 = state["turns"][2]
    return {"campaign_s": time.monotonic() - t0, "plant_s": t2["wall_s"].get("plant"),
            "shadow_s": t2["wall_s"].get("shadow", 0.0), "shadow_swap_s": t2["wall_s"].get("shadow_swap", 0.0),
            "predictions": t2["sim"]["bridge"].get("predictions"),
            "shadow_predictions": t2["sim"]["bridge"].get("shadow_predictions", 0),
            "promotion_rule": t2.get("promotion_rule"), "promoted": t2.get("promoted"),
            "gate_reason": t2.get("gate_reason"), "shadow": t2.get("shadow")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("shadow", "plain"), default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-shadow-"))
    out = {}
    for name, extra in (("plain", []), ("shadow", ["serve.shadow=challenger", "train.promote_after_shadow=true"])):
        if args.only and args.only != name:
            continue
        out[name] = run(workdir, f"bench-{name}", [f"seed={args.seed}", *extra])
        print(name, json.dumps(out[name], indent=1, default=str), flush=True)
    if len(out) == 2:
        print(f"turn-2 plant period: {out['plain']['plant_s']:.1f} s without a shadow, "
              f"{out['shadow']['plant_s']:.1f} s with one (+{out['shadow']['plant_s'] - out['plain']['plant_s']:.1f} s), "
              f"scoring {out['shadow']['shadow_s']:.1f} s, loading the shadow {out['shadow']['shadow_swap_s']:.1f} s")


if __name__ == "__main__":
    main()
