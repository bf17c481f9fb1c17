"""``llmarch ablate``: train a set of variants over several seeds under one budget, pick each
one's learning rate by a sweep if asked, and tabulate / plot them with seed-noise statistics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = ("Train a set of variants over several seeds under one budget, pick each one's learning rate "
               "by a sweep if asked, and tabulate / plot them with seed-noise statistics.")
EPILOG = """\
The spec (YAML) has: out, data, prepare, match, base, variants (each: name, set, no_match,
lr_from, or any training field), and optionally seeds (a count or a list), lr_sweep (a list of
learning rates), jobs and baseline. See llmarch.training.ablate and docs/ablations/README.md.

An ablation writes a fresh folder: if --out already holds runs or results, say --resume (reuse
finished runs, continue killed ones) or --force (delete them first). --report trains nothing: it
writes the tables and plots again from the finished runs (after an update adds a column)."""


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("ablate", help="train variants over seeds under one budget; tabulate/plot them with seed noise",
                        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("spec", help="ablation spec (YAML)")
    sp.add_argument("--out", default=None, help="results folder (default: the spec's out)")
    sp.add_argument("--only", action="append", help="run only these variant names (repeatable)")
    sp.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1 (overrides the spec's seeds)")
    sp.add_argument("--jobs", type=int, default=None, metavar="J",
                    help="training processes at once (default: the spec's jobs, else 1); each keeps the spec's threads")
    sp.add_argument("--resume", action="store_true",
                    help="continue the ablation in --out: reuse finished runs, resume killed ones")
    sp.add_argument("--force", action="store_true", help="delete the runs and results --out holds, then run afresh")
    sp.add_argument("--report", action="store_true",
                    help="train nothing: write the results and plots again from the finished runs in --out "
                         "(keeping the training command, commit and wall time results.json recorded)")
    sp.add_argument("--launcher", default="local", choices=["local", "torchrun"],
                    help="local: one process per run; torchrun: --nproc processes per run (same global batch)")
    sp.add_argument("--nproc", type=int, default=1, metavar="N", help="processes per run under --launcher torchrun")
    sp.set_defaults(func=run)


def typed_command(args: argparse.Namespace) -> list[str] | None:
    """The command line as typed, when this process is the ``llmarch`` command (else None: the
    ablation then records the equivalent command)."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    from_module = sys.argv[0].replace("\\", "/").endswith("llmarch/cli/__main__.py") if sys.argv else False
    if (prog == "llmarch" or from_module) and "ablate" in sys.argv[1:]:
        return ["llmarch", *sys.argv[1:]]
    return None


def run(args: argparse.Namespace) -> None:
    from ..errors import ConfigError
    from ..training.ablate import report_spec, run_spec

    if args.report:
        clash = [f for f, on in (("--resume", args.resume), ("--force", args.force), ("--only", args.only),
                                 ("--jobs", args.jobs is not None)) if on]
        if clash:
            raise ConfigError(f"--report trains nothing and writes the whole table: it takes no {', '.join(clash)}")
        report_spec(args.spec, out=args.out, seeds=args.seeds, launcher=args.launcher, nproc=args.nproc,
                    command=typed_command(args))
        return

    run_spec(args.spec, out=args.out, only=args.only, seeds=args.seeds, jobs=args.jobs, resume=args.resume,
             force=args.force, launcher=args.launcher, nproc=args.nproc, command=typed_command(args))
