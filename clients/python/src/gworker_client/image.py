"""Images: the root filesystems a sandbox can start from."""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = ["Image", "DEFAULT_IMAGE", "SUPPORTED_PYTHON_VERSIONS"]

#: The image used when ``Sandbox.create(image=None)``.
DEFAULT_IMAGE = "debian-slim"
#: Python versions ``Image.debian_slim()`` can provide.
SUPPORTED_PYTHON_VERSIONS: Tuple[str, ...] = ("3.11",)


class Image:
    """A reference to an image the daemon knows (``busybox``, ``debian-slim``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("an image name is a non-empty string")
        self.name: str = name

    @classmethod
    def from_name(cls, name: str) -> "Image":
        """The image the daemon knows as ``name`` (``busybox``, ``debian-slim``)."""
        return cls(name)

    @classmethod
    def debian_slim(cls, python_version: Optional[str] = None) -> "Image":
        """The default image: a minimal Debian with Python 3.11.

        ``python_version`` may be ``None`` or one of
        :data:`SUPPORTED_PYTHON_VERSIONS`; anything else raises ``ValueError``.
        """
        if python_version is not None and python_version not in SUPPORTED_PYTHON_VERSIONS:
            raise ValueError(
                f"python_version {python_version!r} is not available in debian-slim; "
                f"supported: {', '.join(SUPPORTED_PYTHON_VERSIONS)}"
            )
        return cls(DEFAULT_IMAGE)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Image", self.name))

    def __repr__(self) -> str:
        return f"Image.from_name({self.name!r})"
