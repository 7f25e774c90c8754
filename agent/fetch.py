"""Opening a URL for a download (images, test definitions): http and https with urllib, file on
the worker, each under the worker's file policy (:mod:`agent.policy`).

urllib is imported on the first download, not with the agent: ``--validate`` and jobs that
download nothing do not pay for it. User and password in an http(s) URL
(``http://user:secret@host/...``) become a Basic ``Authorization`` header, as LAVA sends them.
Whatever goes wrong is an OSError (a status other than 2xx after redirects: HTTPStatusError), so
callers handle one kind of exception, also for a body cut short while it is read; what the policy
refuses is a :class:`~agent.policy.PolicyRefusal` (a JobError), never an OSError.

The policy is applied to the URL as written, then to every connection urllib makes (the first
request's, each redirect's, a proxy's): the agent resolves the host itself and connects only to an
address the policy allows, so no second lookup can answer otherwise. Redirects go to http and https
only.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from agent.policy import Access, PolicyRefusal

if TYPE_CHECKING:
    from agent.policy import FilePolicy

#: the schemes open_url reads (LAVA's downloads also know scp, lxc and downloads)
SCHEMES = ("http", "https", "file")


class HTTPStatusError(OSError):
    """The server answered with a status other than success (2xx) or a redirect it followed."""

    def __init__(self, url: str, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.url = url
        self.code = code
        self.reason = reason


def open_url(url: str, policy: FilePolicy, headers: dict[str, str] | None = None,
             timeout: float = 30.0) -> _Body | BinaryIO:
    """A binary stream of the body at ``url`` (http, https or file): ``read(size)``, ``close()``, a
    context manager. ``timeout`` bounds the connection and each read. ``policy`` decides what of
    the worker itself may be read (PolicyRefusal)."""
    import http.client
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise OSError(f"unsupported URL scheme {parts.scheme!r} in {url}; known: {', '.join(SCHEMES)}")
    if parts.scheme == "file":
        return policy.open_file(url)
    refusal = policy.refusal(Access("url", url))
    if refusal:
        raise PolicyRefusal(refusal)
    if parts.scheme in ("http", "https") and parts.username is not None:
        import base64

        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        if not any(name.lower() == "authorization" for name in headers):
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        return _Body(_opener(policy).open(urllib.request.Request(url, headers=headers), timeout=timeout))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise HTTPStatusError(url, exc.code, str(exc.reason)) from None
    except urllib.error.URLError as exc:  # refused, no route, timed out: what the socket said
        raise exc.reason if isinstance(exc.reason, OSError) else OSError(str(exc.reason)) from None
    except http.client.HTTPException as exc:  # not an HTTP server, a malformed answer
        raise OSError(f"{parts.hostname} did not answer in HTTP: {exc!r}") from None


def _opener(policy: FilePolicy) -> Any:
    """A urllib opener for http and https only, whose connections and redirects ``policy`` checks
    (made for each download: a few objects, and the proxies of the environment as it is now)."""
    import urllib.request

    def checked(http_class: type, url: str) -> type:
        """``http_class`` whose connections go only to addresses ``policy`` allows (for ``url``)."""

        class Checked(http_class):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = functools.partial(policy.connect, url)

        return Checked

    class Checking:
        def do_open(self, http_class: type, req: Any, **kwargs: Any) -> Any:
            return super().do_open(checked(http_class, req.full_url), req, **kwargs)

    class HTTPHandler(Checking, urllib.request.HTTPHandler):
        pass

    class HTTPSHandler(Checking, urllib.request.HTTPSHandler):
        pass

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            scheme = urlsplit(newurl).scheme
            if scheme not in ("http", "https"):
                raise PolicyRefusal(f"{req.full_url} redirects to {newurl}: a download follows redirects to "
                                    "http and https only")
            refusal = policy.refusal(Access("url", newurl))
            if refusal:
                raise PolicyRefusal(f"{refusal} (a redirect from {req.full_url})")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), HTTPHandler(), HTTPSHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), RedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


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
