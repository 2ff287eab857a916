#!/usr/bin/env bash
# Offline TTS engines `rtvc data synth` uses (Debian/Ubuntu): flite (awb, rms, slt, kal16), festival with
# festvox-kdlpc16k (ked) and espeak-ng.
set -euo pipefail
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends flite festival festvox-kdlpc16k espeak-ng >/dev/null
echo "installed: $(flite --version 2>&1 | head -1); espeak-ng $(espeak-ng --version | awk '{print $4}')"
