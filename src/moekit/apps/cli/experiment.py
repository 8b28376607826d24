"""`moekit experiment NAME`: run one of the experiments that check a method against its paper."""

from __future__ import annotations

import argparse

from moekit.apps.cli.command import POS_INT, Command
from moekit.apps.experiments import (
    adaptive,
    compress,
    convert_gpt,
    convert_minilm,
    dselect,
    dsmoe,
    dynamic_k,
    meo,
    mole_embeddings,
)
from moekit.io import MANIFEST, claim_folder, record_files

#: command-line name -> the experiment's module (its ``run(out, seeds, quick)``)
EXPERIMENTS = {"dselect": dselect, "dsmoe": dsmoe, "dynamic-k": dynamic_k, "convert-gpt": convert_gpt,
               "convert-minilm": convert_minilm, "mole-embeddings": mole_embeddings, "compress": compress, "adaptive": adaptive,
               "meo": meo}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--out", default=None, help="output folder (default runs/experiments/NAME)")
    parser.add_argument("--seeds", type=POS_INT, default=None, help="number of seeds (default: the experiment's)")
    parser.add_argument("--quick", action="store_true", help="small data and few epochs (smoke test)")


def run(args: argparse.Namespace) -> None:
    kw = {} if args.seeds is None else {"seeds": args.seeds}
    out = claim_folder(args.out or f"runs/experiments/{args.name}", "experiment", "--out")
    EXPERIMENTS[args.name].run(out=out, quick=args.quick, **kw)
    record_files(out, "experiment", sorted(p.name for p in out.iterdir()
                                           if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")))


COMMAND = Command(
    help="check a method against its paper (table, JSON, PNG)",
    description="Run one experiment: several seeds, a printed table, results.json and a PNG.",
    add_arguments=add_arguments, run=run,
)
