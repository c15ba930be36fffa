"""How rto's processes join a Ray cluster that uses token authentication (Ray 2.60).

A head started while a token is available runs in token mode, and every node and driver that joins
it must run with ``RAY_AUTH_MODE=token`` as well; with the mode unset, joining fails with
``AuthenticationError ... RAY_AUTH_MODE is currently 'disabled'``, even on the same machine with the
same token file. rto sets the mode wherever a token is available (`use_token_auth`), which is
what Ray itself does when it starts a head.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def ray_token_available(env: Mapping[str, str] | None = None) -> bool:
    """A token Ray would use: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, or
    ``~/.ray/auth_token``."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH") or str(Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token")
    return Path(path).is_file()


def use_token_auth(env: dict[str, str] | None = None) -> None:
    """``RAY_AUTH_MODE=token`` in ``env`` (default: this process's) when a token is available and no
    mode is set."""
    env = os.environ if env is None else env
    if "RAY_AUTH_MODE" not in env and ray_token_available(env):
        env["RAY_AUTH_MODE"] = "token"
