#!/usr/bin/env bash
# Offline TTS engines and voices `rtvc data synth` uses (Debian/Ubuntu): flite (awb, rms, slt, kal16), espeak-ng,
# festival with festvox-kdlpc16k (ked) and nine other languages' festival voices (accented English training voices:
# itf itm czf czm czm2 fif fim rum caf). The package list comes from rtvc itself (rtvc.data.synth.debian_packages):
# install rtvc first (scripts/setup.sh).
set -euo pipefail
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
PY=${PYTHON:-python3}
pkgs=$($PY -c "from rtvc.data.synth import debian_packages; print(' '.join(debian_packages()))") \
  || { echo "install_tts.sh: rtvc is not importable by $PY: run scripts/setup.sh first" >&2; exit 1; }
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
echo "installed: $pkgs"
