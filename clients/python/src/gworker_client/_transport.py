"""The HTTP transport to the gworker daemon, standard library only.

Owns: where the daemon is (``GWORKER_URL`` / ``GWORKER_TOKEN`` / the default
socket), one keep-alive connection per thread for ordinary requests, dedicated
connections for output streams (kept for the next stream once a stream was
read to its end), and the translation of error answers into
:mod:`gworker_client.exceptions`. It knows nothing about sandboxes.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from .exceptions import DaemonUnavailableError, GworkerError, error_from_response

__all__ = ["default_socket_path", "resolve_url", "Transport", "UnixHTTPConnection"]

_USER_AGENT = "gworker-client-python/0.1.0"
#: Socket timeout of ordinary requests. Generous: an exec on a sandbox that is
#: still starting waits for it (a first image build takes tens of seconds).
REQUEST_TIMEOUT = 300.0
#: Connections kept for the next output stream (any thread's).
IDLE_STREAM_CONNS = 4


def default_socket_path() -> str:
    """The daemon's default unix socket: ``/run/gworker/gworker.sock`` when
    running as root, else ``$XDG_RUNTIME_DIR/gworker.sock``, else
    ``/tmp/gworker-$UID/gworker.sock`` (the effective uid, as the daemon's
    ``api::default_socket_path``)."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/gworker/gworker.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "gworker.sock")
    return f"/tmp/gworker-{uid}/gworker.sock"


def resolve_url() -> str:
    """The daemon URL this process talks to: ``GWORKER_URL``, else the socket
    named by ``GWORKER_SOCKET`` (the daemon's own variable), else the default
    socket."""
    url = os.environ.get("GWORKER_URL")
    if url:
        return url
    sock = os.environ.get("GWORKER_SOCKET")
    return "unix://" + (sock or default_socket_path())


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` over a unix stream socket."""

    def __init__(self, socket_path: str, timeout: Optional[float] = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _peer_closed(sock: socket.socket) -> bool:
    """True when an idle keep-alive connection can no longer be used: the
    daemon closed it (readable with EOF) or it is broken."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Transport:
    """Requests to one daemon. Thread-safe: each thread gets its own
    keep-alive connection."""

    _cache: Dict[Tuple[str, Optional[str]], "Transport"] = {}
    _cache_lock = threading.Lock()

    def __init__(self, url: str, token: Optional[str] = None) -> None:
        self.url = url
        self.token = token or None
        if url.startswith("unix://"):
            self._socket_path: Optional[str] = url[len("unix://"):]
            if not self._socket_path:
                raise ValueError(f"GWORKER_URL {url!r} names no socket path (expected unix:///path/to.sock)")
            self._host, self._port = "", 0
        elif url.startswith("http://"):
            parsed = urllib.parse.urlsplit(url)
            if not parsed.hostname:
                raise ValueError(f"GWORKER_URL {url!r} names no host (expected http://host:port)")
            self._socket_path = None
            self._host, self._port = parsed.hostname, parsed.port or 80
        else:
            raise ValueError(f"unsupported GWORKER_URL {url!r}: use unix:///path/to.sock or http://host:port")
        self._local = threading.local()
        self._idle: List[http.client.HTTPConnection] = []
        self._idle_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "Transport":
        """The transport for ``GWORKER_URL`` / ``GWORKER_TOKEN`` as they are now
        (one shared instance per URL and token, so connections are reused)."""
        key = (resolve_url(), os.environ.get("GWORKER_TOKEN") or None)
        with cls._cache_lock:
            transport = cls._cache.get(key)
            if transport is None:
                transport = cls._cache[key] = cls(*key)
            return transport

    # -- connections -------------------------------------------------------

    def _new_connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return UnixHTTPConnection(self._socket_path, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def unavailable(self, reason: object) -> DaemonUnavailableError:
        """The error for a daemon that cannot be reached."""
        return DaemonUnavailableError(
            f"cannot reach the gworker daemon at {self.url} ({reason}); "
            "is it running? start it with `gworker serve`, or point GWORKER_URL at it"
        )

    def _connect(self, conn: http.client.HTTPConnection) -> None:
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise self.unavailable(e.strerror or e) from e

    def _headers(self, content_type: Optional[str]) -> Dict[str, str]:
        headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token and self._socket_path is None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    # -- requests ----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        *,
        content_type: Optional[str] = None,
        timeout: Optional[float] = REQUEST_TIMEOUT,
    ) -> Tuple[int, bytes]:
        """Send one request on this thread's keep-alive connection and return
        ``(status, body)``. A connection the daemon closed while idle is
        replaced once; any other failure to talk raises
        :class:`DaemonUnavailableError`."""
        conn: Optional[http.client.HTTPConnection] = getattr(self._local, "conn", None)
        reused = conn is not None and conn.sock is not None
        if reused and _peer_closed(conn.sock):  # type: ignore[union-attr]
            conn.close()  # type: ignore[union-attr]
            reused = False
        if conn is None:
            conn = self._local.conn = self._new_connection(timeout)
        headers = self._headers(content_type)
        while True:
            try:
                if conn.sock is None:
                    self._connect(conn)
                conn.sock.settimeout(timeout)
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                return resp.status, data
            except DaemonUnavailableError:
                raise
            except socket.timeout as e:
                conn.close()
                raise self.unavailable(f"no answer to {method} {path} within {timeout} s") from e
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused:
                    # The daemon closed the idle connection under us: the
                    # request never reached it. Try once on a fresh one.
                    reused = False
                    continue
                raise self.unavailable(f"connection lost: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise self.unavailable(f"connection lost: {e!r}") from e

    def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        raw_body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        timeout: Optional[float] = REQUEST_TIMEOUT,
    ) -> Any:
        """A request whose answer is JSON (or empty); error answers raise the
        exception for their code."""
        body = raw_body
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        status, data = self.request(method, path, body, content_type=content_type, timeout=timeout)
        if status >= 300:
            raise self.error(status, data)
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise GworkerError(f"daemon answered {method} {path} with invalid JSON: {data[:200]!r}", status=status) from e

    def error(self, status: int, data: bytes) -> GworkerError:
        """The exception for an error answer ``{"error": {"code", "message"}}``."""
        try:
            err = json.loads(data)["error"]
            return error_from_response(status, err.get("code"), err.get("message") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            text = data[:500].decode("utf-8", "replace")
            return GworkerError(f"HTTP {status} from the gworker daemon: {text}", status=status)

    def open_post_stream(
        self, path: str, body: bytes
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST a JSON body on a dedicated connection (no read timeout) and
        return the connection and the streamed response (e.g. build events)."""
        return self.open_stream(path, method="POST", body=body)

    def open_stream(
        self, path: str, *, method: str = "GET", body: Optional[bytes] = None
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Open a streamed request (GET unless told) on a dedicated connection (no read timeout).
        Returns the connection and the response positioned at the body. Any
        failure to talk raises :class:`DaemonUnavailableError`; an error answer
        raises the exception for its code."""
        conn = self._kept_stream_connection() if method == "GET" else None
        reused = conn is not None
        if conn is None:
            conn = self._new_connection(None)
            self._connect(conn)
        try:
            conn.request(method, path, body=body, headers=self._headers("application/json" if body else None))
            resp = conn.getresponse()
            data = resp.read() if resp.status != 200 else b""
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            conn.close()
            if reused:
                # The daemon closed the kept connection (a restart): the
                # request never reached it. Again on a fresh one.
                return self.open_stream(path, method=method, body=body)
            raise self.unavailable(f"connection lost: {e!r}") from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self.unavailable(f"connection lost: {e!r}") from e
        if resp.status != 200:
            self.release(conn, resp)
            raise self.error(resp.status, data)
        return conn, resp

    def _kept_stream_connection(self) -> Optional[http.client.HTTPConnection]:
        """A connection a finished stream left, still open, or None."""
        while True:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return None
            if conn.sock is not None and not _peer_closed(conn.sock):
                conn.sock.settimeout(None)
                return conn
            conn.close()

    def release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Done with a stream's connection: kept for the next stream when its
        response was read to the end and the daemon keeps it open, else
        closed."""
        if resp.isclosed() and not resp.will_close and conn.sock is not None:
            with self._idle_lock:
                if len(self._idle) < IDLE_STREAM_CONNS:
                    self._idle.append(conn)
                    return
        conn.close()
