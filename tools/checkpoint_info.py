#!/usr/bin/env python
"""What a megagpt checkpoint holds: step, layout, model shape, parameters, dtype, tokenizer, files.

    python tools/checkpoint_info.py runs/gpt3-1.3b                  # latest checkpoint of a run
    python tools/checkpoint_info.py runs/gpt3-1.3b/checkpoints/step_0010000 --verify
    python tools/checkpoint_info.py runs/gpt3-1.3b/model --json     # a model directory

PATH is a run directory, its ``checkpoints/`` folder (both: the checkpoint ``latest`` names), a
``step_*`` folder, or a model directory (``megagpt convert`` / end of training). Nothing is
unpickled and no tensor is loaded: the layout and model come from ``layout_free/meta.json``
(``reshard.read_meta``) or the model directory's ``config.json`` (``model_dir.read_config``),
tensor shapes and dtypes from the safetensors headers. Sizes and CRC-32 checksums come from the
checkpoint's ``manifest.json`` when it has one; ``--verify`` re-reads every file against it
(without a manifest: a structure check, see ``megagpt.checkpoint.manifest``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegagptError  # noqa: E402

PROG = "checkpoint_info.py"


def _files(root: Path) -> list[dict]:
    """Every file under ``root``: relative path and size, sorted."""
    return [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def _tensors(paths: list[Path]) -> dict:
    """Count, elements and dtypes of the tensors in safetensors files (headers only); a file
    whose header cannot be read (truncated, damaged) is listed in ``unreadable`` with why."""
    from safetensors import safe_open

    count = elements = 0
    dtypes: dict[str, int] = {}
    unreadable: list[str] = []
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
                shapes = [(f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in keys]
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            unreadable.append(f"{path}: {e}")
            continue
        for shape, dtype in shapes:
            n = 1
            for d in shape:
                n *= d
            count += 1
            elements += n
            dtypes[dtype] = dtypes.get(dtype, 0) + n
    return {
        "files": len(paths),
        "count": count,
        "elements": elements,
        "dtypes": dtypes,
        "unreadable": unreadable,
    }


def _tokenizer(path: str | None) -> dict | None:
    if not path:
        return None
    info: dict = {"path": path, "exists": os.path.exists(path)}
    if info["exists"]:
        from megagpt.data.tokenizer import build_tokenizer

        try:
            tok = build_tokenizer(path)
            info.update(family=tok.family, vocab_size=tok.vocab_size, eod=tok.eod)
        except MegagptError as e:
            info["error"] = str(e)
    return info


def _model(cfg) -> dict:
    from megagpt.config.sizes import parameter_count

    return {"config": dataclasses.asdict(cfg), "parameters": parameter_count(cfg)}


def _manifest(checkpoint: Path) -> dict | None:
    """The checkpoint's manifest.json as a dict, or None when it has none (older checkpoints).
    Read for display only; ``manifest.verify`` is what checks it."""
    path = checkpoint / "manifest.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        files = m["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        return {"error": f"{path}: unreadable ({e})"}
    return {"checksum": m.get("checksum", "crc32"), "files": files}


def _verify(checkpoint: Path) -> dict:
    try:
        from megagpt.checkpoint import manifest
    except ImportError:  # a megagpt without checkpoint manifests
        return {"ok": None, "problems": ["this megagpt cannot verify checkpoints"]}
    problems = manifest.verify(str(checkpoint), distributed=False)
    return {"ok": not problems, "problems": problems}


def describe_training(path: str, *, verify: bool = False) -> dict:
    """Info on the training checkpoint at ``path`` (run dir, checkpoints dir or step_* folder)."""
    from megagpt.checkpoint import reshard
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.manager import resolve_load
    from megagpt.checkpoint.tags import read_latest
    from megagpt.config.schema import ModelConfig

    directory, tag = resolve_load(path)
    checkpoint = Path(directory) / tag
    info: dict = {
        "kind": "training",
        "path": str(checkpoint),
        "tag": tag,
        "latest": read_latest(directory),
        "checkpoints": sorted(p.name for p in Path(directory).glob("step_*") if p.is_dir()),
    }
    meta = reshard.read_meta(str(checkpoint))
    if meta is None:
        raise CheckpointError(
            f"{checkpoint}: no {reshard.RECORD}/meta.json; not a megagpt "
            "training checkpoint, or one written before the layout-free record"
        )
    client = meta.get("client", {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    model = _model(cfg)
    step = client.get("step", meta.get("engine", {}).get("global_steps"))
    samples = client.get("consumed_samples", meta.get("engine", {}).get("global_samples"))
    record = reshard.record_path(str(checkpoint))
    info.update(
        step=step,
        consumed_samples=samples,
        tokens=samples * cfg.seq_length if samples is not None else None,
        adam_step=meta.get("adam_step"),
        layout=meta.get("layout", {}),
        model=model,
        optimizer_state=[k for k in meta.get("kinds", []) if k != "param"],
        tensors=_tensors(sorted(record.glob("*.param.safetensors"))),
        tokenizer=_tokenizer(client.get("config", {}).get("data", {}).get("tokenizer")),
    )
    files = _files(checkpoint)
    man = _manifest(checkpoint)
    if man is not None and "files" in man:
        for f in files:
            entry = man["files"].get(f["path"])
            if entry is not None:
                f["crc32"] = entry.get("crc32")
    info.update(files=files, total_size=sum(f["size"] for f in files), manifest=man)
    if verify:
        info["verify"] = _verify(checkpoint)
    return info


def describe_model_dir(path: str) -> dict:
    """Info on a megagpt model directory (config.json + safetensors weights + tokenizer/)."""
    from megagpt.checkpoint import model_dir

    cfg = model_dir.read_config(path)
    root = Path(path)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise model_dir.ModelDirError(f"{root}: config.json but no *.safetensors weights")
    files = _files(root)
    return {
        "kind": "model",
        "path": str(root),
        "model": _model(cfg),
        "trained_steps": config.get("trained_steps"),
        "trained_tokens": config.get("trained_tokens"),
        "tensors": _tensors(weights),
        "tokenizer": _tokenizer(model_dir.tokenizer_path(path)),
        "files": files,
        "total_size": sum(f["size"] for f in files),
    }


def describe(path: str, *, verify: bool = False) -> dict:
    """Info on the checkpoint or model directory at ``path`` (see the module doc).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MegagptError (CheckpointError, ModelDirError): not a megagpt checkpoint, or unreadable.
    """
    from megagpt.checkpoint.canonical import CheckpointError
    from megagpt.checkpoint.convert import detect

    kind = detect(path)
    if kind == "megagpt":
        return describe_model_dir(path)
    if kind == "training":
        return describe_training(path, verify=verify)
    raise CheckpointError(
        f"{path}: a {kind} checkpoint, not a megagpt one; convert it first: "
        f"megagpt convert --input {path} --output DIR --to megagpt"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # not reached


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def render(info: dict) -> str:
    """The human-readable report of ``describe``."""
    m = info["model"]["config"]
    lines = [
        f"{info['path']}: "
        + ("training checkpoint" if info["kind"] == "training" else "model directory")
    ]

    def row(key: str, value) -> None:
        lines.append(f"  {key:<16}{value}")

    if info["kind"] == "training":
        n = len(info["checkpoints"])
        row(
            "step",
            f"{info['step']} ({'latest' if info['latest'] == info['tag'] else 'not latest'}"
            f"; {n} checkpoint{'s' if n != 1 else ''} here, latest: {info['latest']})",
        )
        if info["consumed_samples"] is not None:
            row("trained", f"{info['consumed_samples']:,} samples = {info['tokens']:,} tokens")
        lay = info["layout"]
        row(
            "layout",
            f"TP {lay.get('tp')} x PP {lay.get('pp')} x DP {lay.get('dp')}, ZeRO "
            f"{lay.get('zero_stage')}, {lay.get('precision')} (resumable at any layout)",
        )
    elif info.get("trained_steps") is not None:
        row("trained", f"{info['trained_steps']} steps, {info['trained_tokens']:,} tokens")
    row(
        "model",
        f"{m['name'] or 'custom'}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_heads']} heads, ffn {m['ffn_hidden_size'] or 4 * m['hidden_size']}, "
        f"seq {m['seq_length']}, positions {m['max_position_embeddings']}, "
        f"vocab {m['vocab_size']}",
    )
    row("parameters", _count(info["model"]["parameters"]))
    t = info["tensors"]
    dtypes = ", ".join(sorted(t["dtypes"]))
    what = "master weights" if info["kind"] == "training" else "weights"
    row(
        "stored",
        f"{what} {dtypes}: {t['count']} tensors in {t['files']} file(s), "
        f"{t['elements']:,} elements",
    )
    if t["unreadable"]:
        row("damaged", f"{len(t['unreadable'])} weight file(s) unreadable:")
        lines += [f"    {u}" for u in t["unreadable"]]
    if info["kind"] == "training":
        row(
            "optimizer",
            ", ".join(info["optimizer_state"]) + f" (Adam step {info['adam_step']})"
            if info["optimizer_state"]
            else "none (weights only)",
        )
    tok = info["tokenizer"]
    if tok is None:
        row("tokenizer", "none recorded")
    elif not tok["exists"]:
        row("tokenizer", f"{tok['path']} (missing)")
    elif "error" in tok:
        row("tokenizer", f"{tok['path']} (unreadable: {tok['error']})")
    else:
        row(
            "tokenizer",
            f"{tok['path']} ({tok['family']}, vocab {tok['vocab_size']}, eod {tok['eod']})",
        )
    man = info.get("manifest")
    note = (
        ""
        if info["kind"] != "training"
        else "; no manifest (no checksums recorded)"
        if man is None
        else f"; manifest: {man['error']}"
        if "error" in man
        else f"; manifest with {man['checksum']} checksums"
    )
    row("files", f"{len(info['files'])}, {_size(info['total_size'])}{note}")
    for f in info["files"]:
        crc = f.get("crc32") or ""
        lines.append(f"    {_size(f['size']):>10}  {crc:<8}  {f['path']}")
    if "verify" in info:
        v = info["verify"]
        row("verify", "OK: every file matches" if v["ok"] else "FAILED")
        lines += [f"    {p}" for p in (v["problems"] if not v["ok"] else [])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog="See docs/tools.md."
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="run directory, checkpoints/ folder, step_* folder or model directory",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-read every file of a training checkpoint against its manifest",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = describe(args.path, verify=args.verify)
    except (MegagptError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1) if args.json else render(info))
    damaged = info.get("verify", {}).get("ok") is False or info["tensors"]["unreadable"]
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
