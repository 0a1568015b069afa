"""megagpt's own CPU kernels (``kernels/*.c``, fp32), built on first use.

Decoding (``megagpt.inference.decode``): steps and speculative checks multiply 1-64 rows by
every weight of the model; the kernels torch offers for such shapes stream the weights well
below the memory's speed (module doc of ``kernels/cpu_decode.c``; figures in
BENCHMARKS-generate.md). ``pack`` copies an ``[out, in]`` weight once into the kernel's column
blocks; ``linear`` multiplies by it, the bias and a GELU or a residual add fused. ``attend`` is
a pass's attention over the preallocated cache: the fed tokens' keys and values written to
their slots, each token's attention over its row's slots up to its position, the output in the
layout the next linear reads.

Training: ``megagpt.model.cpu_training`` wraps ``kernels/cpu_attention.c`` (the decoder's
causal self-attention) and ``kernels/cpu_gelu.c`` (the MLP's bias + GELU) as autograd
functions (``train.cpu_kernels``).

The C files are compiled together with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) and ``-O3 -march=native -fopenmp`` into ``$MEGAGPT_KERNEL_CACHE``
(default ``~/.cache/megagpt/kernels``), once per source, compiler and CPU; a build takes about
two seconds. Where there is no compiler, the build fails, or the CPU has no AVX-512 (the linear
keeps 8 rows x 48 columns in 24 of AVX-512's 32 vector registers), ``available()`` is False and
the callers keep torch's kernels (oneDNN's packs, SDPA); ``unavailable_reason()`` says why.
``MEGAGPT_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(sorted(KERNELS.glob("*.c")))  # compiled together into one library
HEADERS = tuple(sorted(KERNELS.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
BLOCK = 48  # the linear's column block (NB in cpu_decode.c)
ACTIVATIONS = {None: 0, "none": 1, "tanh": 2}  # F.gelu's approximate -> cpu_decode.c's act

_state: dict[str, object] = {}  # "lib": the loaded library or None, "why": the reason if None


def _cpu_signature() -> str:
    """The CPU model and flags (``-march=native`` builds for them), or "" where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(cc: str) -> Path:
    """Where the library built by compiler ``cc`` for these sources and this CPU lives."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join((cc, *FLAGS, *LIBS)).encode() + _cpu_signature().encode())
    key = digest.hexdigest()[:16]
    cache = os.environ.get("MEGAGPT_KERNEL_CACHE") or Path.home() / ".cache" / "megagpt" / "kernels"
    return Path(cache) / f"cpu_kernels-{key}.so"


def _compile(cc: str, target: Path) -> str:
    """Build ``target``; "" or what went wrong."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a private name, then an atomic rename: processes building at once never load a
        # half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        run = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            os.unlink(tmp)
            names = ", ".join(p.name for p in SOURCES)
            return f"{cc} failed on {KERNELS}/({names}): {run.stderr.strip()[-500:]}"
        os.replace(tmp, target)
        return ""
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not build {target}: {e}"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("MEGAGPT_CPU_KERNELS", "1") == "0":
        return None, "turned off by MEGAGPT_CPU_KERNELS=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    target = library_path(cc)
    if not target.exists():
        why = _compile(cc, target)
        if why:
            return None, why
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged file in the cache (a full disk, a killed copy): build it again
        why = _compile(cc, target)
        if why:
            return None, why
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as e:
            return None, f"could not load {target}: {e}"
    if lib.rowgemm_vector_floats() != 16:
        return None, "this CPU has no AVX-512 (the kernel's 8 x 48 tile needs 32 registers)"
    p, i, long_ = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.rowgemm.argtypes = [p, long_, p, p, p, long_, i, i, i, i, i, i]
    lib.attend.argtypes = [p, long_, p, p, p, p, i, i, i, i, i, i]
    lib.activation.argtypes = [p, p, long_, i]
    f, u64 = ctypes.c_float, ctypes.c_uint64
    lib.attn_train_fwd.argtypes = [p, long_, long_, p, long_, long_, p, i, i, i, i, f, u64, i, i]
    lib.attn_train_bwd.argtypes = [p, long_, long_, p, p, long_, long_, p, p, i, i, i, i]
    lib.attn_train_bwd.argtypes += [f, u64, i, i]
    lib.bias_gelu_fwd.argtypes = [p, p, p, long_, i, i, i]
    lib.bias_gelu_bwd.argtypes = [p, p, p, p, long_, i, i]
    for fn in (lib.rowgemm, lib.activation, lib.bias_gelu_fwd):
        fn.restype = None
    for fn in (lib.attend, lib.attn_train_fwd, lib.attn_train_bwd, lib.bias_gelu_bwd):
        fn.restype = ctypes.c_int
    assert lib.rowgemm_block() == BLOCK
    return lib, ""


def _library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["why"] = _build()
    return _state["lib"]  # type: ignore[return-value]


def library() -> ctypes.CDLL:
    """The loaded library (built on first call); a RuntimeError saying why where it cannot be."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"megagpt's CPU kernels are not available: {unavailable_reason()}")
    return lib


def available() -> bool:
    """Whether the kernel is built and usable on this machine (builds it on first call)."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    _library()
    return str(_state["why"])


@dataclass
class RowPack:
    """A weight [out, in] packed for ``linear``: ``blocks`` [ceil(out/48), in, 48], zero past
    ``out``."""

    blocks: torch.Tensor
    out_features: int
    in_features: int


def pack(weight: torch.Tensor) -> RowPack:
    """[out, in] fp32 CPU weight -> its ``RowPack`` (a copy; the weight is not kept)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(
            f"pack: the kernels take a 2-D float32 CPU weight; got {tuple(weight.shape)} "
            f"{weight.dtype} on {weight.device}"
        )
    n, k = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % BLOCK))  # [ceil(n/48)*48, k]
    blocks = padded.view(-1, BLOCK, k).transpose(1, 2).contiguous()  # [nb, k, 48]
    return RowPack(blocks, n, k)


def linear(
    x: torch.Tensor,
    packed: RowPack,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    gelu: str | None = None,
) -> torch.Tensor:
    """x [M, in] -> x @ W.T + bias [M, out], then ``F.gelu(approximate=gelu)`` ("none": the erf
    GELU, "tanh"; None: no activation); with ``out`` [M, out] (contiguous rows), ``out += x @
    W.T + bias`` in place and returns ``out`` (a residual add)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"megagpt's CPU kernels are not available: {unavailable_reason()}")
    if x.dim() != 2 or x.shape[1] != packed.in_features or x.dtype != torch.float32:
        raise ValueError(
            f"linear: x {tuple(x.shape)} {x.dtype} for a [{packed.out_features}, "
            f"{packed.in_features}] float32 weight"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, packed.out_features, dtype=x.dtype)
    elif out.shape != (m, packed.out_features) or out.stride(1) != 1:
        raise ValueError(f"linear: out {tuple(out.shape)} for x {tuple(x.shape)}")
    if accumulate and gelu is not None:
        raise ValueError("linear: a residual add (out=) takes no activation")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    lib.rowgemm(
        x.data_ptr(),
        x.stride(0),
        packed.blocks.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        out.stride(0),
        m,
        packed.out_features,
        packed.in_features,
        int(accumulate),
        ACTIVATIONS[gelu],
        torch.get_num_threads(),
    )
    return out


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The GELU the linear fuses, alone (for tests against ``F.gelu``): x any float32 CPU
    tensor."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"megagpt's CPU kernels are not available: {unavailable_reason()}")
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.activation(x.data_ptr(), y.data_ptr(), x.numel(), ACTIVATIONS[approximate])
    return y


def attend(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """A pass's attention over the cache: ``qkv`` [rows * s, heads * 3 * head_dim] (row r's s
    tokens at r * s .., each head's q | k | v), ``positions`` [rows * s] int64 cache slots.
    Writes every token's keys and values into slot ``positions[t]`` of its row of ``keys`` /
    ``values`` [rows, heads, L, head_dim], then returns each token's attention over its row's
    slots 0 .. positions[t] (SDPA's, scale 1/sqrt(head_dim)), [rows * s, heads * head_dim]."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"megagpt's CPU kernels are not available: {unavailable_reason()}")
    b, nh, length, hd = keys.shape
    t = qkv.shape[0]
    if (
        t % rows
        or b != rows
        or qkv.shape[1] != nh * 3 * hd
        or qkv.stride(1) != 1
        or positions.shape != (t,)
        or positions.dtype != torch.int64
        or values.shape != keys.shape
        or not (keys.is_contiguous() and values.is_contiguous() and positions.is_contiguous())
        or hd % 16
        or hd > 256
    ):
        raise ValueError(
            f"attend: qkv {tuple(qkv.shape)}, positions {tuple(positions.shape)} "
            f"{positions.dtype}, cache {tuple(keys.shape)} for {rows} rows"
        )
    ctx = torch.empty(t, nh * hd, dtype=qkv.dtype)
    bad = lib.attend(
        qkv.data_ptr(),
        qkv.stride(0),
        positions.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        ctx.data_ptr(),
        rows,
        t // rows,
        nh,
        hd,
        length,
        torch.get_num_threads(),
    )
    if bad >= 0:  # checked in C before anything is written: no reduction per layer here
        raise ValueError(
            f"attend: token {bad} (row {bad // (t // rows)}) has cache slot "
            f"{int(positions[bad])}, outside the cache's 0..{length - 1}"
        )
    return ctx
