"""A process's output readers and stdin writer.

Output streams are resumable: a reader keeps the byte offset it has handed out
and, when the HTTP body breaks (connection reset, truncated chunk, daemon
restart), reconnects with ``?offset=<bytes received>`` for up to
:data:`RESUME_WINDOW` seconds, so no byte is lost or repeated. Memory stays
bounded: the body is read in chunks of at most :data:`CHUNK_SIZE` bytes.
"""

from __future__ import annotations

import http.client
import time
from typing import Iterator, List, Optional, Union

from ._transport import Transport
from .exceptions import DaemonUnavailableError, GworkerError

__all__ = ["StreamReader", "StreamWriter", "RESUME_WINDOW", "CHUNK_SIZE"]

#: How long a reader keeps trying to reconnect to an unreachable daemon.
RESUME_WINDOW = 30.0
#: The largest chunk read from the body at once.
CHUNK_SIZE = 64 * 1024
#: The largest body sent to stdin in one request (the daemon refuses > 16 MiB).
STDIN_CHUNK = 4 * 1024 * 1024


class StreamReader:
    """The stdout or stderr of a process in a sandbox.

    ``read()`` returns everything as ``str`` until the process closes the
    stream, ``read_bytes()`` the same as ``bytes``; iterating yields lines
    (``str``, with their ``"\\n"``) as the process produces them. Reads carry on
    from where the previous one stopped.
    """

    def __init__(self, transport: Transport, path: str) -> None:
        self._transport = transport
        self._path = path
        self._offset = 0  # bytes received from the daemon so far
        self._conn: Optional[http.client.HTTPConnection] = None
        self._resp: Optional[http.client.HTTPResponse] = None
        self._eof = False
        self._buf = b""  # received but not yet handed out (line iteration)
        self._pos = 0

    @property
    def offset(self) -> int:
        """Bytes of the stream received so far."""
        return self._offset

    def __repr__(self) -> str:
        return f"StreamReader({self._path!r}, offset={self._offset})"

    # -- the resumable chunk source ----------------------------------------

    def _open(self) -> None:
        self._conn, self._resp = self._transport.open_stream(f"{self._path}?offset={self._offset}")
        start = self._resp.getheader("X-Gworker-Offset")
        if start is not None and start.strip().isdigit() and int(start) != self._offset:
            self.close()
            raise GworkerError(
                f"daemon resumed {self._path} at offset {start}, expected {self._offset}", code="internal"
            )

    def close(self) -> None:
        """Drop the connection (the next read reconnects at the same offset)."""
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    def _next_chunk(self) -> bytes:
        """The next bytes of the stream, or ``b""`` at its end."""
        if self._eof:
            return b""
        deadline: Optional[float] = None
        delay = 0.05
        while True:
            try:
                if self._resp is None:
                    self._open()
                assert self._resp is not None
                data = self._resp.read1(CHUNK_SIZE)
                if not data and not self._resp.chunked and self._resp.length:
                    raise http.client.IncompleteRead(b"", self._resp.length)
            except GworkerError as e:
                if not isinstance(e, DaemonUnavailableError):
                    raise
                error: Exception = e
            except (OSError, http.client.HTTPException) as e:
                error = e
            else:
                if not data:  # the final chunk: the process closed the stream
                    if self._conn is not None:
                        self._transport.release(self._conn, self._resp)
                    self._conn = self._resp = None
                    self._eof = True
                    return b""
                self._offset += len(data)
                return data
            # The body broke or the daemon is away: reconnect at our offset.
            self.close()
            now = time.monotonic()
            if deadline is None:
                deadline = now + RESUME_WINDOW
            if now >= deadline:
                if isinstance(error, DaemonUnavailableError):
                    raise error
                raise self._transport.unavailable(f"stream {self._path} broke at offset {self._offset}: {error!r}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- public reads --------------------------------------------------------

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the stream's bytes in chunks as they are produced."""
        if self._pos < len(self._buf):
            rest, self._buf, self._pos = self._buf[self._pos :], b"", 0
            yield rest
        while True:
            chunk = self._next_chunk()
            if not chunk:
                return
            yield chunk

    def read_bytes(self) -> bytes:
        """Everything (from the current position) until the process closes the stream."""
        return b"".join(self.iter_bytes())

    def read(self) -> str:
        """Everything (from the current position) until the process closes the
        stream, decoded as UTF-8."""
        return self.read_bytes().decode("utf-8", "replace")

    def readline_bytes(self) -> bytes:
        """The next line with its ``b"\\n"`` (the last one may lack it), or
        ``b""`` at the end of the stream."""
        end = self._buf.find(b"\n", self._pos)
        if end >= 0:  # the common case: the line is already here
            line = self._buf[self._pos : end + 1]
            self._pos = end + 1
            return line
        parts: List[bytes] = [self._buf[self._pos :]]
        while True:
            self._buf, self._pos = self._next_chunk(), 0
            if not self._buf:
                return b"".join(parts)
            end = self._buf.find(b"\n")
            if end >= 0:
                parts.append(self._buf[: end + 1])
                self._pos = end + 1
                return b"".join(parts)
            parts.append(self._buf)

    def readline(self) -> str:
        """The next line as ``str`` with its ``"\\n"``, or ``""`` at the end."""
        return self.readline_bytes().decode("utf-8", "replace")

    def __iter__(self) -> Iterator[str]:
        while True:
            buf, start = self._buf, self._pos
            last = buf.rfind(b"\n", start)
            if last < 0:  # no whole line buffered: wait for one
                line = self.readline_bytes()
                if not line:
                    return
                yield line.decode("utf-8", "replace")
                continue
            # Hand out every whole line of the buffer; the position moves with
            # each one, so a caller that stops early loses nothing.
            pos = start
            for part in buf[start:last].split(b"\n"):
                pos += len(part) + 1
                self._pos = pos
                yield part.decode("utf-8", "replace") + "\n"
                if self._buf is not buf or self._pos != pos:  # the caller read in between
                    break


class StreamWriter:
    """The stdin of a process in a sandbox. ``write()`` hands the bytes to the
    sandbox at once; ``write_eof()`` (or ``close()``) ends the input."""

    def __init__(self, transport: Transport, path: str) -> None:
        self._transport = transport
        self._path = path
        self._closed = False

    def __repr__(self) -> str:
        return f"StreamWriter({self._path!r}, closed={self._closed})"

    @property
    def closed(self) -> bool:
        """True once ``write_eof()`` or ``close()`` was called."""
        return self._closed

    def write(self, data: Union[str, bytes, bytearray, memoryview]) -> None:
        """Send ``data`` (``str`` is encoded as UTF-8) to the process's stdin."""
        if self._closed:
            raise ValueError("write to a closed stdin")
        if isinstance(data, str):
            payload = memoryview(data.encode("utf-8"))
        elif isinstance(data, (bytes, bytearray, memoryview)):
            payload = memoryview(data).cast("B")
        else:
            raise TypeError(f"stdin.write() takes str or bytes, not {type(data).__name__}")
        for start in range(0, len(payload), STDIN_CHUNK):
            self._transport.call(
                "POST",
                self._path,
                raw_body=bytes(payload[start : start + STDIN_CHUNK]),
                content_type="application/octet-stream",
            )

    def write_eof(self) -> None:
        """Close the process's stdin (it reads end of file). Idempotent."""
        if not self._closed:
            self._transport.call("POST", f"{self._path}/close")
            self._closed = True

    def close(self) -> None:
        """Same as :meth:`write_eof`."""
        self.write_eof()

    def drain(self) -> None:
        """Nothing to do: ``write()`` already handed the bytes over (kept for
        compatibility with Modal's API)."""
