#!/usr/bin/env bash
# Build (once) and install learn2learn 0.2.0 into the active virtual environment.
#
# Why: learn2learn 0.2.0 ships only as an sdist whose pre-generated Cython C files do not compile
# against Python >= 3.11. Regenerating them with a current Cython fixes the build. The resulting
# wheel is cached under $S2M2_WHEEL_CACHE (default ~/.cache/s2m2/wheels) so a fresh clone on the
# same machine does not rebuild it.
#
# Usage: tools/build_learn2learn.sh PYTHON
set -euo pipefail
PY="${1:?usage: build_learn2learn.sh PYTHON}"
# Absolute path (not resolved through the venv symlink): the build below runs in another folder.
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
VERSION=0.2.0
CACHE="${S2M2_WHEEL_CACHE:-$HOME/.cache/s2m2/wheels}"
mkdir -p "$CACHE"

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('learn2learn') != '$VERSION')" 2>/dev/null; then
    exit 0  # already installed
fi

wheel=$(ls "$CACHE"/learn2learn-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "[learn2learn] building $VERSION from sdist with regenerated Cython sources (~3 min, once)"
    "$PY" -m pip install -q "cython==3.3.1" "setuptools==80.9.0" "wheel==0.45.1"
    # --no-build-isolation + --no-deps: fetch the sdist only, do not run its setup_requires.
    "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "learn2learn==$VERSION" -d "$work"
    tar -xzf "$work/learn2learn-$VERSION.tar.gz" -C "$work"
    src="$work/learn2learn-$VERSION"
    # Drop the stale generated C files (and the bundled Python-3.7 Cython eggs) so cythonize
    # regenerates everything from the .pyx sources.
    rm -f "$src"/learn2learn/data/*.c "$src"/learn2learn/vision/*.c
    rm -rf "$src/.eggs"
    (cd "$src" && "$PY" setup.py -q build_ext bdist_wheel -d "$work/dist" >"$work/build.log" 2>&1) || {
        echo "[learn2learn] build failed; log follows" >&2; cat "$work/build.log" >&2; exit 1; }
    built=$(ls "$work"/dist/learn2learn-*.whl)
    # Write the cache atomically: a concurrent or interrupted build never leaves a half wheel.
    cp "$built" "$CACHE/.tmp-$(basename "$built")"
    mv "$CACHE/.tmp-$(basename "$built")" "$CACHE/$(basename "$built")"
    wheel="$CACHE/$(basename "$built")"
fi
# learn2learn's declared requirements include gsutil and qpth, which it never imports for data
# loading; its import-time needs (gym, requests, scipy, tqdm) are in requirements.txt.
"$PY" -m pip install -q --no-deps "$wheel"
