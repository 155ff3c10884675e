"""The lab's state directory ``.lab/<name>/``: what ``up`` created, pinned host keys, secrets, logs.

Secrets (SSH key, known_hosts, kubeconfig) are written mode 0600 from the start (never chmod after).
``state.json`` is rewritten atomically, so a Ctrl-C never leaves it half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path(".lab")
_LOCK = threading.RLock()  # phases update the record from several threads (one per node)


def write_private(path: Path, data: bytes | str) -> None:
    """Write a secret atomically with mode 0600 (the file never exists with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LabState:
    """One lab's state directory. Cheap to construct; nothing is created until written."""

    def __init__(self, name: str, root: Path | str | None = None):
        self.name = name
        self.root = Path(root) if root is not None else Path(os.environ.get("LAB_STATE_DIR", DEFAULT_ROOT))
        self.dir = self.root / name

    # ---- paths
    @property
    def file(self) -> Path:
        return self.dir / "state.json"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    # ---- the JSON record
    def exists(self) -> bool:
        return self.file.exists()

    def load(self) -> dict[str, Any]:
        if not self.file.exists():
            return {}
        return json.loads(self.file.read_text())

    def save(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state.")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.file)

    def update(self, **changes: Any) -> dict[str, Any]:
        with _LOCK:
            data = self.load()
            data.update(changes)
            self.save(data)
            return data

    def set_in(self, section: str, key: str, value: Any) -> None:
        with _LOCK:
            data = self.load()
            data.setdefault(section, {})[key] = value
            self.save(data)

    def get_in(self, section: str, key: str, default: Any = None) -> Any:
        return self.load().get(section, {}).get(key, default)

    def remove(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
