"""`moekit export`: a saved moekit model (a GPT checkpoint, or a converted model) as a Hugging Face-native folder."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from moekit.apps.cli.command import Command
from moekit.convert import export_hf, hf_native, load
from moekit.io import MoekitWarning, check_target
from moekit.models import GPT
from moekit.models.gpt import MODEL_KIND


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a moekit GPT folder (GPT.save / `moekit train` / `moekit convert`) or a folder "
                        "moekit.convert.save wrote")
    p.add_argument("--out", required=True, help="folder for the Hugging Face model (new, empty or moekit's own)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer folder to include (default: in --model, or beside it as "
                        "`moekit train` writes it)")


def _tokenizer(args: argparse.Namespace, model: Path) -> Path | None:
    if args.tokenizer:
        if not Path(args.tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or folder")
        return Path(args.tokenizer)
    if (model / "tokenizer_config.json").is_file():
        return model
    return next((p for p in (model / "tokenizer.json", model.parent / "tokenizer.json") if p.is_file()), None)


def run(args: argparse.Namespace) -> Path:
    model_path = Path(args.model)
    check_target(args.out, MODEL_KIND, "--out")  # before any slow work
    tokenizer = _tokenizer(args, model_path)
    model = load(model_path)
    out = export_hf(model, args.out, tokenizer=tokenizer)
    if tokenizer is None:
        warnings.warn(f"no tokenizer in {model_path} or beside it: {out} has none (pass --tokenizer)", MoekitWarning,
                      stacklevel=1)
    source = "moekit GPT" if isinstance(model, GPT) else type(model).__name__
    print(f"exported the {source} {model_path} to {out} as {hf_native(model)} (transformers: "
          f"AutoModelForCausalLM.from_pretrained; tokenizer: {'AutoTokenizer' if tokenizer else 'none'})")
    return out


COMMAND = Command(
    help="write a moekit model as a Hugging Face model: GPT -> Llama / Mixtral",
    description="Export a saved moekit GPT (every layer dense -> Llama, every layer top-k MoE -> Mixtral) or a "
    "converted model whose layers map exactly (Mixtral, Qwen2-MoE, Qwen3-MoE) as a Hugging Face folder that plain "
    "transformers loads with the same logits, with its tokenizer (AutoTokenizer). A model that does not map is "
    "refused with what does not.",
    add_arguments=add_arguments, run=run,
)
