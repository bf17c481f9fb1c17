"""Re-key ablation run folders made before run keys were location-independent.

Until commit-time of this script, ``llmarch.training.ablate.run_key`` hashed the data folder's
``meta.json`` as text, and that file records the corpus by absolute path: the same runs made in
another checkout got other keys, so ``llmarch ablate --resume`` or ``--report`` in a fresh clone
found none of the committed runs. Keys now hash the data's content (``data_identity``).

This script moves each run folder of an ablation to its new key, after checking, run by run,
that the data in ``--data`` is what the run trained on: every step's ``batch_crc`` in its
``metrics.jsonl`` (the CRC-32 of the step's first micro-batch) must equal the CRC of the batch
the current data gives for that seed and step. A run that fails the check is left alone and
reported. The old key is kept in the run's ``spec.json`` (``rekeyed_from``); ``command.txt``
and ``train_config.json`` get the new folder name.

    python scripts/rekey_ablation_runs.py docs/ablations/runs --data data/shakespeare-1k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmarch.model.config import ModelConfig
from llmarch.training.ablate import SPEC_FILE, run_key
from llmarch.training.data import TokenData
from llmarch.training.loop import batch_crc, read_metrics


def batches_match(run_dir: Path, data: TokenData) -> tuple[bool, str]:
    cfg = json.loads((run_dir / "train_config.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return False, "no metrics"
    for r in rows:
        x, _ = data.train_batch(cfg["seed"], r["step"] - 1, 0, 0, 1, cfg["batch_size"], cfg["grad_accum"], cfg["seq_len"])
        if batch_crc(x) != r["batch_crc"]:
            return False, f"step {r['step']}: batch differs"
    return True, f"{len(rows)} batches equal"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, help="an ablation's runs/ folder")
    ap.add_argument("--data", required=True, help="the prepared data folder the runs trained on")
    args = ap.parse_args()
    data = TokenData.open(args.data)
    failed = 0
    for d in sorted(p for p in args.runs.iterdir() if (p / SPEC_FILE).is_file()):
        spec = json.loads((d / SPEC_FILE).read_text())
        key = run_key(spec["fields"], ModelConfig.from_dict(spec["model"]), args.data, spec.get("nproc", 1))
        if spec["key"] == key:
            continue
        ok, why = batches_match(d, data)
        if not ok:
            print(f"{d.name}: left alone ({why})", file=sys.stderr)
            failed += 1
            continue
        new = d.with_name(d.name[: -len(spec["key"][:10])] + key[:10])
        for f in ("command.txt", "train_config.json"):
            p = d / f
            if p.is_file():
                p.write_text(p.read_text().replace(d.name, new.name))
        spec["rekeyed_from"] = spec["key"]
        spec["key"] = key
        (d / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        d.rename(new)
        print(f"{d.name} -> {new.name} ({why})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
