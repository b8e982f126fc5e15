"""Errors a user can cause. The CLI prints them as one line and exits non-zero (no traceback)."""

from __future__ import annotations


class ProtegeError(Exception):
    """Base class for errors caused by user input (bad data, bad config, bad paths)."""


class DataError(ProtegeError, ValueError):
    """Bad or inconsistent data: names the file, the key, what was expected and what was found."""

    def __init__(self, path: object, key: str | None, expected: str, found: str) -> None:
        found = " ".join(str(found).split())  # library messages (h5py, ffmpeg) may span lines: keep one
        self.path, self.key, self.expected, self.found = str(path), key, expected, found
        where = f"{self.path}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: expected {expected}, found {found}")


class ConfigError(ProtegeError, ValueError):
    """Unknown task/policy names, missing config groups and similar."""


class RenderingError(ProtegeError, RuntimeError):
    """The MuJoCo rendering backend chosen by MUJOCO_GL cannot load (names the variable and the fix)."""
