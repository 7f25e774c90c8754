"""Opening a URL for a download (images, test definitions), with urllib.

urllib is imported on the first download, not with the agent: ``--validate`` and jobs that
download nothing do not pay for it. User and password in an http(s) URL
(``http://user:secret@host/...``) become a Basic ``Authorization`` header, as LAVA sends them.
Whatever goes wrong is an OSError (a status other than 2xx after redirects: HTTPStatusError), so
callers handle one kind of exception, also for a body cut short while it is read.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit


class HTTPStatusError(OSError):
    """The server answered with a status other than success (2xx) or a redirect it followed."""

    def __init__(self, url: str, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.url = url
        self.code = code
        self.reason = reason


def open_url(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> _Body:
    """A binary stream of the body at ``url``: ``read(size)``, ``close()``, a context manager.
    ``timeout`` bounds the connection and each read."""
    import http.client
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.username is not None:
        import base64

        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        if not any(name.lower() == "authorization" for name in headers):
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        return _Body(urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise HTTPStatusError(url, exc.code, str(exc.reason)) from None
    except urllib.error.URLError as exc:  # refused, no route, timed out: what the socket said
        raise exc.reason if isinstance(exc.reason, OSError) else OSError(str(exc.reason)) from None
    except http.client.HTTPException as exc:  # not an HTTP server, a malformed answer
        raise OSError(f"{parts.hostname} did not answer in HTTP: {exc!r}") from None


class _Body:
    """A response whose read errors are all OSErrors, and for which a body shorter than its
    Content-Length is one (http.client's ``read(size)`` returns what came and says nothing)."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def read(self, size: int = -1) -> bytes:
        import http.client

        try:
            data = self.response.read(size)
        except http.client.HTTPException as exc:
            raise OSError(f"the body was cut short: {exc!r}") from None
        missing = getattr(self.response, "length", None)
        if not data and size != 0 and missing:
            raise OSError(f"the body was cut short: the connection closed {missing} bytes before its end")
        return data

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
