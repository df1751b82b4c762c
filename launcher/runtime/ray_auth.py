"""Ray token authentication for `calm submit`, found where the `ray` CLI finds it.

Ray 2.60 clusters require a bearer token on every dashboard request by default. The token is taken,
in Ray's own order of precedence, from RAY_AUTH_TOKEN, from the file RAY_AUTH_TOKEN_PATH names (an
unreadable or empty file there is an error, not a reason to look further), or from ~/.ray/auth_token
(`ray get-auth-token` on the head node prints it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from launcher.train_config import ConfigError

HOW_TO_GET_ONE = ("run `ray get-auth-token` on the head node and set RAY_AUTH_TOKEN to it, point "
                  "RAY_AUTH_TOKEN_PATH at a file holding it, or save it as ~/.ray/auth_token")


@dataclass(frozen=True)
class AuthToken:
    token: str
    source: str  # where it came from, for messages

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> AuthToken | None:
    """The token the ray CLI would use, or None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({err.strerror or err})") from None
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH: {path} is empty; it should hold the cluster's token")
        return AuthToken(token, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None
    return AuthToken(token, str(default)) if token else None


def refusal(address: str, status: int, token: AuthToken | None) -> str:
    """The one line for a dashboard that refused the request (HTTP 401 or 403)."""
    if token is None:
        return (f"ray.address: the cluster at {address} requires a token (Ray token authentication) and none was "
                f"found: {HOW_TO_GET_ONE}")
    return (f"ray.address: the cluster at {address} refused the token from {token.source} (HTTP {status}); it "
            f"is not this cluster's: {HOW_TO_GET_ONE}")
