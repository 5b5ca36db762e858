#!/usr/bin/env bash
# runtime.sh — set up what building and running the recognizer needs, in the repo:
#   - Debian packages: libclang-dev (bindgen), protobuf-compiler (tonic), espeak-ng + sox (test speech);
#   - the sherpa-onnx runtime (PyPI sherpa-onnx-core, pinned) in .runtime/sherpa_onnx/lib;
#   - the silero VAD model (PyPI silero-vad, pinned) as .runtime/models/silero_vad.onnx;
#   - the Whisper tiny.en model, copied from a local cache folder (MODEL_CACHE) and verified,
#     into .runtime/models/whisper-tiny.en/;
#   - .cargo/config.toml, so that plain `cargo build` / `cargo test` find and load the runtime.
# Idempotent: when everything is in place a run only checks hashes of small files and exits.
# Must run as root for apt (CI and sessions are root here). No network beyond apt and PyPI.
#
#   bash deploy/runtime.sh
#   MODEL_CACHE=/path/to/models bash deploy/runtime.sh   # folder holding whisper-tiny.en/
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=$ROOT/.runtime
WHEELS=$RUNTIME/wheels
MODELS=$RUNTIME/models
DEFAULT_CACHE=$ROOT/../shared/models
MODEL_CACHE=${MODEL_CACHE:-}
if [[ -z $MODEL_CACHE && -d $DEFAULT_CACHE ]]; then MODEL_CACHE=$(cd "$DEFAULT_CACHE" && pwd); fi

# Pinned wheels: sherpa-rs 0.6.8's bindings were generated for sherpa-onnx 1.12.9 (see
# ../shared/models/README.md); the hashes are the ones PyPI served when this was pinned.
SHERPA_WHEEL=sherpa_onnx_core-1.12.9-py3-none-manylinux2014_x86_64.whl
SHERPA_SPEC=sherpa-onnx-core==1.12.9
SHERPA_SHA256=3afb13a8a0644fb7e1a751ea316d86d7842c78c3942c7456d2f0683aa0f1d5cd
VAD_WHEEL=silero_vad-6.2.3-py3-none-any.whl
VAD_SPEC=silero-vad==6.2.3
VAD_SHA256=7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8
WHISPER=whisper-tiny.en
WHISPER_FILES=(tiny.en-encoder.int8.onnx tiny.en-decoder.int8.onnx tiny.en-tokens.txt)

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 -qq)

log() { printf '[runtime] %s\n' "$*"; }
die() { printf '[runtime] ERROR: %s\n' "$*" >&2; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- Debian packages ------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in libclang-dev protobuf-compiler espeak-ng sox; do installed "$p" || missing+=("$p"); done
# pip fetches the wheels and python3 unpacks them (no unzip on a minimal Debian). Asking pip
# itself costs ~1 s, so it is only asked when a wheel is actually missing.
wheel_ok() { [[ -f $WHEELS/$1 && -f $WHEELS/.$1.unpacked && $(<"$WHEELS/.$1.unpacked") == "$2" ]]; }
if ! { wheel_ok "$SHERPA_WHEEL" "$SHERPA_SHA256" && wheel_ok "$VAD_WHEEL" "$VAD_SHA256"; }; then
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  "${APT[@]}" update
  "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
else
  log "apt packages present"
fi

# --- pinned wheels ----------------------------------------------------------------------
# fetch_wheel <spec> <file> <sha256>: downloads (no dependencies) unless a verified copy is there.
# A wheel that was verified and unpacked before is trusted (its marker holds the hash).
fetch_wheel() {
  local spec=$1 file=$2 want=$3
  wheel_ok "$file" "$want" && return 0
  if [[ -f $WHEELS/$file && $(sha_of "$WHEELS/$file") == "$want" ]]; then return 0; fi
  log "downloading $spec from PyPI"
  mkdir -p "$WHEELS"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 \
    --dest "$WHEELS" "$spec"
  [[ -f $WHEELS/$file ]] || die "pip did not produce $WHEELS/$file"
  local got; got=$(sha_of "$WHEELS/$file")
  [[ $got == "$want" ]] || die "$file: sha256 $got, expected $want (PyPI served a different file; refusing it)"
  # A new wheel invalidates what was unpacked from the old one.
  rm -f "$WHEELS/.$file.unpacked"
}
fetch_wheel "$SHERPA_SPEC" "$SHERPA_WHEEL" "$SHERPA_SHA256"
fetch_wheel "$VAD_SPEC" "$VAD_WHEEL" "$VAD_SHA256"

# The marker records which wheel hash a folder was unpacked from.
if wheel_ok "$SHERPA_WHEEL" "$SHERPA_SHA256" && [[ -f $RUNTIME/sherpa_onnx/lib/libsherpa-onnx-c-api.so ]]; then
  log "sherpa-onnx runtime present"
else
  log "unpacking sherpa-onnx runtime into .runtime/sherpa_onnx"
  rm -rf "$RUNTIME/sherpa_onnx"
  python3 - "$WHEELS/$SHERPA_WHEEL" "$RUNTIME" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("sherpa_onnx/")])
PY
  for lib in libsherpa-onnx-c-api.so libonnxruntime.so; do
    [[ -f $RUNTIME/sherpa_onnx/lib/$lib ]] || die "$SHERPA_WHEEL has no sherpa_onnx/lib/$lib"
  done
  echo "$SHERPA_SHA256" >"$WHEELS/.$SHERPA_WHEEL.unpacked"
fi
if wheel_ok "$VAD_WHEEL" "$VAD_SHA256" && [[ -f $MODELS/silero_vad.onnx ]]; then
  log "silero VAD model present"
else
  log "unpacking .runtime/models/silero_vad.onnx"
  mkdir -p "$MODELS"
  python3 - "$WHEELS/$VAD_WHEEL" "$MODELS/silero_vad.onnx" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("silero_vad/data/silero_vad.onnx"))
PY
  echo "$VAD_SHA256" >"$WHEELS/.$VAD_WHEEL.unpacked"
fi

# --- Whisper model from the local cache ---------------------------------------------------
DEST=$MODELS/$WHISPER
# Fast path: the copy is verified against its own SHA256SUMS once, then trusted while the
# files keep the size and mtime recorded in the stamp (hashing 100 MB on every run is ~0.3 s).
stamp_of() { (cd "$DEST" && stat -c '%n %s %Y' SHA256SUMS "${WHISPER_FILES[@]}" 2>/dev/null); }
if [[ -f $DEST/.verified && $(stamp_of) == "$(<"$DEST/.verified")" ]]; then
  log "whisper model present in .runtime/models/$WHISPER"
else
  SRC=${MODEL_CACHE:+$MODEL_CACHE/$WHISPER}
  if [[ -z $SRC || ! -f $SRC/SHA256SUMS ]]; then
    die "Whisper model not found. Put the files ${WHISPER_FILES[*]} and SHA256SUMS into a folder
  <cache>/$WHISPER/ and run:  MODEL_CACHE=<cache> bash deploy/runtime.sh
  (default cache: $DEFAULT_CACHE; looked in: ${SRC:-<none: MODEL_CACHE unset and the default folder does not exist>})"
  fi
  for f in "${WHISPER_FILES[@]}"; do
    [[ -f $SRC/$f ]] || die "$SRC/$f is missing (expected: ${WHISPER_FILES[*]} and SHA256SUMS in $SRC)"
    grep -q " $f\$" "$SRC/SHA256SUMS" || die "$SRC/SHA256SUMS has no entry for $f"
  done
  log "verifying $SRC against its SHA256SUMS"
  (cd "$SRC" && sha256sum --quiet --check SHA256SUMS) || die "checksum mismatch in $SRC: the cache is corrupt; replace its files"
  log "copying $WHISPER into .runtime/models/$WHISPER"
  rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
  cp "$SRC/SHA256SUMS" "${WHISPER_FILES[@]/#/$SRC/}" "$DEST.tmp/"
  chmod u+w "$DEST.tmp"/*
  (cd "$DEST.tmp" && sha256sum --quiet --check SHA256SUMS) || die "copy in $DEST.tmp does not match SHA256SUMS"
  rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
  stamp_of >"$DEST/.verified"
fi

# --- cargo configuration -------------------------------------------------------------------
# sherpa-rs-sys's build script links against $SHERPA_LIB_PATH/lib when SHERPA_LIB_PATH is set
# (with default-features = false it never downloads). The rpath is absolute: $ORIGIN would
# not hold for test binaries, which live in target/*/deps.
LIB=$RUNTIME/sherpa_onnx/lib
CONFIG=$ROOT/.cargo/config.toml
WANT=$(cat <<EOF
# Generated by deploy/runtime.sh; do not edit (re-run the script instead).
[env]
SHERPA_LIB_PATH = "$RUNTIME/sherpa_onnx"

[target.'cfg(target_os = "linux")']
rustflags = ["-C", "link-arg=-Wl,-rpath,$LIB"]
EOF
)
if [[ -f $CONFIG && $(<"$CONFIG") == "$WANT" ]]; then
  log ".cargo/config.toml up to date"
else
  mkdir -p "$ROOT/.cargo"
  printf '%s\n' "$WANT" >"$CONFIG"
  log "wrote .cargo/config.toml (SHERPA_LIB_PATH=$RUNTIME/sherpa_onnx, rpath $LIB)"
fi
log "ready: runtime $RUNTIME/sherpa_onnx, models $MODELS"
