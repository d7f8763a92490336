#!/usr/bin/env bash
# System libraries a headless Linux box needs for Qt / OpenGL rendering (napari) and a virtual
# X server (Xvfb). Installed with apt-get when we are allowed to (root or password-less sudo),
# otherwise listed so the user can install them.
set -u
PKGS="xvfb xauth libgl1 libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 \
libxkbcommon-x11-0 libxkbcommon0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1"
command -v dpkg-query >/dev/null 2>&1 || { echo "system_deps: not a Debian/Ubuntu system; make sure Xvfb, Mesa GL (libGL, DRI) and Qt's xcb libraries are installed."; exit 0; }
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# python3 -m venv needs the python3-venv package on Debian/Ubuntu system Pythons
if ! ${PYTHON:-python3} -c "import ensurepip, venv" >/dev/null 2>&1; then missing="$missing python3-venv"; fi
[ -z "$missing" ] && exit 0
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "system_deps: missing system packages:$missing"
    echo "  install them with: sudo apt-get install -y$missing"
    echo "  (without them the viewer tests skip and the headless demo cannot render)"
    exit 0
  fi
fi
echo "system_deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
  || echo "system_deps: apt-get could not install:$missing (viewer tests will be skipped without a display)"
exit 0
