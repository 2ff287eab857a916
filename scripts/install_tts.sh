#!/usr/bin/env bash
# Offline TTS engines and voices `rtvc data synth` uses (Debian/Ubuntu): flite (awb, rms, slt, kal16), espeak-ng,
# festival with festvox-kdlpc16k (ked) and nine other languages' festival voices (accented English training voices:
# itf itm czf czm czm2 fif fim rum caf). The package list is rtvc.data.synth.VOICES's.
set -euo pipefail
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
PY=${PYTHON:-python3}
pkgs=$($PY -c "from rtvc.data.synth import VOICES; print(' '.join(sorted({v.package for v in VOICES} | {'festival'})))" 2>/dev/null \
       || echo "flite festival festvox-kdlpc16k espeak-ng")
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
echo "installed: $pkgs"
