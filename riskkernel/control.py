"""The kill switch's plumbing, on the side of the processes that find each other: where a process that owns
live runs says how to reach its `/rk` API, and the client `rk kill` uses to call it.

Each owner (an `rk run`) writes a control file in the data dir, `control/PID-START.json`, private (0600 in a
0700 directory), holding its API's loopback URL and a random per-process bearer token, and removes it when
it stops. `rk kill RUN_ID` finds the run's owner in the ledger, reads the owner's file and posts the kill.
Only someone who can read the data dir, the owner's own user, can stop a run. This module never imports
aiohttp: `rk kill` starts fast.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskkernel import paths
from riskkernel.errors import RkError

AUTHORIZATION = "Authorization"
TIMEOUT = 10.0  # seconds `rk kill` waits for the owner to answer


@dataclass(frozen=True, slots=True)
class Control:
    url: str  # the owner's base URL, e.g. http://127.0.0.1:41295
    token: str

    def authorization(self) -> str:
        return f"Bearer {self.token}"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def control_file(owner: str) -> Path:
    """Where the owner `host:pid:start` (as the ledger keeps it) says how to reach it."""
    _, _, rest = owner.partition(":")
    return paths.data_dir() / "control" / (rest.replace(":", "-").replace("/", "_") + ".json")


def publish(owner: str, control: Control) -> Path:
    """Write this process's control file, readable by its user only; returns its path, to remove at exit."""
    path = control_file(owner)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": control.url, "token": control.token}, f)
    os.replace(tmp, path)  # never a half-written file for a reader
    return path


def unpublish(path: Path) -> None:
    path.unlink(missing_ok=True)


def find(owner: str | None) -> Control:
    """How to reach a run's owner, or an RkError saying why it cannot be reached."""
    import socket

    if not owner:
        raise RkError("the run has no owner process on record")
    host = owner.partition(":")[0]
    if host != socket.gethostname():
        raise RkError(f"the run is owned by a process on another machine ({host}): run rk kill there")
    try:
        data = json.loads(control_file(owner).read_text())
        return Control(url=str(data["url"]), token=str(data["token"]))
    except FileNotFoundError:
        raise RkError("its owner process has no control file: it has stopped, or is an older rk") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RkError(f"cannot read its owner's control file: {exc}") from None


def find_by_url(url: str) -> Control | None:
    """The control file of the live rk process serving at `url` on this machine (same data dir), if any: not
    the file a crashed process left, which may name the same address with another token."""
    import socket

    from riskkernel.ledger.store import owner_alive

    folder = paths.data_dir() / "control"
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or str(data.get("url", "")).rstrip("/") != url.rstrip("/"):
            continue
        pid, _, start = path.stem.partition("-")  # as `control_file` names it
        if owner_alive(f"{socket.gethostname()}:{pid}:{start}"):
            return Control(url=str(data["url"]), token=str(data.get("token", "")))
    return None


def call(control: Control, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON request to an owner's `/rk` API, never through an HTTP proxy."""
    import urllib.error
    import urllib.request

    headers = {AUTHORIZATION: control.authorization(), "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(control.url + path, method=method, headers=headers, data=data)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise RkError(f"its owner refused: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RkError(f"cannot reach its owner at {control.url}: {reason}") from None
