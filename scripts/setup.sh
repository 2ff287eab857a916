#!/usr/bin/env bash
# rtvc set-up on Debian/Ubuntu with Python 3.11.
#   bash scripts/setup.sh          runtime: PortAudio + rtvc (CPU torch)
#   bash scripts/setup.sh --test   + what the test suite needs (JACK dummy driver, TTS voices, pytest)
# GPU users: install your CUDA build of torch first (see README "GPU users"); this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
PY=${PYTHON:-python3}

apt_pkgs=(libportaudio2 libsndfile1)
if [[ $want_test -eq 1 ]]; then
  apt_pkgs+=(jackd2 flite festival festvox-kdlpc16k espeak-ng chromium)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "setup: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  # jackd2 asks about realtime priority; we run it with --no-realtime, so answer non-interactively
  echo "jackd2 jackd/tweak_rt_limits boolean false" | $SUDO debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# torch: keep an installed build (CPU or CUDA); otherwise take the pinned CPU build. The package itself
# only asks for torch>=2.4, which an installed 2.13.0 satisfies, so pip never pulls the CUDA wheel set.
if ! $PY -c "import torch" 2>/dev/null; then
  echo "setup: pip install torch==2.13.0 (CPU)"
  $PY -m pip install -q torch==2.13.0 ${RTVC_TORCH_INDEX:+--index-url "$RTVC_TORCH_INDEX"}
fi

extra=""
[[ $want_test -eq 1 ]] && extra="[test]"
echo "setup: pip install -e .${extra}"
$PY -m pip install -q -e ".${extra}"
