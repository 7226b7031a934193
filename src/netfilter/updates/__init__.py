"""List updates: fetch a list's newest bundle from its source, verify it, install it
atomically, and refuse rollbacks across restarts.

    state.py     the durable record per list (highest version, manifest digest) and
                 per source (ETag, Last-Modified); the rollback rule `judge`
    fetch.py     conditional fetch from an https:// URL or a local path; `probe` asks
                 "changed?" without the body
    delta.py     fetch the delta from the version in force, apply it (listdelta.py)
    install.py   stage beside the old bundle, fsync, rename, fsync the directory
    sanity.py    update sanity checks: entry count change, protected names newly covered
    held.py      versions held by them: kept in .held/, `confirm`, `reject`
    updater.py   `Updater`: one check of every source (`run_once`), or a thread
    commands.py  `netfilter list update`, `list held|confirm|reject`

Source layout (what an authority publishes): one file per list, the newest full
bundle, at a fixed name; the version is the one inside its signed manifest, so there
is no unsigned index to trust or to freeze. A directory, or a base URL ending in `/`,
holds it under the configured bundle's file name (`lists/demo.nfl` is fetched as
`SOURCE/demo.nfl`); any other source is the bundle's own URL or path. This is how
freshclam mirrors publish `daily.cvd`: a plain HTTPS mirror or an rsync'ed
directory serves it, and HTTP caches and conditional requests keep a check cheap.

Beside it the authority may publish deltas, `NAME.from-vN.delta.nfl`, one per recent
base version N (the names `netfilter list build --diff-from` writes; a URL source's
delta keeps the URL's query). A node with version N in force first asks whether the
full bundle changed without reading it (a conditional HEAD, or a stat); if it did, it
fetches the delta from N (same TLS and CA rules; no larger than the full bundle nor
`updates.max_size`), applies it to the bundle in force with the list's trusted keys
and installs the result, the authority's full bundle byte for byte, through the same
verification and rollback rules as a download, recording the full bundle's new
validators (so the next check is a 304; not when the delta is older than the full
bundle, a mirror between two publications). No delta (404, no such file) or one
larger than the full bundle, a delta from another base, or any fault of the delta:
one log line, counted (`delta_skipped`, `delta_failed`; `delta_applied` in
`Updater.stats()`), and the full bundle is fetched as before.
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
