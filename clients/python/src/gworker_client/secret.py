"""Secrets: environment values given to a sandbox without writing them in code.

The daemon does not implement secrets yet: ``Sandbox.create(secrets=[...])``
raises :class:`~gworker_client.exceptions.NotSupportedError`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

__all__ = ["Secret"]


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
        """A secret made of these environment variables."""
        return cls(values=env_dict)

    @classmethod
    def from_name(cls, name: str) -> "Secret":
        """The secret the daemon stores under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a secret name is a non-empty string")
        return cls(name=name)

    def to_json(self) -> Dict[str, Any]:
        """The secret as it goes into the create request."""
        if self.name is not None:
            return {"name": self.name}
        return {"values": dict(self._values or {})}

    def __repr__(self) -> str:  # never shows the values
        if self.name is not None:
            return f"Secret.from_name({self.name!r})"
        return f"Secret.from_dict(<{len(self._values or {})} values>)"
