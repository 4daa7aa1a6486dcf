#!/usr/bin/env bash
# Collect, on a machine with internet access, everything an offline (air-gapped) GPU node needs to
# install vlajax and its `libero` extra: wheels for the node's Python and platform, the Debian
# packages of the EGL/OpenGL loader (glvnd) that MuJoCo's EGL rendering needs, a requirements file
# and an install script. See README.md, "Offline install (air-gapped GPU nodes)".
#
#   bash scripts/wheelhouse.sh [options]           # writes ./wheelhouse (next to pyproject.toml)
#   # carry wheelhouse/ to the node, then there:
#   bash wheelhouse/install.sh                     # or PYTHON=/path/to/python3 bash wheelhouse/install.sh
#
# What is shipped: the requirements of vlajax (pyproject.toml, read at run time, so a changed pin
# such as mujoco's is followed) and of the chosen extras, and theirs, recursively, for the target
# Python/platform, EXCEPT
#   - distributions the target already has (--target-has: a name list or a `pip freeze`; default
#     scripts/wheelhouse-target-has.txt): neither shipped nor followed;
#   - requirements that packages declare but never import on vlajax's path: for libero, robosuite and
#     bddl the declared requirements are replaced by what their modules import when vlajax builds,
#     resets and steps an OffScreenRenderEnv (RUNTIME_REQUIRES below). Because the declared ones stay
#     unmet, the node installs the generated requirements.txt with `pip install --no-deps`.
# Pure-Python sdists (libero, bddl) are built into wheels here; a package that has neither a wheel for
# the target nor a pure-Python sdist is an error. vlajax itself is built into a wheel from the checkout.
# The GL environment to use on the node is written to <out>/gl-env.sh.
#
# Options:
#   -o, --out DIR          output folder (default: <repo>/wheelhouse); wheels that are no longer
#                          needed are removed from it, already downloaded ones are reused
#   --python-version X.Y   target Python (default 3.12)
#   --platform TAG         target platform tag, repeatable (default: manylinux_2_{28,27,24,17}_x86_64,
#                          manylinux2014_x86_64: a node with glibc >= 2.28; pip matches manylinux_2_N
#                          exactly, so list every N the node's glibc accepts)
#   --target-has FILE      what the node already has (default scripts/wheelhouse-target-has.txt)
#   --extras LIST          comma-separated vlajax extras to include (default: libero; '' for none)
#   --no-debs              skip the Debian EGL/OpenGL packages
#   --split SIZE           also write <out>-parts/: the wheelhouse as a tar stream cut into parts of
#                          SIZE (split(1) syntax, e.g. 55M), with SHA256SUMS and the join command
# Environment: PYTHON (the Python that runs pip here, default python3, >= 3.11),
#   APT_LISTS (apt lists folder for the amd64 download, default /tmp/amd64).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
OUT=$ROOT/wheelhouse
PYVER=3.12
PLATFORMS=()
TARGET_HAS=$ROOT/scripts/wheelhouse-target-has.txt
EXTRAS=libero
DEBS=1
SPLIT=
# glvnd: the vendor-neutral EGL/GL dispatch libraries. The vendor library itself (libEGL_nvidia) comes
# with the NVIDIA driver; MuJoCo loads libEGL.so.1 and PyOpenGL libOpenGL.so.0 / libGL.so.1.
DEB_PACKAGES=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

while [ $# -gt 0 ]; do
  case $1 in
    -o|--out) OUT=$2; shift 2 ;;
    --python-version) PYVER=$2; shift 2 ;;
    --platform) PLATFORMS+=("$2"); shift 2 ;;
    --target-has) TARGET_HAS=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --no-debs) DEBS=0; shift ;;
    --split) SPLIT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "wheelhouse.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
                                        manylinux_2_17_x86_64 manylinux2014_x86_64)
[ -f "$TARGET_HAS" ] || { echo "wheelhouse.sh: no such file: $TARGET_HAS" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TARGET_HAS=$(cd "$(dirname "$TARGET_HAS")" && pwd)/$(basename "$TARGET_HAS")

# ---- 1. wheels (a small resolver: pip downloads one package at a time, no dependencies) ----------
"$PY" - "$ROOT" "$OUT" "$PYVER" "$TARGET_HAS" "$EXTRAS" "${PLATFORMS[@]}" <<'PYEOF'
import email.parser, os, re, shutil, subprocess, sys, tempfile, zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

root, out, pyver, target_has_file, extras_arg, *platforms = sys.argv[1:]
root, out = Path(root), Path(out)
py = sys.executable

# What libero/robosuite/bddl import on vlajax's path (vlajax.envs.libero: setup_libero, suite_tasks,
# OffScreenRenderEnv build + reset + step, quat2axisangle), found by tracing the modules loaded and
# reading their import statements. Declared but not imported there: libero's hf-egl-probe, hydra-core,
# robomimic (-> torch, torchvision, tensorboard, h5py, egl_probe, ...), transformers, einops, thop,
# wandb, opencv-python, future; bddl's pytest, jupytext, networkx. Imported but not declared:
# robosuite's termcolor and pyopengl. cv2 comes from opencv-python-headless (what the image has; the
# declared opencv-python would be a second, conflicting cv2).
RUNTIME_REQUIRES = {
    "libero": ["robosuite==1.4.0", "bddl==1.0.1", "easydict", "cloudpickle>=2.0.0", "gymnasium>=0.29.0",
               "matplotlib>=3.5.3", "mujoco>=3.0.0", "numpy", "pyyaml"],
    "robosuite": ["numpy>=1.13.3", "numba>=0.49.1", "scipy>=1.2.3", "mujoco>=2.3.0", "pillow",
                  "opencv-python-headless", "termcolor", "pyopengl"],
    "bddl": ["future", "numpy"],
}
# A name that another distribution also provides (the same import package).
PROVIDED_BY = {"opencv-python": ["opencv-python-headless", "opencv-contrib-python",
                                 "opencv-contrib-python-headless"]}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


major, minor = pyver.split(".")[:2]
ENV = {
    "python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0",
    "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
    "platform_machine": "x86_64" if any("x86_64" in p for p in platforms) else "aarch64",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_version": "", "implementation_version": f"{major}.{minor}.0",
}


def applies(req, extras=()):
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**ENV, "extra": e}) for e in (*extras, ""))


# -- the target's distributions --------------------------------------------------------------------
target = {}
for line in Path(target_has_file).read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line or line.startswith("-"):
        continue
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^]]*\])?\s*(?:==\s*([^\s;]+))?", line)
    if m:
        target[norm(m.group(1))] = m.group(2)
print(f"target: Python {pyver}, {', '.join(platforms)}; {len(target)} distributions already there "
      f"({target_has_file})")


def on_target(name):
    n = norm(name)
    return n in target or any(norm(p) in target for p in PROVIDED_BY.get(n, ()))


# -- downloads -------------------------------------------------------------------------------------
def pip(*args, **kw):
    return subprocess.run([py, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, **kw)


def fetch(name, spec):
    """Path of a wheel of `name spec` for the target: downloaded, or built from a pure-Python sdist."""
    req = f"{name}{spec}"
    plat = [a for p in platforms for a in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        r = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", pyver,
                "--implementation", "cp", *plat, "--find-links", str(out), "-d", tmp, req)
        if r.returncode == 0:  # a fresh download, or a copy of the wheel already in `out`
            (f,) = Path(tmp).iterdir()
            return Path(shutil.move(str(f), out / f.name))
        if "from versions: none" not in r.stderr and "No matching distribution" not in r.stderr:
            sys.exit(f"pip download {req} failed:\n{r.stderr}")
        # No wheel for the target: build the sdist here, and accept it only if it is pure Python.
        r = pip("download", "--no-deps", "--no-binary=:all:", "-d", tmp, req)
        if r.returncode != 0:
            sys.exit(f"{req}: no wheel for the target and no sdist:\n{r.stderr}")
        (sdist,) = list(Path(tmp).iterdir())
        r = pip("wheel", "--no-deps", "-w", f"{tmp}/built", str(sdist))
        if r.returncode != 0:
            sys.exit(f"{req}: building {sdist.name} failed:\n{r.stderr}")
        (whl,) = list(Path(tmp, "built").glob("*.whl"))
        if not whl.name.endswith("-none-any.whl"):
            sys.exit(f"{req}: only an sdist on PyPI, and it builds a platform wheel ({whl.name}); "
                     "build it for the target yourself")
        print(f"  built {whl.name} from the sdist {sdist.name}")
        return Path(shutil.move(str(whl), out / whl.name))


def wheel_meta(path):
    with zipfile.ZipFile(path) as z:
        (meta,) = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


# -- the walk --------------------------------------------------------------------------------------
pyproject = tomllib.loads((root / "pyproject.toml").read_text())["project"]
extras = [e for e in extras_arg.split(",") if e]
roots = list(pyproject["dependencies"])
for e in extras:
    roots += pyproject["optional-dependencies"][e]
why = {}  # name -> who needs it
specs = {}  # name -> SpecifierSet
want_extras = {}  # name -> extras requested
done = {}  # name -> (wheel path, version, extras processed)
warnings = []
queue = []


def need(req_str, by):
    req = Requirement(req_str)
    if not applies(req):
        return
    n = norm(req.name)
    if on_target(n):
        v = target.get(n)
        if v and req.specifier and not req.specifier.contains(v, prereleases=True):
            warnings.append(f"{by} needs {req}, the target has {v}")
        return
    specs[n] = specs.get(n, SpecifierSet()) & req.specifier
    want_extras.setdefault(n, set()).update(req.extras)
    why.setdefault(n, [])
    if by not in why[n]:
        why[n].append(by)
    queue.append(n)


for r in roots:
    need(r, "vlajax")
while queue:
    n = queue.pop(0)
    if n in done:
        path, ver, ex = done[n]
        if specs[n].contains(ver, prereleases=True) and want_extras[n] <= ex:
            continue
        if not specs[n].contains(ver, prereleases=True):
            path.unlink()
    path = fetch(n, str(specs[n]))
    name, ver, requires = wheel_meta(path)
    if not specs[n].contains(ver, prereleases=True):
        sys.exit(f"{name} {ver} does not satisfy {specs[n]}")
    done[n] = (path, ver, set(want_extras[n]))
    print(f"  {path.name}  ({', '.join(why[n])})")
    if n in RUNTIME_REQUIRES:
        requires = RUNTIME_REQUIRES[n]
    for r in requires:
        req = Requirement(r)
        if applies(req, want_extras[n]):
            need(str(req).split(";")[0], name)

# vlajax itself, built from a copy of the checkout's files (git-tracked and untracked-not-ignored),
# so that no build/ or egg-info folder appears in the checkout.
with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp, "src")
    try:
        files = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True).stdout
        names = [f for f in files.decode().split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                 and not {".venv", ".git", "wheelhouse", "runs"} & set(p.relative_to(root).parts)]
    for f in names:
        if f.startswith(("vlajax/", "pyproject.toml", "README.md", "LICENSE", "setup.")):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, src / f)
    for old in out.glob("vlajax-*.whl"):
        old.unlink()
    r = pip("wheel", "--no-deps", "-w", str(out), str(src))
    if r.returncode != 0:
        sys.exit(f"building vlajax's wheel failed:\n{r.stderr}")
vl = next(out.glob("vlajax-*.whl"))
print(f"  {vl.name}  (built from {root})")

keep = {p.name for p, _, _ in done.values()} | {vl.name}
for f in out.glob("*.whl"):
    if f.name not in keep:
        print(f"  removed {f.name} (no longer needed)")
        f.unlink()
lines = ["# Generated by scripts/wheelhouse.sh: install with",
         "#   pip install --no-index --find-links <this folder> --no-deps -r requirements.txt",
         "# --no-deps because libero/robosuite/bddl declare requirements that vlajax's path never",
         f"# imports (see the script). Target: Python {pyver}, {', '.join(platforms)}."]
for n in sorted(done):
    path, ver, _ = done[n]
    name = wheel_meta(path)[0]
    lines.append(f"{name}=={ver}  # {', '.join(why[n])}")
lines.append(f"{wheel_meta(vl)[0]}=={wheel_meta(vl)[1]}")
(out / "requirements.txt").write_text("\n".join(lines) + "\n")
for w in warnings:
    print(f"WARNING: {w}")
PYEOF

# ---- 2. Debian packages of the EGL/OpenGL loader (amd64), unpacked on the node with dpkg -x -------
if [ "$DEBS" = 1 ]; then
  LISTS=${APT_LISTS:-/tmp/amd64}
  mkdir -p "$LISTS/partial" "$LISTS.cache/archives/partial"
  # Own lists and cache folders: the machine's apt state (and architecture) is left alone.
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$LISTS"
     "-oDir::Cache=$LISTS.cache" -oDebug::NoLocking=1)
  [ "$(id -u)" != 0 ] || o+=(-oAPT::Sandbox::User=root)
  apt-get "${o[@]}" -qq update >/dev/null
  rm -rf "$OUT/debs" && mkdir -p "$OUT/debs"
  (cd "$OUT/debs" && apt-get "${o[@]}" -qq download "${DEB_PACKAGES[@]}")
  echo "debs: $(cd "$OUT/debs" && ls | tr '\n' ' ')"
fi

# ---- 3. the install script and the GL environment for the node ----------------------------------
cat > "$OUT/gl-env.sh" <<'EOF'
# Source this before running vlajax on the node: headless MuJoCo rendering through EGL.
export MUJOCO_GL=${MUJOCO_GL:-egl}
# NVIDIA drivers mounted under /usr/local/nvidia ship glvnd's vendor file outside the loader's search
# path (/usr/share/glvnd/egl_vendor.d): point the loader at it.
_f=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
if [ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" ] && [ -f "$_f" ]; then export __EGL_VENDOR_LIBRARY_FILENAMES=$_f; fi
# glvnd unpacked into a prefix (install.sh with VLAJAX_GL_PREFIX, or as non-root): make it findable.
_gl_prefix=${VLAJAX_GL_PREFIX:-$HOME/.local/vlajax-gl}
if [ "$_gl_prefix" != / ] && [ -d "$_gl_prefix/usr/lib/x86_64-linux-gnu" ]; then
  export LD_LIBRARY_PATH=$_gl_prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
unset _gl_prefix _f
EOF
cat > "$OUT/install.sh" <<EOF
#!/usr/bin/env bash
# Offline install of vlajax + LIBERO from this wheelhouse (made by scripts/wheelhouse.sh for
# Python $PYVER, ${PLATFORMS[*]}). Needs no network.
#   bash install.sh [--editable SRC]    # SRC: a vlajax checkout, installed editable instead of the wheel
# Environment: PYTHON (default python3: the image's Python that has jax, flax, ...),
#   VLAJAX_GL_PREFIX (unpack the GL libraries there, and not into /; a non-root user's default is
#   ~/.local/vlajax-gl; source gl-env.sh with the same value).
EOF
cat >> "$OUT/install.sh" <<'EOF'
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
editable=
[ "${1:-}" = "--editable" ] && editable=$2
# 1. The EGL/OpenGL loader (glvnd): into $VLAJAX_GL_PREFIX when that is set; else only if the node
#    lacks it, into / as root or into ~/.local/vlajax-gl otherwise (gl-env.sh puts a prefix on
#    LD_LIBRARY_PATH).
gl_prefix=${VLAJAX_GL_PREFIX:-}
if [ -z "$gl_prefix" ] && ! { ldconfig -p | grep -q 'libEGL\.so\.1 ' && ldconfig -p | grep -q 'libOpenGL\.so\.0 '; }; then
  if [ "$(id -u)" = 0 ]; then gl_prefix=/; else gl_prefix=$HOME/.local/vlajax-gl; fi
fi
if [ -n "$gl_prefix" ] && ls "$here"/debs/*.deb >/dev/null 2>&1; then
  mkdir -p "$gl_prefix"
  for f in "$here"/debs/*.deb; do dpkg -x "$f" "$gl_prefix"; done
  if [ "$gl_prefix" = / ]; then
    ldconfig
  else  # PyOpenGL tries libEGL.so before libEGL.so.1: the prefix must win over a system libEGL.so
    for l in "$gl_prefix"/usr/lib/x86_64-linux-gnu/lib*.so.[0-9]; do ln -sfn "$(basename "$l")" "${l%.so.*}.so"; done
  fi
  echo "install.sh: unpacked $(ls "$here"/debs | wc -l) GL packages (glvnd) into $gl_prefix"
fi
# 2. The wheels. --no-deps: the requirements file is the complete list (libero and robosuite declare
#    requirements that vlajax never imports, e.g. torch through robomimic).
"$PY" -m pip install --no-index --find-links "$here" --no-deps -r "$here/requirements.txt"
if [ -n "$editable" ]; then
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$editable"
fi
"$PY" -c 'import vlajax, ray, mujoco, omegaconf, gymnasium, tensorboardX, imageio_ffmpeg; print("install.sh: vlajax", vlajax.__file__, "| ray", ray.__version__, "| mujoco", mujoco.__version__)'
echo "install.sh: done. Before running vlajax: source $here/gl-env.sh"
EOF
chmod +x "$OUT/install.sh"

# ---- 4. summary, and the optional split tarball ------------------------------------------------
echo "wheelhouse: $OUT ($(du -sh "$OUT" | cut -f1)); files over 10 MB:"
find "$OUT" -type f -size +10M -printf '  %s\t%f\n' | sort -rn | awk -F'\t' '{printf "  %6.1f MB  %s\n", $1/1e6, $2}'
if [ -n "$SPLIT" ]; then
  PARTS=$OUT-parts
  name=$(basename "$OUT")
  rm -rf "$PARTS" && mkdir -p "$PARTS"
  tar -C "$(dirname "$OUT")" -cf - "$name" | split -b "$SPLIT" -d -a 2 - "$PARTS/$name.tar.part-"
  (cd "$PARTS" && sha256sum "$name".tar.part-* > SHA256SUMS)
  cat > "$PARTS/JOIN.txt" <<EOF
On the node, in the folder holding these files:
  sha256sum -c SHA256SUMS && cat $name.tar.part-* | tar -xf - && bash $name/install.sh
EOF
  echo "parts: $PARTS"; ls -l "$PARTS" | tail -n +2 | awk '{printf "  %6.1f MB  %s\n", $5/1e6, $9}'
fi
