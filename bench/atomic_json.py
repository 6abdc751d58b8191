"""JSON results written whole or not at all: a temporary file beside the target, then os.replace.

bench/device_check.sh kills a step that runs out of time, possibly while it rewrites its JSON; a plain
write would leave the file cut in half and lose every row measured before. With this the file holds
either the previous rows or the new ones (os.replace is atomic within one file system).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def dump(data, path, **kwargs) -> None:
    """json.dumps(data, indent=2, **kwargs) into ``path``, atomically; makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, **kwargs))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
