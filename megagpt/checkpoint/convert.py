"""``megagpt convert``: any checkpoint kind in, any kind out, through canonical tensors.

Input kinds (detected): a training checkpoint (run dir, its ``checkpoints/`` dir or a
``step_*`` folder, with the layout-free record), a megagpt model directory, a ModelScope GPT-3
directory (either family) and a Hugging Face GPT-2 directory. Outputs:

* ``--to megagpt``: a consolidated model directory; with ``--tp``/``--pp`` instead a training
  checkpoint for that layout (``DIR/latest`` + ``DIR/step_XXXXXXX/layout_free``), carrying the
  Adam moments and step when the input is a training checkpoint. Point ``checkpoint.load`` at it.
* ``--to modelscope``: the layout ModelScope loads with the model's tokenizer: a BERT
  ``vocab.txt`` gives the base/large layout (``pytorch_model.bin``, one file: ``--tp`` above 1
  is refused, and so is a ``gelu_tanh`` model, as that model computes the erf GELU only); a
  jieba-BPE ``tokenizer.json`` or no tokenizer the 1.3B+ layout with ``--tp`` shards (default
  1; without a tokenizer the summary warns that one is missing); a SentencePiece model is
  refused (neither ModelScope pipeline loads one).
* ``--to hf``: a GPT2LMHeadModel directory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.checkpoint import hf, manifest, model_dir, modelscope, reshard
from megagpt.checkpoint.canonical import CheckpointError, check_heads, check_tensors
from megagpt.checkpoint.manager import resolve_load
from megagpt.checkpoint.tags import tag_for, write_latest
from megagpt.config.schema import ModelConfig
from megagpt.inference.sampling import GenerationDefaults

KINDS = ("training", "megagpt", "modelscope", "hf")


@dataclass
class Source:
    """A read checkpoint: config, full canonical weights, optional optimizer record."""

    kind: str
    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: str | None = None
    record: reshard.Record | None = None
    client: dict = field(default_factory=dict)
    generation: GenerationDefaults | None = None  # decoding defaults the checkpoint records


def detect(path: str) -> str:
    """The kind of checkpoint at ``path`` (one of KINDS); CheckpointError when none fits."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if model_dir.is_model_dir(path):
        return "megagpt"
    if hf.is_hf_dir(path):
        return "hf"
    try:
        resolve_load(path)
        return "training"
    except (FileNotFoundError, ValueError):
        pass
    if modelscope.is_modelscope_dir(path):
        return "modelscope"
    raise CheckpointError(
        f"{path}: not a checkpoint megagpt knows: expected a training run/checkpoint ('latest' "
        "or step_* folder), a megagpt model directory (config.json with format "
        "megagpt-model), a ModelScope GPT-3 directory (pytorch_model.bin or "
        "model/mp_rank_XX_model_states.pt) or a Hugging Face GPT-2 directory"
    )


def read_model_config(path: str) -> ModelConfig:
    """The model's config of the checkpoint at ``path`` (any of KINDS), without its weights."""
    kind = detect(path)
    if kind == "megagpt":
        return model_dir.read_config(path)
    if kind == "hf":
        return hf.read_config(path)
    if kind == "modelscope":
        return modelscope.read_config(path)
    directory, tag = resolve_load(path)
    return reshard.Record(str(Path(directory) / tag)).model


def read_generation(path: str) -> GenerationDefaults:
    """The decoding defaults the checkpoint at ``path`` records (a megagpt model directory's
    ``generation``, a ModelScope config.json's settings), else the original's; no weights
    are read."""
    kind = detect(path)
    if kind == "megagpt":
        return model_dir.read_generation(path)
    if kind == "modelscope":
        return modelscope.read_generation(path)
    return GenerationDefaults()


def read(path: str) -> Source:
    """Read any supported checkpoint as full canonical tensors."""
    kind = detect(path)
    if kind == "megagpt":
        cfg = model_dir.read_config(path)
        tensors = model_dir.load_tensors(path)
        check_tensors(tensors, cfg, path)
        return Source(
            kind,
            cfg,
            tensors,
            model_dir.tokenizer_path(path),
            generation=model_dir.read_generation(path),
        )
    if kind == "hf":
        return Source(kind, *hf.read(path))
    if kind == "modelscope":
        return Source(kind, *modelscope.read(path), generation=modelscope.read_generation(path))
    directory, tag = resolve_load(path)
    checkpoint = str(Path(directory) / tag)
    problems = manifest.verify(checkpoint, distributed=False)
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint} is damaged: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    record = reshard.Record(checkpoint)
    tensors = record.state("param")
    check_tensors(tensors, record.model, checkpoint)
    client = dict(record.meta.get("client", {}))
    tok = client.get("config", {}).get("data", {}).get("tokenizer") or None
    if tok and not Path(tok).exists():
        tok = None
    return Source(kind, record.model, tensors, tok, record, client)


def read_weights(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, canonical tensors) of a model directory, ModelScope or Hugging Face dir."""
    src = read(path)
    return src.cfg, src.tensors


def write_model_dir(directory: str, src: Source) -> None:
    tensors = {k: v.contiguous() for k, v in src.tensors.items()}
    model_dir.save_tensors(directory, tensors)
    extra: dict = {"converted_from": src.kind}
    if src.generation is not None and src.generation != GenerationDefaults():
        extra["generation"] = src.generation.as_config()
    model_dir.write_config(directory, src.cfg, extra)
    if src.tokenizer:
        model_dir.copy_tokenizer(directory, src.tokenizer)


def write_training(directory: str, src: Source, tp: int, pp: int) -> str:
    """A training checkpoint for layout (tp, pp); returns its tagged folder."""
    check_heads(src.cfg, "--tp", tp)
    if pp > src.cfg.num_layers:
        raise CheckpointError(
            f"--pp {pp}: more pipeline stages than the {src.cfg.num_layers} decoder layers"
        )
    states = {"param": src.tensors}
    adam_step, engine = 0, {}
    if src.record is not None:
        for kind in reshard.OPTIMIZER_KINDS:
            if src.record.has(kind):
                states[kind] = src.record.state(kind)
        adam_step = int(src.record.meta.get("adam_step", 0))
        engine = src.record.meta.get("engine", {})
    client = src.client or {"step": 0, "consumed_samples": 0}
    tag = tag_for(int(client.get("step", 0)))
    out = Path(directory)
    reshard.write_record(
        str(out / tag),
        states,
        src.cfg,
        tp=tp,
        pp=pp,
        adam_step=adam_step,
        client=client,
        engine=engine,
    )
    manifest.write(str(out / tag), distributed=False)  # before `latest`, as a run's commit does
    write_latest(out, tag)
    return str(out / tag)


def check_output(input: str, output: str, overwrite: bool = False) -> None:
    """CheckpointError, before anything is read or written, when writing ``output`` could
    destroy data: it is the input, lies inside it or holds it (however spelt: relative,
    ``..``, symlinks), it is a file, or it is a non-empty directory and ``overwrite`` is off."""
    src, dst = Path(input).resolve(), Path(output).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        relation = (
            "is the input"
            if dst == src
            else "lies inside the input"
            if src in dst.parents
            else "holds the input"
        )
        raise CheckpointError(
            f"--output {output} {relation} (--input {input}, at {src}): writing there would "
            "destroy the checkpoint being read; choose another directory"
        )
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"--output {output} is a file; give a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--output {output} already exists and is not empty; pass --overwrite to replace it"
        )


def _write(
    src: Source, directory: Path, output: str, to: str, tp: int | None, pp: int | None
) -> str:
    """Write ``src`` as ``to`` into ``directory``; the summary names ``output`` (where the
    files will be once moved into place)."""
    if to == "megagpt" and (tp or pp):
        where = Path(write_training(str(directory), src, tp or 1, pp or 1))
        moments = "with" if src.record is not None else "without"
        return (
            f"training checkpoint {Path(output) / where.relative_to(directory)} (TP={tp or 1}, "
            f"PP={pp or 1}, {moments} optimizer state)"
        )
    if to == "megagpt":
        write_model_dir(str(directory), src)
        return f"megagpt model directory {output}"
    if to == "modelscope":
        written = modelscope.write(
            str(directory),
            src.cfg,
            src.tensors,
            tp=tp or 1,
            tokenizer=src.tokenizer,
            generation=src.generation,
        )
        return written.describe(output)
    hf.write(str(directory), src.cfg, src.tensors, tokenizer=src.tokenizer)
    return f"Hugging Face GPT2LMHeadModel {output}"


def _replace_dir(target: Path, output: str, fill: Callable[[Path], str]) -> str:
    """``fill(tmp)`` on a new sibling folder of ``target``, then the folder put in place of
    ``target``: an old output is moved aside only once the new one is complete (a failed or
    killed conversion leaves it as it was), and removed last. Returns what ``fill`` returns."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.parent / f"{stem}.converting"
    tmp.mkdir()
    try:
        summary = fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f"{stem}.replaced" if target.exists() else None
    try:
        if old is not None:
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
    except OSError as e:
        raise CheckpointError(
            f"--output {output}: could not move the converted files into place ({e}); the old "
            f"output is unchanged and the new one is at {tmp}"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return summary


def convert(
    input: str,
    output: str,
    to: str,
    tp: int | None = None,
    pp: int | None = None,
    overwrite: bool = False,
) -> str:
    """Convert ``input`` into ``to`` (megagpt / modelscope / hf) at ``output``; returns a
    one-line summary. ``output`` must not be, lie inside or hold ``input``; a non-empty
    ``output`` is replaced only with ``overwrite``, and only once the new one is complete
    (``check_output``, ``_replace_dir``)."""
    if to == "hf" and (tp or pp):
        raise CheckpointError("--to hf takes no --tp/--pp: a Hugging Face model is unsharded")
    if to == "modelscope" and pp:
        raise CheckpointError(
            "--to modelscope: ModelScope checkpoints have no pipeline "
            "stages; use --tp for the number of shards"
        )
    if to not in ("megagpt", "modelscope", "hf"):
        raise CheckpointError(f"--to {to!r}: expected one of megagpt, modelscope, hf")
    detect(input)  # cheap (no tensors read): an --input that is no checkpoint is named first
    check_output(input, output, overwrite)
    src = read(input)
    summary = _replace_dir(
        Path(output).resolve(), output, lambda tmp: _write(src, tmp, output, to, tp, pp)
    )
    return f"{src.kind} {input} -> {summary}"


def run(args: argparse.Namespace) -> int:
    """``megagpt convert`` (arguments registered in megagpt/cli.py); exit status."""
    for flag in ("tp", "pp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"megagpt convert: error: --{flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        overwrite = bool(getattr(args, "overwrite", False))
        print(convert(args.input, args.output, args.to, args.tp, args.pp, overwrite))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"megagpt convert: error: {e}", file=sys.stderr)
        return 2
    return 0
