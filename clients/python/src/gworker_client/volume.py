"""Volumes: named, persistent directories mounted into sandboxes.

The daemon does not implement volumes yet: ``Sandbox.create(volumes={...})``
raises :class:`~gworker_client.exceptions.NotSupportedError`.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["Volume"]


class Volume:
    """A named volume."""

    __slots__ = ("name", "create_if_missing")

    def __init__(self, name: str, create_if_missing: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a volume name is a non-empty string")
        self.name: str = name
        self.create_if_missing: bool = bool(create_if_missing)

    @classmethod
    def from_name(cls, name: str, create_if_missing: bool = False) -> "Volume":
        """The volume called ``name`` (created on first use if ``create_if_missing``)."""
        return cls(name, create_if_missing)

    def to_json(self) -> Dict[str, Any]:
        """The volume as it goes into the create request."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"Volume.from_name({self.name!r}, create_if_missing={self.create_if_missing})"
