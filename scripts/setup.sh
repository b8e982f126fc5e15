#!/usr/bin/env bash
# Install protege and what it needs on a fresh machine (idempotent; re-running is cheap).
#  - OSMesa (Debian libosmesa6) for offscreen MuJoCo rendering: videos and camera observations, and
#    libusb-1.0 (libusb-1.0-0), which pyrealsense2 loads (RealSense cameras), and libhidapi (libhidapi-hidraw0),
#    which pyspacemouse's HID layer loads (SpaceMouse teleoperation).
#    Best effort: state-only training and evaluation work without them.
#  - the protege package with its Python dependencies (torch, diffusers, zarr, metaworld, ...) and pytest.
#  - robosuite 1.5.2 + robomimic 0.3.0 (robomimic tasks), without their numpy<2 / opencv-python pins.
#  - franky-sim in its own venv (Franka backend tests).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libOSMesa || ! ldconfig -p 2>/dev/null | grep -q libusb-1.0 \
   || ! ldconfig -p 2>/dev/null | grep -q libhidapi-hidraw; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 libusb-1.0-0 libhidapi-hidraw0 >/dev/null; } \
      || echo "setup: could not install libosmesa6 / libusb-1.0-0 / libhidapi-hidraw0; rendering, RealSense cameras or the SpaceMouse will be unavailable" >&2
  else
    echo "setup: no apt-get; install OSMesa yourself for rendering (state-only runs do not need it)" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e '.[dev,robomimic]'
# robosuite + robomimic without their declared pins (see the `robomimic` extra in pyproject.toml)
python -m pip install -q --disable-pip-version-check --no-deps robosuite==1.5.2 robomimic==0.3.0
# franky-sim (a libfranka-protocol simulator, for the Franka backend tests) pulls MuJoCo 4, which
# Meta-World's MuJoCo 3.3 pin excludes: it gets its own venv (~2-3 min once; best effort, the tests
# create it themselves or skip with the reason when this fails).
FRANKY_VENV="${PROTEGE_FRANKY_SIM_VENV:-$HOME/.cache/protege/franky-sim-venv}"
if [ ! -x "$FRANKY_VENV/bin/franky-sim" ]; then
  { python -m venv "$FRANKY_VENV" && "$FRANKY_VENV/bin/pip" install -q --disable-pip-version-check franky-sim==1.0.4; } \
    || echo "setup: could not create the franky-sim venv at $FRANKY_VENV; the Franka backend tests will try again or skip" >&2
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true  # expose the new `protege` console script
echo "setup: done ($(python -c 'import torch, protege; print("protege", protege.__version__, "torch", torch.__version__)'))"
