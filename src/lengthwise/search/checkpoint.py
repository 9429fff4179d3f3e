"""Search checkpoints: one JSON file rewritten atomically after every generation.

A checkpoint carries a fingerprint of everything that decides the result (search space, budget, seed, model,
documents, target length). Resuming with a different fingerprint is refused, so a resumed run always equals an
uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from lengthwise.io import atomic_write_json
from lengthwise.search.evolution import SearchState
from lengthwise.errors import UserError

VERSION = 1


def save_checkpoint(path: str | Path, state: SearchState, fingerprint: dict) -> None:
    atomic_write_json(path, {"version": VERSION, "fingerprint": fingerprint, "state": state.to_json()})


def load_checkpoint(path: str | Path, fingerprint: dict) -> SearchState | None:
    """The saved state, or None when there is no checkpoint; raises when it belongs to another search."""
    path = Path(path)
    if not path.exists():
        return None
    try:  # JSON only: whatever else the file holds is never unpickled or run
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path} is not a JSON search checkpoint ({err}); delete it to start "
                         "over") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} is not a JSON search checkpoint (not an object); delete it to start over")
    if obj.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has version {obj.get('version')!r}; this lengthwise reads {VERSION}")
    saved = json.loads(json.dumps(obj.get("fingerprint")))
    wanted = json.loads(json.dumps(fingerprint))  # same normalisation (tuples -> lists) on both sides
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise UserError(
            f"checkpoint {path} belongs to another search (differs in: {', '.join(diff)}); "
            "use another output folder or delete the checkpoint to start over"
        )
    return SearchState.from_json(obj["state"])
