"""The user's folders for medpipe: settings (PACS node files) and caches, per platform convention."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def config_folder() -> Path:
    """The user's config folder for medpipe (XDG on Linux, Application Support on macOS, APPDATA on Windows)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "medpipe"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "medpipe"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "medpipe"


def cache_folder() -> Path:
    """The user's cache folder for medpipe: ``$MEDPIPE_CACHE_DIR`` if set, else the platform's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux). Everything in it can be deleted at any time."""
    env = os.environ.get("MEDPIPE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "medpipe" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "medpipe"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medpipe"
