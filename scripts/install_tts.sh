#!/usr/bin/env bash
# Offline TTS engines and voices `rtvc data synth` uses (Debian/Ubuntu): flite (awb, rms, slt, kal16), espeak-ng,
# festival with festvox-kdlpc16k (ked) and nine other languages' festival voices (accented English training voices:
# itf itm czf czm czm2 fif fim rum caf), and MBROLA's four English diphone voices (mbf mbm mbm2 mbm3, driven by
# espeak-ng), RHVoice's English voices (bdl clb evg lyu), SVOX Pico (pcf pcf2) and festival's rab. The package list comes from rtvc itself (rtvc.data.synth.debian_packages): install rtvc first
# (scripts/setup.sh).
# MBROLA's voices live in Debian's contrib / non-free components (Ubuntu: multiverse). On Debian, where apt does
# not know them, this script adds those components for the release in /etc/apt/sources.list.d/rtvc-mbrola.list;
# elsewhere it installs the other voices and names the ones it could not.
set -euo pipefail
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
PY=${PYTHON:-python3}
pkgs=$($PY -c "from rtvc.data.synth import debian_packages; print(' '.join(debian_packages()))") \
  || { echo "install_tts.sh: rtvc is not importable by $PY: run scripts/setup.sh first" >&2; exit 1; }
$SUDO apt-get update -qq
if ! apt-cache show mbrola-us1 >/dev/null 2>&1 && [[ -r /etc/os-release ]] && grep -q '^ID=debian' /etc/os-release; then
  codename=$(. /etc/os-release; echo "$VERSION_CODENAME")
  echo "install_tts.sh: enabling Debian contrib / non-free for MBROLA ($codename)"
  # apt refuses one source with two keyrings: sign ours as the release's own entry is (deb822 Signed-By, if any)
  key=$(sed -n 's/^Signed-By: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  echo "deb ${key:+[signed-by=$key] }http://deb.debian.org/debian $codename contrib non-free" \
    | $SUDO tee /etc/apt/sources.list.d/rtvc-mbrola.list >/dev/null
  $SUDO apt-get update -qq
fi
have=(); skipped=()
for p in $pkgs; do
  if apt-cache show "$p" >/dev/null 2>&1; then have+=("$p"); else skipped+=("$p"); fi
done
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${have[@]}" >/dev/null
echo "installed: ${have[*]}"
if [[ ${#skipped[@]} -gt 0 ]]; then
  echo "install_tts.sh: not in your apt sources: ${skipped[*]}; the voices that need them are unavailable (name" \
       "the others with \`rtvc data synth --voices ...\`)" >&2
fi
