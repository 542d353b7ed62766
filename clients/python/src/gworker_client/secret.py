"""Secrets: environment values given to a sandbox without writing them in code.

``Secret.from_dict({...})`` is sent with the create request and used for that
sandbox only (never stored); ``Secret.from_name(name)`` is a secret the daemon
stores encrypted (``gworker secret create NAME KEY=VALUE...`` or
:meth:`Secret.create`). Values become environment variables of the entry
command and of every exec: the image's env < secrets in the order given <
``env=`` < an exec's own ``env=``. See ``docs/secrets.md``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._transport import Transport

__all__ = ["Secret"]


def _parse_dotenv(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        if "=" not in line:
            raise ValueError(f"dotenv line {i}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            inner, value, j = value[1:-1], "", 0
            while j < len(inner):
                c = inner[j]
                if c == "\\" and j + 1 < len(inner):
                    j += 1
                    value += "\n" if inner[j] == "n" else inner[j]
                else:
                    value += c
                j += 1
        else:
            value = value.split(" #", 1)[0].strip()
        out[key.strip()] = value
    return out


class Secret:
    """A secret: either a named one the daemon stores, or literal values."""

    __slots__ = ("name", "_values")

    def __init__(self, *, name: Optional[str] = None, values: Optional[Mapping[str, str]] = None) -> None:
        if (name is None) == (values is None):
            raise ValueError("a Secret has either a name or values")
        if values is not None:
            for key, value in values.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError("Secret values map str to str")
        self.name: Optional[str] = name
        self._values: Optional[Dict[str, str]] = dict(values) if values is not None else None

    @classmethod
    def from_dict(cls, env_dict: Mapping[str, str]) -> "Secret":
        """A secret made of these environment variables (sent with the
        request, never stored by the daemon)."""
        return cls(values=env_dict)

    @classmethod
    def from_name(cls, name: str) -> "Secret":
        """The secret the daemon stores under ``name`` (``NotFoundError`` at
        ``Sandbox.create`` if there is none)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a secret name is a non-empty string")
        return cls(name=name)

    @classmethod
    def from_local_environ(cls, env_keys: Sequence[str]) -> "Secret":
        """These variables of this process's environment (``KeyError`` naming
        the missing ones)."""
        if isinstance(env_keys, str):
            env_keys = [env_keys]
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise KeyError(f"not set in the local environment: {', '.join(missing)}")
        return cls(values={k: os.environ[k] for k in env_keys})

    @classmethod
    def from_dotenv(cls, path: Union[str, "os.PathLike[str]", None] = None, *, filename: str = ".env") -> "Secret":
        """The variables of a dotenv file: ``path`` itself if it is a file, else
        ``filename`` in the directory ``path`` (default: the current one)."""
        p = os.fspath(path) if path is not None else os.getcwd()
        if os.path.isdir(p):
            p = os.path.join(p, filename)
        with open(p, encoding="utf-8") as f:
            return cls(values=_parse_dotenv(f.read()))

    # -- stored secrets ---------------------------------------------------------

    @classmethod
    def create(cls, name: str, env_dict: Mapping[str, str], *, overwrite: bool = False) -> "Secret":
        """Store a secret on the daemon (encrypted at rest); ``ConflictError``
        if it exists and not ``overwrite``. Returns ``Secret.from_name(name)``."""
        Transport.from_env().call(
            "POST", "/v1/secrets", {"name": name, "values": dict(env_dict), "overwrite": bool(overwrite)}
        )
        return cls.from_name(name)

    @staticmethod
    def list() -> List[str]:
        """Names of the stored secrets (values are never listed)."""
        return [s["name"] for s in Transport.from_env().call("GET", "/v1/secrets")["secrets"]]

    @staticmethod
    def delete(name: str) -> None:
        """Delete a stored secret (``NotFoundError`` if unknown)."""
        from urllib.parse import quote

        Transport.from_env().call("DELETE", f"/v1/secrets/{quote(name, safe='')}")

    def to_json(self) -> Dict[str, Any]:
        """The secret as it goes into the create request."""
        if self.name is not None:
            return {"name": self.name}
        return {"values": dict(self._values or {})}

    def __repr__(self) -> str:  # never shows the values
        if self.name is not None:
            return f"Secret.from_name({self.name!r})"
        return f"Secret.from_dict(<{len(self._values or {})} values>)"
