"""List updates: fetch a list's newest bundle from its source, verify it, install it
atomically, and refuse rollbacks across restarts.

    state.py     the durable record per list (highest version, manifest digest) and
                 per source (ETag, Last-Modified); the rollback rule `judge`
    fetch.py     conditional fetch from an https:// URL or a local path
    install.py   stage beside the old bundle, fsync, rename, fsync the directory
    updater.py   `Updater`: one check of every source (`run_once`), or a thread
    commands.py  `netfilter list update`

Source layout (what an authority publishes): one file per list, the newest full
bundle, at a fixed name; the version is the one inside its signed manifest, so there
is no unsigned index to trust or to freeze. A directory, or a base URL ending in `/`,
holds it under the configured bundle's file name (`lists/demo.nfl` is fetched as
`SOURCE/demo.nfl`); any other source is the bundle's own URL or path. This is how
freshclam mirrors publish `daily.cvd`: a plain HTTPS mirror or an rsync'ed
directory serves it, and HTTP caches and conditional requests keep a check cheap.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netfilter.updates.state import Installed, VersionState, judge, state_path
    from netfilter.updates.updater import STEPS, Updater, UpdateResult

__all__ = ["STEPS", "Installed", "UpdateResult", "Updater", "VersionState", "judge",
           "state_path"]

# Loaded on first use: `netfilter list --help` reaches commands.py through this
# package, and must not import httpx and the updater for it.
_LAZY = {"Installed": "state", "VersionState": "state", "judge": "state",
         "state_path": "state", "STEPS": "updater", "Updater": "updater",
         "UpdateResult": "updater"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'netfilter.updates' has no attribute {name!r}")
    value = getattr(import_module(f"netfilter.updates.{module}"), name)
    globals()[name] = value
    return value
