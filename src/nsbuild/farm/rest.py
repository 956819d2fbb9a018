"""A client of a Buildbot master's REST interface (data API, /api/v2), the
standard library's urllib only. Answers are read bounded: a master may be
on another machine."""

from __future__ import annotations

import base64
import http.cookiejar
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from nsbuild.farm.errors import FarmError
from nsbuild.printable import printable

ANSWER_LIMIT = 16 << 20
TIMEOUT = 30.0


class Unreachable(FarmError):
    """No answer at all (the master stopped, restarting, or gone)."""


REDIRECTS = (301, 302, 303, 307, 308)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any) -> None:
        return None


class Rest:
    """Reading is anonymous; a build is asked for once logged in as `user`
    with `password` (Buildbot's session cookie, got at /auth/login)."""

    def __init__(self, url: str, user: str = "", password: str = "",
                 owner: int | None = None, cert: str | None = None) -> None:  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise FarmError(f"not a master's URL: {url!r} (http://HOST:PORT/)")
        self.url = url.rstrip("/") + "/"
        self.user, self.password = user, password
        self.owner = owner  # the uid a master on this machine runs as (default: the caller)
        from nsbuild.farm import listeners

        parts = urllib.parse.urlsplit(self.url)
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FarmError(f"not a master's URL: {printable(url, 100)}") from None
        self.host = parts.hostname or ""
        # On this machine, whoever holds the port is checked before each
        # request: any local user may bind it while the master is down.
        self.local = bool(self.host) and listeners.is_local(self.host)
        self.logged_in = False
        # No redirect is followed: urllib would send the login's
        # Authorization header on to another host; the session cookie is in
        # the first answer.
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                               _NoRedirect()]  # fmt: skip
        if cert is not None:
            # The master's own certificate (farm.tls), pinned: trusted alone.
            if not self.url.startswith("https://"):
                raise FarmError(f"a certificate is for https://, not {printable(url, 80)}")
            from nsbuild.farm.tls import client_context

            handlers.append(urllib.request.HTTPSHandler(context=client_context(cert)))
        self.opener = urllib.request.build_opener(*handlers)

    def login(self) -> None:
        """Log in, for the session cookie every later request carries."""
        if self.logged_in or not self.password:
            return
        self.check_listener()
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(f"{self.url}auth/login",
                                     headers={"Authorization": f"Basic {token}"})  # fmt: skip
        try:
            with self.opener.open(req, timeout=TIMEOUT) as r:
                r.read(ANSWER_LIMIT)  # the UI's page, after the redirect
        except urllib.error.HTTPError as e:
            if e.code not in REDIRECTS:  # /auth/login's answer: to the UI
                raise FarmError(f"the master at {self.url} refused the login: {e.code}") from None
        except (OSError, urllib.error.URLError) as e:
            raise FarmError(f"the master at {self.url} cannot be reached: {e}") from None
        self.logged_in = True

    def check_listener(self) -> None:
        """Before the login: the peer checked (check_peer); to another
        machine, https only."""
        self.check_peer()
        if not self.local and not self.url.startswith("https://"):
            # Basic credentials over plain HTTP are anyone's on the way.
            raise FarmError(f"not sending the web password over plain http to "
                            f"{printable(self.host, 100)}: use https://")

    def check_peer(self) -> None:
        """On this machine, the master's web port must be held by the
        master's user (the caller by default): else nothing is sent to it
        and nothing it says is believed."""
        from nsbuild.farm import listeners

        if self.local and not listeners.check_ours(self.port, f"the master at {self.url}",
                                                   self.owner):  # fmt: skip
            raise Unreachable(f"nothing listens on {self.url}: is the master running?")

    def _open(self, req: urllib.request.Request, timeout: float = TIMEOUT) -> Any:
        self.check_peer()
        try:
            with self.opener.open(req, timeout=timeout) as r:
                data = r.read(ANSWER_LIMIT + 1)
        except urllib.error.HTTPError as e:
            body = e.read(2000).decode(errors="replace")
            raise FarmError(f"the master at {self.url} answered {e.code}: "
                            f"{printable(body.strip(), 300)}") from None  # fmt: skip
        except (OSError, urllib.error.URLError) as e:
            raise Unreachable(f"the master at {self.url} cannot be reached: {e}") from None
        if len(data) > ANSWER_LIMIT:
            raise FarmError(f"the master at {self.url} answered more than {ANSWER_LIMIT} bytes")
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise FarmError(f"the master at {self.url} answered something not JSON") from None

    def get(self, path: str, **params: Any) -> Any:
        """GET api/v2/PATH?params; a list value gives the parameter once per item."""
        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.url}api/v2/{path}" + (f"?{query}" if query else ""))
        return self._open(req)

    def items(self, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """The objects a collection answers (the answer's `key` list)."""
        answer = self.get(path, **params)
        if not isinstance(answer, dict):
            raise FarmError(f"the master at {self.url} answered {printable(path, 100)} "
                            "with no object")  # fmt: skip
        found = answer.get(key)
        return [x for x in found if isinstance(x, dict)] if isinstance(found, list) else []

    def answers(self) -> bool:
        """True if the master's web interface answers now."""
        try:
            self._open(urllib.request.Request(f"{self.url}api/v2/masters"), timeout=2.0)
        except FarmError:
            return False
        return True

    def force(self, scheduler: str, builder: str, **props: str) -> int:
        """Ask the force scheduler for one build on `builder`; its build request's id."""
        self.login()
        body = {"jsonrpc": "2.0", "method": "force", "id": 1,
                "params": {"builderNames": [builder], **props}}  # fmt: skip
        req = urllib.request.Request(
            f"{self.url}api/v2/forceschedulers/{urllib.parse.quote(scheduler)}",
            data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
        )  # fmt: skip
        answer = self._open(req)
        if not isinstance(answer, dict):
            raise FarmError(f"the master at {self.url} answered the build with no object")
        if "error" in answer:
            message = answer["error"].get("message") if isinstance(answer["error"], dict) else ""
            raise FarmError(f"the master refused the build: {printable(str(message), 300)}")
        try:
            requests = answer["result"][1]
            return int(next(iter(requests.values())))
        except (KeyError, IndexError, TypeError, ValueError, StopIteration, AttributeError):
            raise FarmError("the master's answer to a build names no build request") from None
