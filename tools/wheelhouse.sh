#!/usr/bin/env bash
# Build a wheelhouse for offline GPU nodes that already have torch (and transformers, triton)
# but none of megagpt's other dependencies; HPC compute nodes often have no internet.
#
#   tools/wheelhouse.sh --python 3.12 --platform manylinux_2_28_x86_64 --out wheelhouse
#
# then, on the GPU node (this is what bench/gpu_check.sh runs):
#
#   pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
#
# What it does, on this machine (needs network and an importable torch, any build):
#   1. builds megagpt's own wheel and the wheels of dependencies PyPI ships only as source:
#      DeepSpeed (at the version installed here, DS_BUILD_OPS=0: no CUDA needed, ops JIT-build
#      on the GPU if ever used), jieba, rouge-score; a non-pure wheel is refused;
#   2. resolves megagpt (+ pytest, for tests/gpu) for the target Python and platform with pip's
#      resolver (`--report`), pinned to the versions installed here (what the CPU tests pass
#      with), torch replaced by a dependency-free stub so no CUDA wheel is ever fetched;
#   3. keeps what is reachable from megagpt without passing through a package the GPU node
#      already has (--provided), downloads those as binary wheels for the target;
#   4. writes requirements.txt, checks offline that it resolves from the folder alone (stubs
#      stand in for the provided packages), prints the size and fails above --max-mib.
#
# --leave-out "wandb jieba" leaves packages megagpt imports only when a feature asks for them
# (wandb: logging.wandb=online; jieba: segmentation without rjieba) out of the folder, with what
# only they need (wandb + jieba are 38 of its 63 MiB). requirements.txt then pins every package
# to install and says so on a `# install: --no-deps` line, which bench/gpu_check.sh honours:
# pip's resolver would otherwise ask for the packages left out.
#
# Source-only packages that this script does not know yet are found by the resolver's error and
# built here, as long as their wheel is pure Python.
set -euo pipefail

PYVER=3.12
PLATFORM=manylinux_2_28_x86_64
OUT=""
MAX_MIB=64
TORCH_STUB=2.11.0
# Packages every torch + transformers install carries: transformers >= 4.40 requires all of them
# at versions megagpt accepts (PyYAML: only 6.x installs on Python 3.12). Small ones with a
# version floor an older install could miss (packaging, typing-extensions, tqdm) stay here.
PROVIDED="torch triton transformers numpy tokenizers safetensors huggingface-hub regex pyyaml"
SOURCE_ONLY="deepspeed jieba rouge-score"
LEAVE_OUT=""
PY=${PYTHON:-python}

usage() {
    cat <<EOF
usage: tools/wheelhouse.sh [--python 3.12] [--platform manylinux_2_28_x86_64] --out DIR
                           [--max-mib 64] [--torch-stub 2.11.0] [--provided "NAMES"]
                           [--leave-out "NAMES"]

  --python      target CPython version (X.Y)
  --platform    target platform tag; manylinux_2_N_ARCH also admits every older manylinux
  --out         the wheelhouse folder (its *.whl and requirements.txt are replaced)
  --max-mib     fail when the wheels add up to more than this many MiB (what the device
                machine's file transfer carries, and what \`du -sh\` calls M)
  --torch-stub  torch version the resolver assumes the GPU node has
  --provided    packages the GPU node already has (nvidia-* always counts); default:
                $PROVIDED
  --leave-out   packages left out with what only they need (megagpt imports them lazily:
                wandb, jieba); the install is then --no-deps from a fully pinned list
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYVER=$2; shift 2 ;;
        --platform) PLATFORM=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --max-mib) MAX_MIB=$2; shift 2 ;;
        --torch-stub) TORCH_STUB=$2; shift 2 ;;
        --provided) PROVIDED=$2; shift 2 ;;
        --leave-out) LEAVE_OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "wheelhouse.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ -z "$OUT" ]]; then
    echo "wheelhouse.sh: --out DIR is required" >&2; usage >&2; exit 2
fi
if [[ ! "$PYVER" =~ ^3\.[0-9]+$ ]]; then
    echo "wheelhouse.sh: --python '$PYVER' is not X.Y (e.g. 3.12)" >&2; exit 2
fi

# manylinux_2_28_x86_64 -> every manylinux_2_N_x86_64 with N <= 28, plus the legacy alias.
PLATFORM_ARGS=()
if [[ "$PLATFORM" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
    arch=${BASH_REMATCH[2]}
    for ((n = BASH_REMATCH[1]; n >= 17; n--)); do
        PLATFORM_ARGS+=(--platform "manylinux_2_${n}_${arch}")
    done
    PLATFORM_ARGS+=(--platform "manylinux2014_${arch}")
else
    PLATFORM_ARGS+=(--platform "$PLATFORM")
fi
PLATFORM_ARGS+=(--platform any)
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORM_ARGS[@]}")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }
log() { echo "[wheelhouse] $*"; }

"$PY" -c "import torch" 2>/dev/null || {
    echo "wheelhouse.sh: torch must be importable here ($PY): DeepSpeed's build imports it" >&2
    exit 1; }

installed_version() {
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" \
        2>/dev/null || true
}

# A package left out resolves to a stand-in at the version installed here: it must be installed.
for name in $LEAVE_OUT; do
    if [[ -z "$(installed_version "$name")" ]]; then
        echo "wheelhouse.sh: --leave-out $name: not installed here ($PY), so there is no" \
             "version to pin it at" >&2
        exit 2
    fi
done

# Checks passed: the folder's previous wheels give way to the new ones.
rm -f "$OUT"/*.whl "$OUT/requirements.txt"

# Versions installed here pin the resolution; torch, local builds (+cpu) and megagpt excluded.
"$PY" - "$WORK/constraints.txt" <<'EOF'
import sys
from importlib.metadata import distributions
from packaging.utils import canonicalize_name
pins = {}
for d in distributions():
    name, version = canonicalize_name(d.metadata["Name"] or ""), d.version
    if name and "+" not in version and name not in ("megagpt", "torch", "triton") \
            and not name.startswith("nvidia-"):
        pins[name] = version
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
EOF

# A wheel of a source-only package; refuses anything that is not pure Python.
build_pure_wheel() {
    local name=$1 version spec
    version=$(installed_version "$name")
    spec=$name${version:+==$version}
    log "building $spec from source"
    if [[ "$name" == deepspeed ]]; then
        # DeepSpeed's setup.py imports torch: build against the one installed here.
        DS_BUILD_OPS=0 pip_ wheel --quiet --no-deps --no-build-isolation --no-cache-dir \
            "$spec" -w "$WORK/built"
    else
        pip_ wheel --quiet --no-deps --no-cache-dir "$spec" -w "$WORK/built"
    fi
    local whl
    for whl in "$WORK"/built/*.whl; do
        if [[ ! "$whl" =~ -none-any\.whl$ ]]; then
            echo "wheelhouse.sh: $(basename "$whl") is not pure Python; it cannot be built" \
                 "here for $PLATFORM" >&2
            exit 1
        fi
        mv "$whl" "$OUT/"
    done
}

log "building megagpt"
# From a copy of the checkout's files (tracked + untracked, not ignored): a build in the tree
# would leave build/lib behind, whose stale modules the next build would package again.
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done \
        | xargs -0 cp --parents -t "$WORK/src")
else
    (cd "$ROOT" && tar --exclude=./build --exclude=./wheelhouse --exclude=./.git -cf - .) \
        | tar -xf - -C "$WORK/src"
fi
pip_ wheel --quiet --no-deps --no-build-isolation "$WORK/src" -w "$OUT"
MEGAGPT_WHL=$(ls "$OUT"/megagpt-*.whl)
for name in $SOURCE_ONLY; do
    [[ " $LEAVE_OUT " == *" $name "* ]] || build_pure_wheel "$name"
done

# Dependency-free stand-ins for the packages the GPU node has (a wheel is a zip: dist-info only).
make_stub() {  # name version dir
    "$PY" - "$@" <<'EOF'
import sys, zipfile
name, version, out = sys.argv[1:4]
dist = name.replace("-", "_")
info = f"{dist}-{version}.dist-info"
with zipfile.ZipFile(f"{out}/{dist}-{version}-py3-none-any.whl", "w") as z:
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: wheelhouse.sh\n"
               "Root-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
EOF
}
mkdir -p "$WORK/stub"
make_stub torch "$TORCH_STUB+stub" "$WORK/stub"
# A package left out resolves to a dependency-free stand-in at the version installed here.
STUB_ARGS=("$WORK/stub/torch-$TORCH_STUB+stub-py3-none-any.whl")
for name in $LEAVE_OUT; do
    version=$(installed_version "$name")
    make_stub "$name" "$version+stub" "$WORK/stub"
    STUB_ARGS+=("$WORK/stub/${name//-/_}-$version+stub-py3-none-any.whl")
done

# The test extra's requirements, minus what the GPU node has or does not need (ruff, mypy and
# its stubs: the checks .ci/run makes before the tests, not needed to run tests/gpu).
mapfile -t EXTRA_REQS < <("$PY" - "$MEGAGPT_WHL" <<'EOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
for line in msg.get_all("Requires-Dist") or []:
    r = Requirement(line)
    if r.marker and r.marker.evaluate({"extra": "test"}) and \
            not r.marker.evaluate({"extra": ""}) and \
            r.name not in ("transformers", "ruff", "mypy", "types-PyYAML"):
        r.marker = None
        print(r)
EOF
)

# Resolve for the target; a package with no wheel for it is source-only: build it, retry.
for attempt in 1 2 3 4 5 6; do
    log "resolving for CPython $PYVER on $PLATFORM (attempt $attempt)"
    if pip_ install --dry-run --ignore-installed --target "$WORK/target" \
            --report "$WORK/report.json" "${TARGET[@]}" --find-links "$OUT" \
            -c "$WORK/constraints.txt" "${STUB_ARGS[@]}" \
            "$MEGAGPT_WHL" "${EXTRA_REQS[@]}" >"$WORK/resolve.err" 2>&1; then
        break
    fi
    # Either form says no wheel of a pinned version exists: a plain miss, or a conflict of a
    # dependency with its pin (pip's explanation, printed without --quiet).
    missing=$(sed -nE -e 's/.*No matching distribution found for ([A-Za-z0-9._-]+).*/\1/p' \
              -e 's/.*The user requested \(constraint\) ([A-Za-z0-9._-]+)==.*/\1/p' \
              "$WORK/resolve.err" | head -1)
    if [[ -z "$missing" || $attempt == 6 ]]; then
        cat "$WORK/resolve.err" >&2
        echo "wheelhouse.sh: the resolution failed (above)" >&2
        exit 1
    fi
    build_pure_wheel "$missing"
done

# Keep what megagpt reaches without passing through a provided package.
"$PY" - "$WORK/report.json" "$PROVIDED" "$WORK" "$OUT" "$LEAVE_OUT" <<'EOF'
import json, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
report = json.load(open(sys.argv[1]))
provided = {canonicalize_name(n) for n in sys.argv[2].split()}
work, out = sys.argv[3], sys.argv[4]
left_out = {canonicalize_name(n) for n in sys.argv[5].split()}
env = report["environment"]
items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}

def is_provided(name):
    return name in provided or name.startswith("nvidia-")

def deps(name, extras):
    out = []
    for line in items[name]["metadata"].get("requires_dist", []):
        r = Requirement(line)
        for extra in extras or {""}:
            if r.marker is None or r.marker.evaluate({**env, "extra": extra}):
                out.append((canonicalize_name(r.name), frozenset(r.extras)))
                break
    return out

roots = [(n, frozenset(i.get("requested_extras") or ())) for n, i in items.items()
         if i.get("requested")]
keep, seen, stack = set(), set(), [(n, e | {""}) for n, e in roots]
while stack:
    name, extras = stack.pop()
    if (name, extras) in seen or is_provided(name) or name in left_out:
        continue
    seen.add((name, extras))
    keep.add(name)
    stack.extend((d, e | {""}) for d, e in deps(name, extras) if d in items)
used_provided = sorted(n for n in items if is_provided(n))
with open(f"{work}/download.txt", "w") as f:
    for name in sorted(keep):
        url = items[name]["download_info"]["url"]
        if not url.startswith(f"file://{out}/"):  # built above, or a download
            f.write(f"{name}=={items[name]['metadata']['version']}\n")
with open(f"{work}/pinned.txt", "w") as f:
    f.write("".join(f"{n}=={items[n]['metadata']['version']}\n" for n in sorted(keep)))
with open(f"{work}/provided.txt", "w") as f:
    f.write("".join(f"{n} {items[n]['metadata']['version']}\n" for n in used_provided))
dropped = sorted(set(items) - keep - set(used_provided))
print("[wheelhouse] keeping %d packages; provided by the GPU node: %s; left out, or reached "
      "only through those or the node's: %s" % (
          len(keep), " ".join(used_provided) or "-", " ".join(dropped) or "-"))
EOF

log "downloading $(wc -l <"$WORK/download.txt") binary wheels"
pip_ download --quiet --no-deps "${TARGET[@]}" -d "$OUT" -r "$WORK/download.txt"

MEGAGPT_VERSION=$(basename "$MEGAGPT_WHL" | cut -d- -f2)
{
    echo "# megagpt wheelhouse for CPython $PYVER on $PLATFORM, built $(date -u +%Y-%m-%d)"
    echo "# by tools/wheelhouse.sh. Install offline on a node that has torch (>= 2.6):"
    echo "#   pip install --no-index --find-links DIR -r DIR/requirements.txt"
    echo "# Assumed present there, at versions of its own (not in this folder):" \
         "$(cut -d' ' -f1 "$WORK/provided.txt" | tr '\n' ' ')"
    if [[ -n "$LEAVE_OUT" ]]; then
        echo "# Left out (megagpt imports them only when a feature asks): $LEAVE_OUT"
        echo "# so every package is pinned below and the install must not resolve dependencies:"
        echo "# install: --no-deps"
        cat "$WORK/pinned.txt"
    else
        echo "megagpt==$MEGAGPT_VERSION"
        printf '%s\n' "${EXTRA_REQS[@]}"
    fi
} >"$OUT/requirements.txt"

# Offline check: the folder alone (plus stand-ins for what the node provides) must resolve.
while read -r name version; do
    [[ "$name" == torch ]] || make_stub "$name" "$version+stub" "$WORK/stub"
done <"$WORK/provided.txt"
log "checking offline: pip install --no-index --find-links $OUT -r requirements.txt"
pip_ install --dry-run --quiet --no-index --ignore-installed --target "$WORK/check" \
    --report "$WORK/check.json" "${TARGET[@]}" --find-links "$OUT" --find-links "$WORK/stub" \
    -r "$OUT/requirements.txt"
"$PY" - "$WORK/check.json" "$OUT" <<'EOF'
import json, os, sys
report = json.load(open(sys.argv[1]))
used = {os.path.basename(i["download_info"]["url"]) for i in report["install"]}
have = {f for f in os.listdir(sys.argv[2]) if f.endswith(".whl")}
unused = sorted(have - used)
if unused:
    print("[wheelhouse] not needed by the offline install (remove?):", " ".join(unused))
print("[wheelhouse] offline resolution OK: %d wheels from the folder, stand-ins for: %s" % (
    len(used & have), " ".join(sorted(i["metadata"]["name"] for i in report["install"]
                                      if "+stub" in i["metadata"]["version"]))))
EOF

total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
ls -S -l "$OUT"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 2^20, $NF}' | sed "s#$OUT/##"
size=$(awk -v b="$total" 'BEGIN { printf "%.1f MiB (%.1f MB)", b / 2^20, b / 1e6 }')
log "total: $size in $(ls "$OUT"/*.whl | wc -l) wheels ($OUT)"
if (( total > MAX_MIB * 1048576 )); then
    echo "wheelhouse.sh: $size is over the $MAX_MIB MiB limit" >&2
    exit 1
fi
