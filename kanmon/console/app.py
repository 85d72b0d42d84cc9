"""The console's Starlette application: login, pages, and the JSON API under /api/v1.

Role: authenticate every request (a signed session cookie, or `Authorization: Bearer`
with a token from `kanmon admin token`), check the role's permission, check the CSRF
token of every write made with the cookie, and call the operations the CLI calls — the
admin plane's queue and quarantine operations through `node.admin.handle` (the same
dispatch as the control socket, in its worker thread: queue backup, restore and the finish of a move too),
kanmon.records (trace, stats, event search and tail), kanmon.store.users (the functions
`kanmon user` calls) and kanmon.alerts (the test alert) in threads off the event loop. Pages
and API share one function per operation (`_queue_list`, `_act`, ...), so they answer
the same. Every write is an `audit:` line (kanmon.admin.accounts.audit).

Trusts: nothing from the request: ids are checked (is_queue_id), filters validated by
kanmon.admin.filters, text is escaped by Jinja2's autoescape, JSON bodies are bounded.
Only /login, /static/, /api/v1/openapi.json and the quarantine digest's signed links
(/q/TOKEN: the token is the capability, kanmon.quarantine.links) answer without a login.
Never: answer a page or API call without a valid session or token; run a write without
the role's permission and (for a cookie) the CSRF token; put anything inline that the
Content-Security-Policy would have to allow (no inline script or style).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import secrets
import shlex
import shutil
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kanmon.admin.accounts import AUDIT_KIND, ROLES, Account, AccountError, AdminAccounts, audit
from kanmon.admin.filters import STATES, Filters
from kanmon.config import ALERT_CATEGORIES, Config, parse_duration
from kanmon.console import charts, configedit, i18n, transfer
from kanmon.console.openapi import openapi_document
from kanmon.console.security import COOKIE_NAME, Revocations, Session, Sessions, load_secret
from kanmon.escape import for_log, for_terminal
from kanmon.model import is_queue_id
from kanmon.quarantine import links
from kanmon.records.events import BALANCER_KIND, DNSCHECK_KIND
from kanmon.units import format_duration, format_size

HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_PAGE = 500
MAX_JSON = 64 * 1024
LOGIN_COOKIE = "kanmon_login"
MAX_LINK_FORM = 4096  # the confirmation form of a digest link: its token and nothing else
QUEUE_ACTIONS = ("hold", "release", "delete")
CONSOLE_THEN = (None, "hold")  # what a console backup does here once the archive is written
BULK_ACTIONS = ("hold", "release", "delete", "bounce", "flush")
FILTER_PARAMS = ("from", "to", "domain", "older_than", "reason", "subject", "header", "body", "size", "attempts")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
ALERT_TEST_WAIT = 20.0
TAIL_LIMIT = 200  # event lines one poll of the live tail brings at most
CHART_TTL = {"hour": 60.0, "day": 300.0}  # the dashboard charts counted from shared records (PostgreSQL) are kept this long



def _shown(value):
    """Jinja's finalize: text shown with kanmon.escape.for_terminal (block: line ends
    kept); markup the templates made (Markup: it has __html__) and other values as they are."""
    if isinstance(value, str) and not hasattr(value, "__html__"):
        return for_terminal(value.replace("\r\n", "\n"), block=True)
    return value

class Refused(Exception):
    """A request refused with an HTTP status. message is an English template whose
    {names} are filled from args: the API and the logs get it in English, an error page
    in the reader's language (the template translated, then filled)."""

    def __init__(self, status: int, message: str, **args: object):
        self.template = message
        self.args_ = args
        self.message = message.format(**args) if args else message
        super().__init__(self.message)
        self.status = status

    def text(self, gettext) -> str:
        """The message in the language of gettext (English where it has no translation)."""
        if not self.args_:
            return gettext(self.message)
        return gettext(self.template).format(**self.args_)


@dataclass(frozen=True, slots=True)
class Who:
    account: Account
    session: Session | None  # None: a Bearer token
    ip: str

    @property
    def via(self) -> str:
        return "console" if self.session is not None else "api token"


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "-"


def _time(ts) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))


class ConsoleApp:
    """One per console listener; `app` is the ASGI application."""

    def __init__(self, node, config: Config):
        self.node = node
        self.config = config
        self.cfg = config.console
        self.data_dir = Path(config.server.data_dir)
        self.accounts = AdminAccounts(self.data_dir)
        self.sessions = Sessions(load_secret(self.data_dir), self.cfg.session_timeout, self.cfg.session_lifetime)
        # finalize: every {{ value }} that is text, before HTML escaping, has its control
        # characters, bidi overrides and lone surrogates escaped as the CLI shows them
        # (`\x1b`, `\u202e`): autoescape stops markup, not an ESC or a U+202E that turns
        # "gnp.exe" round in the browser. Line ends and tabs stay (message bodies in <pre>).
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                               extensions=["jinja2.ext.i18n"], finalize=_shown)
        self.env.filters["time"] = _time
        self.env.filters["size"] = format_size
        # Logged-out sessions (a copy of the cookie ends too), kept on disk across restarts.
        self.revocations = Revocations(self.data_dir, warn=lambda text: self.emit(text, kind="warning"))
        self._link_secret: bytes | None = None  # the digest links' key, read on first use
        self._chart_cache: dict[str, tuple[float, dict]] = {}  # by -> (when, count): shared records only
        self.app = Starlette(routes=self.routes(),
                             exception_handlers={Exception: self._crashed, HTTPException: self._http_error})
        self.app.add_middleware(_Headers)

    # -- plumbing ----------------------------------------------------------------------------

    def emit(self, text: str, kind: str = "info", **kw) -> None:
        self.node.records.emit(text, kind=kind, **kw)

    async def _crashed(self, request: Request, exc: Exception) -> Response:
        self.emit(f"console: {request.method} {for_log(request.url.path)} failed: {type(exc).__name__}: {exc}",
                  kind="error")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "internal error (see the event log)"}, 500)
        try:
            return await self._error_page(request, None, 500, Refused(500, "internal error (see the event log)"))
        except Exception:  # the page itself failed: the plainest answer
            return HTMLResponse("<h1>500</h1><p>internal error (see the event log)</p>", 500)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route: 404; a method a route does not take:
        405), as the console's other error pages."""
        status = getattr(exc, "status_code", 500)
        headers = getattr(exc, "headers", None)
        if status == 404:
            refused = Refused(404, "no such page")
        elif status == 405:
            refused = Refused(405, "this address does not take this method")
        else:
            refused = Refused(status, "the request was refused")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": refused.message}, status, headers=headers)
        response = await self._error_page(request, None, status, refused)
        response.headers.update(headers or {})
        return response

    async def _error_page(self, request: Request, who: Who | None, status: int, refused: Refused) -> HTMLResponse:
        """An error page in the reader's language: the admin's choice when the request
        carries a good session, else the browser's."""
        if who is None:
            try:
                who, _ = await self.authenticate(request)
            except Exception:
                who = None
        gettext = self.gettext_of(request, who)
        return self.render(request, "error.html", who, status, code=status, text=refused.text(gettext))

    def render(self, request: Request, name: str, who: Who | None, status: int = 200, **ctx) -> HTMLResponse:
        lang = i18n.negotiate(request.headers.get("accept-language"), who.account.lang if who else None)
        gettext, ngettext = i18n.gettext_for(lang)
        template = self.env.get_template(name)
        html = template.render(
            _=gettext, gettext=gettext, ngettext=ngettext, lang=lang, who=who, request=request,
            csrf=self.sessions.csrf_token(who.session) if who and who.session else "",
            can=(lambda perm: who is not None and who.account.can(perm)), path=request.url.path, **ctx)
        return HTMLResponse(html, status)

    def gettext_of(self, request: Request, who: Who | None):
        """gettext in the language of this request's pages."""
        return i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language"),
                                               who.account.lang if who else None))[0]

    def redirect(self, who: Who, path: str, params: dict | None = None, **status: str) -> RedirectResponse:
        """303 to path?params, with status lines (msg=..., error=...) signed for this session:
        the page shows them (status()); a link someone else made shows none."""
        query = dict(params or {})
        for kind, text in status.items():
            if text and who.session is not None:
                query[kind] = text
                query[f"{kind}_sig"] = self.sessions.status_token(who.session, kind, text)
        return RedirectResponse(path + ("?" + urllib.parse.urlencode(query) if query else ""), 303)

    def status(self, request: Request, who: Who, kind: str = "msg") -> str:
        """The status line of the address (see redirect()), if the console wrote it for this
        session; otherwise nothing."""
        text = request.query_params.get(kind, "")
        token = request.query_params.get(f"{kind}_sig")
        if text and who.session is not None and self.sessions.status_ok(who.session, kind, text, token):
            return text
        return ""

    async def call(self, op: str, args: dict) -> dict:
        """An admin-plane operation (kanmon.admin.queue_ops.dispatch, in its worker thread)."""
        reply = await self.node.admin.handle({"op": op, "args": args})
        if not reply.get("ok"):
            error = str(reply.get("error"))
            missing = ("not in the queue", "not in the quarantine", "no such", "No such", "not found")
            raise Refused(404 if any(m in error for m in missing) else 400, error)
        return reply["result"]

    # -- who is asking -------------------------------------------------------------------------

    async def authenticate(self, request: Request) -> tuple[Who | None, str | None]:
        """(who, why not): a Bearer token, else the session cookie."""
        ip = client_ip(request)
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            account = self.accounts.by_token(auth[7:].strip())
            if account is None:
                return None, "bad token"
            return Who(account, None, ip), None
        cookie = request.cookies.get(COOKIE_NAME)
        if not cookie:
            return None, None
        session = self.sessions.decode(cookie)
        account = self.accounts.get(session.name) if session else None
        why = self.sessions.check(session, ip, account.password_version if account else None, time.time())
        if why is None and session is not None and self.revocations.is_revoked(session.sid, session.login):
            why = "logged out"
        if why is not None:
            if why == "session used from another address" and session is not None:
                self.emit(f"console: session of {for_log(session.name)} from {session.ip} refused from {ip}",
                          kind="warning")
            return None, why
        assert account is not None and session is not None
        return Who(account, session, ip), None

    def _set_session(self, response: Response, request: Request, session: Session) -> None:
        response.set_cookie(COOKIE_NAME, self.sessions.encode(session), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")

    def _upload_bound(self) -> int:
        return self.cfg.max_upload + MAX_JSON  # the archive and the form around it

    def guarded(self, handler, perm: str = "read", api: bool = False, max_body: int | None = None):
        """The endpoint: login, permission, the body's size (max_body: checked before
        anything reads it), CSRF (writes with the cookie), then handler."""

        async def endpoint(request: Request) -> Response:
            who: Who | None = None
            try:
                who, why = await self.authenticate(request)
                if who is None:
                    if api:
                        return JSONResponse({"error": "login required" + (f" ({why})" if why else "")}, 401,
                                            headers={"WWW-Authenticate": 'Bearer realm="kanmon"'})
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    if request.headers.get("hx-request"):  # a fragment (a poll): the whole page goes to /login
                        target = urllib.parse.urlsplit(request.headers.get("hx-current-url", "")).path or "/"
                        response = Response(status_code=401, headers={
                            "HX-Redirect": "/login?" + urllib.parse.urlencode({"next": _safe_next(target) or "/"})})
                        if why:
                            response.delete_cookie(COOKIE_NAME, path="/")
                        return response
                    response = RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}), 303)
                    if why:
                        response.delete_cookie(COOKIE_NAME, path="/")
                    return response
                if not who.account.can(perm):
                    raise Refused(403, "the role {role} may not do this", role=who.account.role)
                if max_body is not None and request.method == "POST":
                    length = request.headers.get("content-length")
                    if length is not None and (not length.isdigit() or int(length) > max_body):
                        raise Refused(413, "the upload is larger than {size}", size=format_size(max_body))
                    if length is None and not api:  # a form is read whole: its size must be known first
                        raise Refused(411, "a Content-Length is needed")
                if request.method == "POST" and who.session is not None:
                    token = request.headers.get("x-csrf-token")
                    if token is None and not api:
                        # An upload's form is parsed here first (and kept by Starlette for
                        # the handler): with the upload's own limits, not the defaults.
                        form = (await request.form(max_files=1, max_fields=10) if max_body is not None
                                else await request.form())
                        token = form.get("csrf")
                    if not self.sessions.csrf_ok(who.session, token if isinstance(token, str) else None):
                        raise Refused(403, "CSRF token missing or wrong: reload the page")
                response = await handler(request, who)
                cookies = response.headers.getlist("set-cookie")
                if who.session is not None and not any(c.startswith(COOKIE_NAME + "=") for c in cookies):
                    # The idle timeout counts from this request (logout sets its own).
                    self._set_session(response, request, dataclasses.replace(who.session, seen=time.time()))
                return response
            except Refused as e:
                if api or request.url.path.startswith("/api/"):
                    return JSONResponse({"error": e.message}, e.status)
                return await self._error_page(request, who, e.status, e)

        return endpoint

    def write_audit(self, who: Who, action: str, target: str, outcome: str) -> None:
        audit(self.emit, who.account.name, who.account.role, action, target, source=who.ip, via=who.via,
              outcome=outcome)

    # -- routes --------------------------------------------------------------------------------

    def routes(self) -> list:
        g = self.guarded
        return [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login_post, methods=["POST"]),
            Route("/logout", g(self.logout), methods=["POST"]),
            Route("/", g(self.dashboard)),
            Route("/queue", g(self.queue_page)),
            Route("/queue/act", g(self.queue_bulk, "queue"), methods=["POST"]),
            Route("/queue/backup", g(self.backup_page, "backup")),
            Route("/queue/backup", g(self.backup_download, "backup"), methods=["POST"]),
            Route("/queue/restore", g(self.restore_upload, "backup", max_body=self._upload_bound()), methods=["POST"]),
            Route("/queue/finish", g(self.finish_upload, "backup", max_body=self._upload_bound()), methods=["POST"]),
            Route("/queue/finish/confirm", g(self.finish_confirm, "backup", max_body=self._upload_bound()),
                  methods=["POST"]),
            Route("/queue/{qid}", g(self.message_page)),
            Route("/queue/{qid}/{action}", g(self.message_act, "queue"), methods=["POST"]),
            Route("/trace", g(self.trace_page)),
            Route("/events", g(self.events_page)),
            Route("/events/tail", g(self.events_tail)),
            Route("/alerts", g(self.alerts_page)),
            Route("/alerts/test", g(self.alerts_test, "alerts"), methods=["POST"]),
            Route("/alerts/status/{qid}", g(self.alert_status)),
            Route("/quarantine", g(self.quarantine_page)),
            Route("/quarantine/{qid}", g(self.quarantine_item)),
            Route("/quarantine/{qid}/{action}", g(self.quarantine_act, "quarantine"), methods=["POST"]),
            Route("/maintenance", g(self.maintenance_page)),
            Route("/maintenance/{job}/run", g(self.maintenance_run, "queue"), methods=["POST"]),
            Route("/dns", g(self.dns_page)),
            Route("/users", g(self.users_page)),
            Route("/users/add", g(self.users_add_page, "accounts"), methods=["POST"]),
            Route("/users/alias", g(self.alias_set_page, "accounts"), methods=["POST"]),
            Route("/users/alias/{address}/delete", g(self.alias_delete_page, "accounts"), methods=["POST"]),
            Route("/users/{address}/{action}", g(self.users_act, "accounts"), methods=["POST"]),
            Route("/balancer", g(self.balancer_page)),
            Route("/policies", g(self.policies_page)),
            Route("/balancer/mode", g(self.balancer_mode, "balancer"), methods=["POST"]),
            Route("/config", g(self.config_page, "config")),
            Route("/config/check", g(self.config_check_page, "config"), methods=["POST"]),
            Route("/config/apply", g(self.config_apply_page, "config"), methods=["POST"]),
            Route("/config/history/{name}", g(self.config_version_page, "config")),
            Route("/settings", g(self.settings_page)),
            Route("/settings", g(self.settings_post), methods=["POST"]),
            Route("/api/v1/openapi.json", self.openapi),
            Route("/q/{token}", self.link_page, methods=["GET"]),
            Route("/q/{token}", self.link_post, methods=["POST"]),
            Route("/api/v1/me", g(self.api_me, api=True)),
            Route("/api/v1/queue", g(self.api_queue, api=True)),
            Route("/api/v1/queue/backup", g(self.api_backup, "backup", api=True), methods=["POST"]),
            Route("/api/v1/queue/restore", g(self.api_restore, "backup", api=True, max_body=self._upload_bound()),
                  methods=["POST"]),
            Route("/api/v1/queue/finish", g(self.api_finish, "backup", api=True, max_body=self._upload_bound()),
                  methods=["POST"]),
            Route("/api/v1/queue/{qid}", g(self.api_message, api=True)),
            Route("/api/v1/queue/{qid}/{action}", g(self.api_message_act, "queue", api=True), methods=["POST"]),
            Route("/api/v1/trace", g(self.api_trace, api=True)),
            Route("/api/v1/events", g(self.api_events, api=True)),
            Route("/api/v1/events/tail", g(self.api_events_tail, api=True)),
            Route("/api/v1/stats", g(self.api_stats, api=True)),
            Route("/api/v1/alerts", g(self.api_alerts, api=True)),
            Route("/api/v1/alerts/test", g(self.api_alerts_test, "alerts", api=True), methods=["POST"]),
            Route("/api/v1/maintenance", g(self.api_maintenance, api=True)),
            Route("/api/v1/maintenance/{job}/run", g(self.api_maintenance_run, "queue", api=True), methods=["POST"]),
            Route("/api/v1/config", g(self.api_config, "config", api=True)),
            Route("/api/v1/config/check", g(self.api_config_check, "config", api=True), methods=["POST"]),
            Route("/api/v1/config/apply", g(self.api_config_apply, "config", api=True), methods=["POST"]),
            Route("/api/v1/config/history/{name}", g(self.api_config_version, "config", api=True)),
            Route("/api/v1/balancer", g(self.api_balancer, api=True)),
            Route("/api/v1/policies", g(self.api_policies, api=True)),
            Route("/api/v1/balancer/mode", g(self.api_balancer_mode, "balancer", api=True), methods=["POST"]),
            Route("/api/v1/dns", g(self.api_dns, api=True)),
            Route("/api/v1/users", g(self.api_users, api=True)),
            Route("/api/v1/users/mailboxes", g(self.api_user_add, "accounts", api=True), methods=["POST"]),
            Route("/api/v1/users/aliases", g(self.api_alias_set, "accounts", api=True), methods=["POST"]),
            Route("/api/v1/users/aliases/{address}/{action}", g(self.api_alias_delete, "accounts", api=True),
                  methods=["POST"]),
            Route("/api/v1/users/{address}/{action}", g(self.api_users_act, "accounts", api=True), methods=["POST"]),
            Route("/api/v1/dns/check", g(self.api_dns_check, api=True)),
            Route("/api/v1/quarantine", g(self.api_quarantine, api=True)),
            Route("/api/v1/quarantine/{qid}", g(self.api_quarantine_item, api=True)),
            Route("/api/v1/quarantine/{qid}/{action}", g(self.api_quarantine_act, "quarantine", api=True),
                  methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # -- login ---------------------------------------------------------------------------------

    def _login_token(self, nonce: str) -> str:
        return self.sessions.csrf_token(Session("", "login:" + nonce, "", 0, 0, ""))

    async def login_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(16)
        response = self.render(request, "login.html", None, status, error=error, login_csrf=self._login_token(nonce),
                               next=_safe_next(request.query_params.get("next")))
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/login")
        return response

    async def login_post(self, request: Request) -> Response:
        form = await request.form()
        ip = client_ip(request)
        name = str(form.get("username") or "")[:64]
        password = str(form.get("password") or "")
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        gettext, _ = i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language")))
        if not nonce or not self.sessions.csrf_ok(Session("", "login:" + nonce, "", 0, 0, ""), form.get("csrf")):
            return await self.login_page(request, gettext("The form expired: please log in again."), 403)
        throttle = self.node.throttle
        key = "console " + name
        wait = await asyncio.to_thread(throttle.reserve, ip, key)
        if wait > 0:
            self.emit(f"console: login of {for_log(name)} from {ip} refused: too many failures", kind="warning")
            return await self.login_page(request, gettext("Too many failed logins: try again later."), 429)
        account = await asyncio.to_thread(self.accounts.verify, name, password)
        if account is None or not await asyncio.to_thread(throttle.succeeded, ip, key):
            if account is None:
                failure = await asyncio.to_thread(throttle.failed, ip, key)
                self.emit(f"console: login failed for {for_log(name)} from {ip}", kind="warning")
                await asyncio.sleep(failure.delay)
            return await self.login_page(request, gettext("Wrong name or password."), 401)
        session = self.sessions.new(account.name, ip, account.password_version, time.time())
        self.emit(f"console: {account.name} ({account.role}) logged in from {ip}")
        response = RedirectResponse(_safe_next(str(form.get("next") or "")) or "/", 303)
        self._set_session(response, request, session)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    # -- the digest's signed links (no login: the token is the capability) --------------

    async def link_page(self, request: Request) -> Response:
        """GET never acts (scanners and previews fetch links): the message and a form."""
        return await self._link(request, act=False)

    async def link_post(self, request: Request) -> Response:
        return await self._link(request, act=True)

    async def _link(self, request: Request, act: bool) -> Response:
        ip = client_ip(request)
        gettext, _ = i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language")))
        token = request.path_params["token"]

        def page(status: int, title: str, text: str, **ctx) -> Response:
            return self.render(request, "quarantine_link.html", None, status, title=title, text=text, token=token, **ctx)

        throttle = self.node.throttle
        if await asyncio.to_thread(throttle.blocked_for, ip) > 0:
            return page(429, gettext("Too many attempts"), gettext("Too many invalid links from your address: try again later."))
        if self._link_secret is None:
            self._link_secret = await asyncio.to_thread(links.load_secret, self.data_dir)
        try:
            link = links.verify(self._link_secret, token, self.node.clock.now())  # the clock the digest signed with
        except links.LinkError as e:
            # Counted like a failed login: guessing tokens blocks the address as guessing passwords does.
            await asyncio.to_thread(throttle.failed, ip, None, False)
            self.emit(f"console: quarantine link refused from {ip}: {e.reason}", kind="warning")
            if e.reason == "expired":
                return page(410, gettext("Link expired"), gettext("This link has expired: the message is no longer kept."))
            return page(403, gettext("Invalid link"), gettext("This link is not valid. Copy the whole link from the digest."))
        if act:
            length = request.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > MAX_LINK_FORM:
                return page(413, gettext("Invalid link"), gettext("The form is not the one this page sent."))
            form = await request.form()
            sent = form.get("token")
            if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), token.encode()):
                return page(403, gettext("Invalid link"), gettext("The form is not the one this page sent."))
        gone = (404, gettext("Message gone"),
                gettext("This message is no longer in the quarantine for you: it was already released or deleted, "
                        "or its retention ended."))
        try:
            item = await self.call("quarantine_show", {"id": link.qid, "lines": 0})
        except Refused:
            item = None
        if item is None or "corrupt" in item or link.rcpt.lower() not in {r.lower() for r in item.get("rcpts", [])}:
            return page(*gone)
        if not act:
            return page(200, gettext("Release message") if link.action == "release" else gettext("Delete message"),
                        "", item=item, link=link)
        op, key = ("quarantine_release_for", "released") if link.action == "release" else ("quarantine_delete_for", "deleted")
        try:
            result = await self.call(op, {"id": link.qid, "rcpt": link.rcpt, "by": link.rcpt})
        except Refused as e:
            result = {key: [], "errors": [e.message]}
        done = bool(result.get(key))
        audit(self.emit, link.rcpt, "recipient", f"quarantine {link.action}", link.qid, source=ip, via="digest link",
              outcome="ok" if done else "; ".join(result.get("errors") or ["not done"]))
        if not done:
            return page(*gone)
        if link.action == "release":
            return page(200, gettext("Message released"), gettext("The message was released: it is on its way to your mailbox."))
        return page(200, gettext("Message deleted"), gettext("The message was deleted."))

    async def logout(self, request: Request, who: Who) -> Response:
        if who.session is not None:  # a copy of the cookie kept elsewhere ends too, also after a restart
            await asyncio.to_thread(self.revocations.revoke, who.session.sid,
                                    who.session.login + self.cfg.session_lifetime)
            self.emit(f"console: {who.account.name} logged out from {who.ip}")
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    # -- shared operations: one function per operation for pages and API -------------------------

    def _filters(self, params) -> dict:
        criteria = {("mail_from" if k == "from" else k): params.get(k) for k in FILTER_PARAMS if params.get(k)}
        state = params.get("state") or "all"
        try:
            return Filters(state=state, **criteria).to_json()
        except ValueError as e:
            raise Refused(400, str(e)) from None

    async def _queue_list(self, params, offset: int | None, limit: int | None) -> dict:
        args: dict = {"filters": self._filters(params)}
        if offset is not None or limit is not None:
            args.update(offset=offset or 0, limit=limit)
        return await self.call("list", args)

    async def _act(self, who: Who, action: str, ids: list[str] | None, filters: dict | None, dry_run: bool = False) -> dict:
        if ids is not None:
            bad = [i for i in ids if not is_queue_id(i)]
            if bad or not ids:
                if not bad:
                    raise Refused(400, "no message selected")
                raise Refused(400, "not a queue id: {ids}", ids=", ".join(for_log(b[:40]) for b in bad[:3]))
            filters = {"ids": ids, "state": "all"}
        source = f"console {who.account.name}"
        result = await self.call("act", {"action": action, "filters": filters, "dry_run": dry_run, "source": source})
        if not dry_run:
            target = " ".join(ids[:20]) if ids else Filters.from_json(filters).describe()
            self.write_audit(who, f"queue {action}", target, f"{len(result['acted'])} of {result['matched']} done")
        return result

    def _selection(self, ids: list[str], filters: dict | None) -> tuple[dict, str]:
        """The filters of a selection (checked ids, else the filter) and how an audit line
        names it."""
        if ids:
            bad = [i for i in ids if not is_queue_id(i)]
            if bad:
                raise Refused(400, "not a queue id: {ids}", ids=", ".join(for_log(b[:40]) for b in bad[:3]))
            return {"ids": ids, "state": "all"}, " ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")
        filters = filters or {"state": "all"}
        return filters, Filters.from_json(filters).describe() or "the whole queue"

    async def _backup(self, who: Who, ids: list[str], filters: dict | None, then: str | None = None) -> tuple[Path, dict]:
        """The selected messages written by the node into a queue backup archive (the
        format of `kanmon queue backup`), in the transfer directory; the caller sends it
        and removes it. then="hold" holds here exactly the messages written into it, once
        it is complete on the node's disk (`kanmon queue backup --then hold`); None (the
        default, as the command's) leaves them queued. Never "delete": the archive is only
        on its way to the browser (the finish step deletes them, docs/console.md)."""
        if then not in CONSOLE_THEN:  # never "delete": see docs/console.md
            raise Refused(400, "then is keep (leave them queued here) or hold (hold them here): {then} is not",
                          then=repr(for_log(str(then)[:40])))
        filters, target = self._selection(ids, filters)
        path = await asyncio.to_thread(transfer.new_path, self.data_dir, "backup")
        # Recorded in the archive: the restore names this file in the command that finishes the move here.
        origin_config = str(Path(self.node.config_source).resolve()) if self.node.config_source else None
        try:
            result = await self.call("backup", {"path": str(path), "filters": filters, "then": then,
                                                "origin_config": origin_config,
                                                "source": f"console {who.account.name}"})
        except Refused as e:
            path.unlink(missing_ok=True)
            self.write_audit(who, "queue backup", target, f"failed: {e.message}")
            raise
        held = f", {len(result.get('acted') or [])} held here" if then == "hold" else ""
        self.write_audit(who, "queue backup", target, f"{result['count']} message(s) downloaded{held}")
        return path, result

    def _archive_response(self, path: Path, result: dict) -> Response:
        name = f"kanmon-queue-{self.config.server.hostname}-{time.strftime('%Y%m%d-%H%M%S')}.tar"
        headers = {"X-Kanmon-Count": str(result["count"])}
        if result.get("then") == "hold":
            headers["X-Kanmon-Held"] = str(len(result.get("acted") or []))
        return FileResponse(path, media_type="application/x-tar", filename=name, headers=headers,
                            background=BackgroundTask(path.unlink, missing_ok=True))

    async def _upload_call(self, who: Who, chunks, name: str, kind: str, audit: str, failed: str,
                           op: str, params: dict) -> tuple[dict, int]:
        """An uploaded archive received whole into the transfer directory (max_upload), then
        the admin operation `op` on it; (its result, the size). Refusals are audited as
        `audit` ("<failed>: why") and answered 413/400 naming the upload, not our path."""
        path = await asyncio.to_thread(transfer.new_path, self.data_dir, kind)
        target = for_log(name[:200]) or "upload"
        try:
            try:
                size = await transfer.receive(chunks, path, self.cfg.max_upload)
            except transfer.TooLarge:
                self.write_audit(who, audit, target, "refused: larger than max_upload")
                raise Refused(413, "the upload is larger than {size} ([console] max_upload)",
                              size=format_size(self.cfg.max_upload)) from None
            try:
                result = await self.call(op, {"path": str(path), **params})
            except Refused as e:
                self.write_audit(who, audit, target, f"{failed}: {e.message}")
                raise Refused(400, e.message.replace(str(path), name or "the upload")) from None
        finally:
            path.unlink(missing_ok=True)
        return result, size

    async def _restore(self, who: Who, chunks, name: str, hold: bool) -> dict:
        """An uploaded archive into the queue, as `kanmon queue restore` does (verified whole
        first; a message already here, or restored here before, is skipped)."""
        target = for_log(name[:200]) or "upload"
        result, size = await self._upload_call(who, chunks, name, "restore", "queue restore", "failed", "restore",
                                               {"hold": hold, "source": f"console {who.account.name}"})
        result = {**result, "path": name, "size": size}
        if result.get("finish_command"):
            # An archive downloaded from a console was written in that node's transfer
            # directory and removed once sent: the command names the file the admin has.
            result["finish_command"] = re.sub(r"\S*/console/transfer/backup-\d+-[0-9a-f]{16}\.tar",
                                              lambda _m: shlex.quote(name or "ARCHIVE.tar"), result["finish_command"])
        self.write_audit(who, "queue restore", target,
                         f"{len(result['restored'])} restored, {len(result['skipped'])} already here, "
                         f"{result['in_archive']} in the archive" + (" (held)" if hold else ""))
        return result

    async def _finish_check(self, who: Who, chunks, name: str) -> dict:
        """An uploaded archive on the node it came from: its messages still queued here,
        which the finish step of the move deletes (QueueOps.finish_check; refused on the
        node the queue moved to). Changes nothing."""
        result, size = await self._upload_call(who, chunks, name, "finish", "queue finish move", "refused",
                                               "finish_check", {})
        return {**result, "path": name, "size": size}

    async def _finish_delete(self, who: Who, ids: list[str], name: str) -> dict:
        """The finish step of a move: delete here the messages of its archive (ids as the
        check found them), as `kanmon queue delete --ids-from ARCHIVE` does."""
        target = for_log(name[:200]) or "upload"
        if not ids:
            return {"deleted": [], "skipped": []}
        filters, _ = self._selection(ids, None)
        result = await self.call("act", {"action": "delete", "filters": filters,
                                         "source": f"console {who.account.name}: finish move {target}"})
        self.write_audit(who, "queue finish move", target,
                         f"{len(result['acted'])} deleted here, {len(result['skipped'])} gone meanwhile")
        return {"deleted": result["acted"], "skipped": result["skipped"]}

    async def _alert_test(self, who: Who, category: str, to: str = "") -> dict:
        """to: one mailbox instead of [alerts] to ("": those), as `kanmon alert test --to`."""
        from kanmon.alerts import is_test_address, request_test_alert  # noqa: PLC0415

        if category not in ALERT_CATEGORIES:
            raise Refused(400, "category must be one of {names}", names=", ".join(ALERT_CATEGORIES))
        to = to.strip()
        if to and not is_test_address(to):
            raise Refused(400, "send the test to one mailbox, local@domain")
        outcome = await asyncio.to_thread(request_test_alert, self.data_dir, category, ALERT_TEST_WAIT, to)
        qid = outcome.rpartition("(queue id ")[2].rstrip(")") if outcome and "(queue id " in outcome else None
        self.write_audit(who, "alert test", category + (f" to {for_log(to)}" if to else ""),
                         "no answer" if outcome is None else ("queued " + qid if qid else "not mailed"))
        return {"category": category, "to": to, "outcome": outcome or "no answer from the alerts within "
                f"{ALERT_TEST_WAIT:.0f} s", "queue_id": qid}

    async def _records(self, shared: Callable[[], Any] | None, local: Callable[[], Any]) -> Any:
        """With [records] url, every node's records from PostgreSQL (as `kanmon trace`,
        `log` and `stats` read them); when the database does not answer, or without it,
        this node's own."""
        if shared is not None and self.config.records.url:
            try:
                return await asyncio.to_thread(shared)
            except Exception as e:  # noqa: BLE001 - the shared records do not answer: this node's own
                self.emit(f"console: shared records do not answer ({type(e).__name__}); showing this node's own",
                          kind="warning")
        return await asyncio.to_thread(local)

    async def _trace(self, q: str, since: float | None) -> list[dict]:
        from kanmon.records import pgquery  # noqa: PLC0415
        from kanmon.records.trace import trace  # noqa: PLC0415

        timelines = await self._records(lambda: pgquery.trace(self.config.records, q, since),
                                        lambda: trace(self.data_dir, q, since))
        return [t.as_dict() for t in timelines]

    async def _events(self, grep: str | None, since: float | None, limit: int, shared: bool = True,
                      kinds: tuple[str, ...] = ()) -> list[dict]:
        """Event lines; shared=False: this node's own (its DNS check's and balancer's history);
        kinds: only lines of these kinds (this node's own, by the events(kind, ts) index)."""
        from kanmon.records import pgquery  # noqa: PLC0415
        from kanmon.records.query import search_events  # noqa: PLC0415

        rows = await self._records(
            (lambda: pgquery.search_events(self.config.records, since=since, grep=grep or None, limit=limit))
            if shared and not kinds else None,
            lambda: search_events(self.data_dir, since=since, grep=grep or None, limit=limit, kinds=kinds))
        return [r.as_dict() for r in rows]

    async def _tail(self, after: int | None, grep: str | None) -> dict:
        """Event lines after line number `after` (None: none; where a tail starts now)."""
        from kanmon.records.query import tail_events  # noqa: PLC0415

        cursor, rows = await asyncio.to_thread(tail_events, self.data_dir, after, grep=grep, limit=TAIL_LIMIT)
        return {"next": cursor, "events": [r.as_dict() for r in rows]}

    async def _stats(self, by: str, since: float, top: int = 5) -> dict:
        from kanmon.records import pgquery  # noqa: PLC0415
        from kanmon.records.stats import collect  # noqa: PLC0415

        report = await self._records(lambda: pgquery.collect(self.config.records, since, None, by, top),
                                     lambda: collect(self.data_dir, since, None, by, top))
        return report.as_dict()

    async def _chart_stats(self, by: str, now: float) -> dict:
        """The dashboard's charts, 24 hours by hour and 30 days by day: the buckets only,
        counted on each visit from this node's records (their counts per quarter hour,
        history_slots: milliseconds). Every node's records in PostgreSQL ([records] url)
        have no such counts: there the count is a GROUP BY over the period's rows of every
        node, kept CHART_TTL[by] seconds."""
        since = now - (24 * 3600 if by == "hour" else 30 * 86400)
        if not self.config.records.url:
            return await self._stats(by, since, top=0)
        cached = self._chart_cache.get(by)
        if cached is not None and 0 <= now - cached[0] < CHART_TTL[by]:
            return cached[1]
        stats = await self._stats(by, since, top=0)
        self._chart_cache[by] = (now, stats)
        return stats

    async def _alerts(self, since: float) -> dict:
        from kanmon.alerts import read_alerts  # noqa: PLC0415

        from kanmon.alerts import recent_alerts  # noqa: PLC0415

        try:  # every node's with [records] url, each with its node; else this node's own
            recent, active = await asyncio.to_thread(read_alerts, self.config, since)
        except Exception:  # noqa: BLE001 - the shared records do not answer: this node's own
            recent, active = await asyncio.to_thread(recent_alerts, self.data_dir, since)
        return {"active": [dataclasses.asdict(a) for a in active], "recent": [dataclasses.asdict(a) for a in recent]}

    async def _quarantine_act(self, who: Who, qid: str, action: str) -> dict:
        if action not in ("release", "delete"):
            raise Refused(404, "no such action")
        by = f"console {who.account.name}"
        result = await self.call(f"quarantine_{action}", {"ids": [qid], "by": by})
        done = result.get("released" if action == "release" else "deleted") or []
        self.write_audit(who, f"quarantine {action}", qid, "ok" if done else "; ".join(result.get("errors") or ["not done"]))
        if not done:
            raise Refused(404, "; ".join(result.get("errors") or ["not in the quarantine"]))
        return result

    async def _maintenance(self) -> dict:
        """The [[maintenance]] jobs as `kanmon maintenance list --json`: schedule, filter,
        last run and its result, next run."""
        return await self.call("maintenance_list", {})

    async def _maintenance_run(self, who: Who, job: str, dry_run: bool) -> dict:
        """Run a job now, as `kanmon maintenance run JOB` (the run log records it as run
        `by` this admin); a dry run changes nothing and is not audited."""
        names = [j["name"] for j in (await self._maintenance())["jobs"]]
        if job not in names:
            raise Refused(404, "no maintenance job {job}", job=repr(job))
        try:
            result = await self.call("maintenance_run", {"job": job, "dry_run": dry_run, "by": f"console {who.account.name}"})
        except Refused as e:
            if not dry_run:
                self.write_audit(who, "maintenance run", job, "failed: " + e.message)
            raise
        if not dry_run:
            self.write_audit(who, "maintenance run", job,
                             f"{result['action']} matched {result['matched']}, acted on {len(result['acted'])}")
        return result

    async def _dns_check(self) -> list[dict]:
        """`kanmon dns check --json` for our domains ([dnscheck] domains, else every
        [[domain]]), with the config's [dns] servers, in a thread (DNS lookups block)."""
        from kanmon.dnscheck.checks import check_domain  # noqa: PLC0415
        from kanmon.dnscheck.report import report_dict  # noqa: PLC0415
        from kanmon.dnscheck.sources import SourceError  # noqa: PLC0415
        from kanmon.dnscheck.targets import TargetError, make_source, make_targets  # noqa: PLC0415

        def run() -> list[dict]:
            source = make_source(self.config)
            return [report_dict(check_domain(source, t)) for t in make_targets(self.config)]

        try:
            return await asyncio.to_thread(run)
        except (SourceError, TargetError) as e:
            raise Refused(400, "cannot run the DNS check: {error}", error=str(e)) from None

    async def _dns_last(self) -> dict:
        """The periodic check's last round ([dnscheck] every) and its event lines of 30 days."""
        from kanmon.dnscheck.report import report_dict  # noqa: PLC0415

        monitor = getattr(self.node, "dns_monitor", None)
        history = await self._events(None, time.time() - 30 * 86400, 200, shared=False, kinds=(DNSCHECK_KIND,))
        return {"every": self.config.dnscheck.every or None,
                "last_run": monitor.last_run if monitor is not None else None,
                "reports": [report_dict(r) for r in monitor.last_reports] if monitor is not None else [],
                "history": history}

    def _config_path(self) -> Path:
        if not self.node.config_source:
            raise Refused(400, "the node runs on the embedded default configuration: there is no file to edit "
                               "(start it with -c FILE)")
        return Path(self.node.config_source)

    async def _config(self) -> dict:
        """The config file, how it differs from the running config, the kept versions."""
        path = self._config_path()
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Refused(400, "cannot read {path}: {error}", path=str(path), error=str(e)) from None
        running = self.node.config_text or ""
        return {"path": str(path), "text": text, "digest": configedit.digest(text),
                "running_differs": text != running,
                "diff": configedit.diff(running, text, "running", str(path)),
                "history": await asyncio.to_thread(configedit.history, self.data_dir)}

    async def _config_check(self, text: str) -> dict:
        """`kanmon config check` of a text, and its diff against the running config."""
        ours = set(getattr(getattr(self.node, "listen", None), "held", ()) or ())
        result = await asyncio.to_thread(configedit.check_text, text, ours)
        result["diff"] = configedit.diff(self.node.config_text or "", text, "running", "edited")
        return result

    async def _config_apply(self, who: Who, text: str, base: str | None) -> dict:
        """Check, write the file whole, reload as `kanmon reload` does, keep the version.
        A reload the node refuses puts the previous file back (the old config serves on)."""
        path = self._config_path()
        checked = await self._config_check(text)
        if not checked["usable"]:
            self.write_audit(who, "config apply", str(path), "refused by config check")
            raise Refused(400, "config check found errors: {errors}", errors="; ".join(
                f"{f['key']}: {f['text']}" for f in checked["findings"] if f["severity"] == "error"))
        previous = await asyncio.to_thread(path.read_text, encoding="utf-8")
        if base is not None and base != configedit.digest(previous):
            raise Refused(409, "{path} changed since you opened it: reload the page", path=str(path))
        try:
            await asyncio.to_thread(configedit.write_whole, path, text)
        except OSError as e:
            self.write_audit(who, "config apply", str(path), f"cannot write: {e.strerror or e}")
            raise Refused(400, "cannot write {path}: {error}", path=str(path), error=str(e.strerror or e)) from None
        reply = await self.node.admin.handle({"op": "reload"})
        if not reply.get("ok"):
            await asyncio.to_thread(configedit.write_whole, path, previous)
            self.write_audit(who, "config apply", str(path), f"reload refused: {reply.get('error')}")
            raise Refused(400, "the reload was refused, the previous file is back: {error}",
                          error=str(reply.get("error")))
        if not await asyncio.to_thread(configedit.history, self.data_dir):
            await asyncio.to_thread(configedit.save_version, self.data_dir, previous, "before-console")
        version = await asyncio.to_thread(configedit.save_version, self.data_dir, text, who.account.name)
        changed = reply["result"].get("changed") or []
        self.write_audit(who, "config apply", str(path), "reloaded: " + (", ".join(changed) or "nothing changed"))
        return {"applied": True, "version": version, "changed": changed, "findings": checked["findings"]}

    async def _balancer(self) -> dict:
        """The balancer's status document (the one `kanmon balance status --json` reads
        from its file, taken live) and its event lines of 30 days (failover, failback,
        a real server down or up)."""
        balancer = getattr(self.node, "balancer", None)
        if balancer is None:
            return {"status": None, "problem": "no [balancer] is configured on this node", "history": []}
        since = time.time() - 30 * 86400
        # Its own lines, and the administrators' audit lines of their `balancer MODE` writes.
        own, audited = await asyncio.gather(self._events(None, since, 200, shared=False, kinds=(BALANCER_KIND,)),
                                            self._events("balancer ", since, 200, shared=False, kinds=(AUDIT_KIND,)))
        history = sorted(own + audited, key=lambda e: e["ts"])[-200:]
        return {"status": balancer.status(), "problem": None, "history": history}

    def _policies(self) -> dict:
        """The policies and profiles of the running config, read only: [[ip_policy]] and
        [[recipient_policy]] in the order they match, every session profile resolved
        (built-in, then [smtp], then its [[session_profile]] block), the [[content_profile]]
        rules, recipient verification of the relay domains, the DNS blocklists."""
        cfg = self.config
        rule_fields = {"name", "match", "action", "log_only", "tag", "add_header", "score", "reply", "address"}
        return {
            "ip_policy": [p.model_dump(mode="json") for p in cfg.ip_policy],
            "recipient_policy": [p.model_dump(mode="json") for p in cfg.recipient_policy],
            "session_profiles": {name: prof.model_dump(mode="json", exclude={"name"})
                                 for name, prof in cfg.session_profiles.items()},
            "content_profiles": [{
                **c.model_dump(mode="json", exclude={"rule"}),
                "rules": [{**r.model_dump(mode="json", include=rule_fields),
                           "conditions": r.model_dump(mode="json", exclude=rule_fields, exclude_none=True)}
                          for r in c.rule]} for c in cfg.content_profile],
            "recipient_verification": [{
                "domain": d.name, "deliver": d.deliver,
                "verify": "mailboxes" if d.deliver == "local" else d.verify,
                "verify_unreachable": d.verify_unreachable if d.verify == "callout" else None,
                "recipients_file": str(d.recipients_file) if d.recipients_file else None,
                "verify_positive_ttl": d.verify_positive_ttl if d.verify == "callout" else None,
                "verify_negative_ttl": d.verify_negative_ttl if d.verify == "callout" else None,
            } for d in cfg.domain],
            "dnsbl": [z.model_dump(mode="json") for z in cfg.dnsbl],
            "dnsbl_allowlist": [str(n) for n in cfg.dnsbl_allowlist.networks],
        }
    async def _balancer_set(self, who: Who, virtual: object, real: object, mode: object) -> dict:
        """Set a real server to disabled (drain), standby or enabled, as `kanmon balance
        set` does (the same node operation); audited whatever the outcome."""
        from kanmon.admin.service import balance_set_request  # noqa: PLC0415
        from kanmon.balancer.pool import ADMIN_MODES  # noqa: PLC0415

        if not all(isinstance(x, str) and x for x in (virtual, real, mode)) or mode not in ADMIN_MODES:
            raise Refused(400, "virtual, real and mode ({modes}) are needed", modes=", ".join(ADMIN_MODES))
        assert isinstance(virtual, str) and isinstance(real, str) and isinstance(mode, str)
        target = f"{virtual} {real}"
        reply = balance_set_request(getattr(self.node, "balancer", None), {
            "virtual": virtual, "real": real, "mode": mode, "by": f"{who.account.name} (console, {who.ip})"})
        if not reply.get("ok"):
            error = str(reply.get("error"))
            self.write_audit(who, f"balancer {mode}", target, "refused: " + error)
            raise Refused(404 if error.startswith(("no virtual server", "virtual server")) else 400, error)
        result = reply["result"]
        self.write_audit(who, f"balancer {mode}", target, ("now " if result["changed"] else "already ") + result["mode"])
        return result

    def _users_store(self):
        from kanmon.store.users import Users  # noqa: PLC0415

        return Users(self.config)

    async def _users(self) -> dict:
        """Mailboxes as `kanmon user list --json` (with the domain's quota), aliases, and
        the domains with their routing."""

        def collect() -> dict:
            users = self._users_store()
            mailboxes = []
            for i in users.list():
                quota = users.quota(i.address)
                mailboxes.append({"mailbox": i.address, "has_password": i.has_password, "locked": i.locked,
                                  "size": i.size, "messages": i.messages, "last_login": i.last_login,
                                  "last_ip": i.last_ip, "quota": quota,
                                  "used_percent": round(100 * i.size / quota, 1) if quota else None,
                                  "source": "config" if users.in_config(i.address) else "file"})
            aliases = {a: list(t) for a, t in sorted(users.aliases().items())}
            alias_source = {a: "config" if users.in_config(a) else "file" for a in aliases}
            domains = [{"name": d.name, "deliver": d.deliver, "servers": [f"{h}:{p}" for h, p in d.servers],
                        "tls": d.tls if d.deliver == "relay" else None, "quota": d.quota,
                        "mailboxes": sum(1 for m in mailboxes if m["mailbox"].endswith("@" + d.name))}
                       for d in self.config.domain]
            return {"mailboxes": mailboxes, "aliases": aliases, "alias_source": alias_source, "domains": domains}

        return await asyncio.to_thread(collect)

    async def _user_change(self, who: Who, action: str, target: str, change) -> None:
        """Run one change of the users file or the accounts table (a function of the Users
        store that `kanmon user` calls too) in a thread; audited, passwords never logged."""
        from kanmon.store.users import UnknownMailbox  # noqa: PLC0415

        try:
            await asyncio.to_thread(change, self._users_store())
        except UnknownMailbox as e:
            self.write_audit(who, action, target, f"failed: {e}")
            raise Refused(404, "{error}; nothing changed", error=str(e)) from None
        except (ValueError, OSError) as e:
            self.write_audit(who, action, target, f"failed: {e}")
            raise Refused(400, "{error}; nothing changed", error=str(e)) from None
        self.write_audit(who, action, target, "ok")

    async def _user_add(self, who: Who, address: str, password: str | None) -> dict:
        """A new mailbox in the users file (`kanmon user add`; no password: it cannot log
        in until one is set)."""
        address = _address(address)
        if password == "":
            password = None
        await self._user_change(who, "user add", address, lambda users: users.add(address, password))
        return {"mailbox": address, "action": "add", "done": True}

    async def _alias_set(self, who: Who, alias: str, targets: list[str]) -> dict:
        """Define or replace an alias of the users file (`kanmon user alias ADDRESS TARGETS`)."""
        alias = _address(alias)
        clean = [t for t in (_address(t) for t in targets) if t]
        if not clean:
            raise Refused(400, "an alias needs at least one target address; nothing changed")
        await self._user_change(who, "alias set", f"{alias} -> {', '.join(clean)}",
                                lambda users: users.set_alias(alias, clean))
        return {"alias": alias, "targets": clean, "action": "set", "done": True}

    async def _alias_delete(self, who: Who, alias: str) -> dict:
        """Remove an alias of the users file (`kanmon user alias ADDRESS --delete`)."""
        alias = _address(alias)
        await self._user_change(who, "alias delete", alias, lambda users: users.set_alias(alias, []))
        return {"alias": alias, "action": "delete", "done": True}

    async def _user_act(self, who: Who, address: str, action: str, password: str | None = None) -> dict:
        """lock, unlock (`kanmon user lock|unlock`: logins refused, mail still delivered),
        password (`kanmon user passwd`) or delete (`kanmon user del`: the mailbox leaves the
        users file, its Maildir stays); audited, the password never logged."""
        from kanmon.store.users import UnknownMailbox  # noqa: PLC0415

        if action == "delete":
            address = _address(address)
            await self._user_change(who, "user delete", address, lambda users: users.delete(address))
            return {"mailbox": address, "action": action, "done": True}
        if action not in ("lock", "unlock", "password"):
            raise Refused(404, "no such action")
        users = self._users_store()
        address = address.strip().lower()
        if not await asyncio.to_thread(users.is_mailbox, address):
            raise Refused(404, "{address} is not a mailbox of a local domain", address=for_log(address))
        try:
            if action == "password":
                if not password:
                    raise Refused(400, "the password is empty; nothing changed")
                await asyncio.to_thread(users.set_password, address, password)
            else:
                await asyncio.to_thread(users.set_locked, address, action == "lock")
        except (ValueError, UnknownMailbox, OSError) as e:
            self.write_audit(who, f"user {action}", address, f"failed: {e}")
            raise Refused(400, "{error}; nothing changed", error=str(e)) from None
        self.write_audit(who, f"user {action}", address, "ok")
        return {"mailbox": address, "action": action, "done": True}

    # -- pages ---------------------------------------------------------------------------------------

    async def dashboard(self, request: Request, who: Who) -> Response:
        now = time.time()
        hourly, daily, queue, alerts = await asyncio.gather(
            self._chart_stats("hour", now), self._chart_stats("day", now),
            self._queue_list({}, 0, 1), self._alerts(now - 30 * 86400))
        jobs = await self.node.admin.maintenance_status()
        gettext, _ = i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language"), who.account.lang))
        legend = {s: gettext(s) for s in charts.SERIES}

        def chart(stats: dict, step: int, fmt: str, title: str) -> str:
            by_start = {int(b["start"]) // step: b for b in stats["buckets"]}
            first = int(stats["since"]) // step + 1
            last = int(stats["until"]) // step
            keys = list(range(first, last + 1))
            points = [by_start.get(k, {}) for k in keys]
            labels = [time.strftime(fmt, time.localtime(k * step)) for k in keys]
            return charts.line_chart(points, labels, title, legend=legend)

        oldest = queue["items"][0]["arrival"] if queue["items"] else None
        disk = await asyncio.to_thread(shutil.disk_usage, self.data_dir)
        return self.render(request, "dashboard.html", who,
                           hourly=chart(hourly, 3600, "%H:00", gettext("Messages per hour, last 24 hours")),
                           daily=chart(daily, 86400, "%m-%d", gettext("Messages per day, last 30 days")),
                           totals=hourly["totals"], queue_count=queue["count"], oldest=oldest, now=now,
                           active=alerts["active"], jobs=jobs, disk_free=format_size(disk.free),
                           disk_used=f"{100 * (disk.total - disk.free) / disk.total:.0f}" if disk.total else "?")

    async def queue_page(self, request: Request, who: Who) -> Response:
        params = request.query_params
        offset = _int(params.get("offset"), 0)
        limit = min(_int(params.get("limit"), PAGE_SIZE) or PAGE_SIZE, MAX_PAGE)
        error = ""
        try:
            result = await self._queue_list(params, offset, limit)
        except Refused as e:
            result, error = {"items": [], "count": 0}, e.text(self.gettext_of(request, who))
        keep = {k: params.get(k) for k in ("state", *FILTER_PARAMS) if params.get(k)}
        def page_url(o: int) -> str:
            return "/queue?" + urllib.parse.urlencode({**keep, "offset": o, "limit": limit})
        return self.render(request, "queue.html", who, result=result, offset=offset, limit=limit, error=error,
                           filters=keep, states=STATES, filter_names=FILTER_PARAMS, msg=self.status(request, who),
                           prev_url=page_url(max(0, offset - limit)) if offset > 0 else None,
                           next_url=page_url(offset + limit) if offset + limit < result["count"] else None,
                           pages=page_links(offset, limit, result["count"], page_url),
                           filter_query=urllib.parse.urlencode(keep), bulk_actions=BULK_ACTIONS)

    async def message_page(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        detail = await self.call("show", {"id": qid, "lines": 50})
        return self.render(request, "message.html", who, m=detail, msg=self.status(request, who))

    async def message_act(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        action = request.path_params["action"]
        if action not in QUEUE_ACTIONS:
            raise Refused(404, "no such action")
        result = await self._act(who, action, [qid], None)
        msg = f"{action}: {len(result['acted'])} of {result['matched']}"
        form = await request.form()
        back = "/queue" if action == "delete" or form.get("back") == "list" else f"/queue/{qid}"
        return self.redirect(who, back, msg=msg)

    async def queue_bulk(self, request: Request, who: Who) -> Response:
        """A selection (checked ids) or the current filter: first a confirmation that shows
        the count, then (confirm=yes) the action."""
        form = await request.form()
        action = str(form.get("action") or "")
        if action not in BULK_ACTIONS:
            raise Refused(400, "action must be one of {names}", names=", ".join(BULK_ACTIONS))
        ids = [str(i) for i in form.getlist("id")]
        filters = None
        if not ids:
            query = urllib.parse.parse_qs(str(form.get("filter_query") or ""))
            filters = self._filters({k: v[0] for k, v in query.items()})
            if Filters.from_json(filters).empty:
                raise Refused(400, "select messages or give a filter first (the whole queue is not a selection)")
        if form.get("confirm") != "yes":
            preview = await self._act(who, action, ids or None, filters, dry_run=True)
            return self.render(request, "confirm.html", who, action=action, preview=preview, ids=ids,
                               filter_query=str(form.get("filter_query") or ""))
        result = await self._act(who, action, ids or None, filters)
        msg = f"{action}: {len(result['acted'])} of {result['matched']}"
        return self.redirect(who, "/queue", msg=msg)

    async def backup_page(self, request: Request, who: Who) -> Response:
        keep = {k: request.query_params.get(k) for k in ("state", *FILTER_PARAMS) if request.query_params.get(k)}
        return self.render(request, "backup.html", who, filters=keep, states=STATES, filter_names=FILTER_PARAMS,
                           max_upload=format_size(self.cfg.max_upload), error=self.status(request, who, "error"),
                           msg=self.status(request, who, "msg"))

    async def backup_download(self, request: Request, who: Who) -> Response:
        """The checked messages of the queue page, or a filter (the queue page's, or this
        page's fields), as a queue backup archive."""
        form = await request.form()
        ids = [str(i) for i in form.getlist("id")] + str(form.get("ids") or "").replace(",", " ").split()
        if "filter_query" in form:
            query = urllib.parse.parse_qs(str(form.get("filter_query") or ""))
            params = {k: v[0] for k, v in query.items()}
        else:
            params = {k: str(form.get(k)) for k in ("state", *FILTER_PARAMS) if form.get(k)}
        then = _then(form.get("then"))
        try:
            path, result = await self._backup(who, ids, None if ids else self._filters(params), then)
        except Refused as e:
            if e.status != 400:
                raise
            return self.redirect(who, "/queue/backup", params, error=e.text(self.gettext_of(request, who)))
        return self._archive_response(path, result)

    async def restore_upload(self, request: Request, who: Who) -> Response:
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("archive")
        hold = form.get("hold") == "yes"
        if upload is None or isinstance(upload, str):
            raise Refused(400, "choose a queue backup archive (.tar) to upload")
        try:
            result = await self._restore(who, transfer.upload_chunks(upload), upload.filename or "", hold)
            error = ""
        except Refused as e:
            if e.status not in (400, 404, 413):
                raise
            result, error = None, e.text(self.gettext_of(request, who))
        finally:
            await upload.close()
        return self.render(request, "restore_result.html", who, result=result, error=error,
                           archive=upload.filename or "", hold=hold)

    async def finish_upload(self, request: Request, who: Who) -> Response:
        """The finish step of a move, first half: the archive uploaded on the old relay;
        the page shows how many of its messages are still here and asks before deleting."""
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("archive")
        if upload is None or isinstance(upload, str):
            raise Refused(400, "choose a queue backup archive (.tar) to upload")
        try:
            result = await self._finish_check(who, transfer.upload_chunks(upload), upload.filename or "")
            error = ""
        except Refused as e:
            if e.status not in (400, 404, 413):
                raise
            result, error = None, e.text(self.gettext_of(request, who))
        finally:
            await upload.close()
        return self.render(request, "finish_confirm.html", who, result=result, error=error,
                           archive=upload.filename or "")

    async def finish_confirm(self, request: Request, who: Who) -> Response:
        """The second half: delete the messages the confirmation page counted."""
        form = await request.form(max_files=0, max_fields=10)
        ids = str(form.get("ids") or "").split()
        name = str(form.get("archive") or "")
        result = await self._finish_delete(who, ids, name)
        msg = f"finish move: {len(result['deleted'])} deleted here"
        return self.redirect(who, "/queue/backup", msg=msg)

    async def trace_page(self, request: Request, who: Who) -> Response:
        from kanmon.records.query import search_history  # noqa: PLC0415

        p = request.query_params
        q = (p.get("q") or "").strip()
        since = _since(p.get("since") or "7d")
        timelines = await self._trace(q, since) if q else []
        history = []
        if any(p.get(k) for k in ("from", "to", "subject")) or (q and not timelines):
            history = await asyncio.to_thread(
                search_history, self.data_dir, since=since, mail_from=p.get("from") or None,
                rcpt=p.get("to") or None, subject=p.get("subject") or (q if q and "@" not in q else None) or None,
                limit=200)
        return self.render(request, "trace.html", who, q=q, since=p.get("since") or "7d", timelines=timelines,
                           history=history, params=p)

    async def events_page(self, request: Request, who: Who) -> Response:
        p = request.query_params
        tail = p.get("tail") == "1"
        # The tail starts after the newest line now (asked first: a line written meanwhile
        # shows twice rather than never).
        after = (await self._tail(None, None))["next"] if tail else 0
        rows = await self._events(p.get("grep"), _since(p.get("since") or "1d"), 500)
        keep = {k: p.get(k) for k in ("grep", "since") if p.get(k)}
        return self.render(request, "events.html", who, rows=rows, grep=p.get("grep") or "", since=p.get("since") or "1d",
                           tail=tail, tail_query=urllib.parse.urlencode({**({"grep": keep["grep"]} if "grep" in keep else {}),
                                                                        "after": after}),
                           tail_on=urllib.parse.urlencode({**keep, "tail": "1"}), tail_off=urllib.parse.urlencode(keep))

    async def events_tail(self, request: Request, who: Who) -> Response:
        """The lines written since the page's last look, newest first, and the element that
        asks again (htmx polls it and puts the answer in its own place)."""
        p = request.query_params
        grep = p.get("grep") or None
        result = await self._tail(_int(p.get("after"), 0), grep)
        query = urllib.parse.urlencode({**({"grep": grep} if grep else {}), "after": result["next"]})
        return self.render(request, "events_tail.html", who, rows=result["events"], tail_query=query)

    async def alerts_page(self, request: Request, who: Who) -> Response:
        data = await self._alerts(time.time() - 7 * 86400)
        return self.render(request, "alerts.html", who, categories=ALERT_CATEGORIES, alerts=data,
                           cfg=self.config.alerts, result=None)

    async def alerts_test(self, request: Request, who: Who) -> Response:
        form = await request.form()
        result = await self._alert_test(who, str(form.get("category") or ""), str(form.get("to") or ""))
        if request.headers.get("hx-request"):
            return self.render(request, "alert_result.html", who, result=result)
        data = await self._alerts(time.time() - 7 * 86400)
        return self.render(request, "alerts.html", who, categories=ALERT_CATEGORIES, alerts=data,
                           cfg=self.config.alerts, result=result, to=result["to"])

    async def alert_status(self, request: Request, who: Who) -> Response:
        """The delivery status of a test alert (polled by the page until it is final)."""
        qid = _qid(request.path_params["qid"])
        timelines = await self._trace(qid, None)
        final = timelines[0]["final"] if timelines else ""
        status = timelines[0]["status"] if timelines else {}
        return self.render(request, "alert_status.html", who, qid=qid, final=final, rcpt_status=status)

    async def quarantine_page(self, request: Request, who: Who) -> Response:
        p = request.query_params
        args = {k: p.get(k) for k in ("kind", "from", "to", "reason", "older_than") if p.get(k)}
        result = await self.call("quarantine_list", {"filters": args})
        return self.render(request, "quarantine.html", who, items=result["items"], msg=self.status(request, who), filters=args)

    async def quarantine_item(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        return self.render(request, "quarantine_item.html", who, m=await self.call("quarantine_show", {"id": qid}))

    async def quarantine_act(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        action = request.path_params["action"]
        await self._quarantine_act(who, qid, action)
        return self.redirect(who, "/quarantine", msg=f"{action}: {qid}")

    async def maintenance_page(self, request: Request, who: Who) -> Response:
        listing = await self._maintenance()
        for j in listing["jobs"]:
            j["filters_text"] = ", ".join(f"{k} {format_duration(v) if k == 'older_than' else v}"
                                          for k, v in j["filters"].items() if v is not None)
        return self.render(request, "maintenance.html", who, jobs=listing["jobs"], msg=self.status(request, who),
                           error=self.status(request, who, "error"))

    async def maintenance_run(self, request: Request, who: Who) -> Response:
        job = request.path_params["job"]
        form = await request.form()
        dry_run = form.get("dry_run") == "yes"
        gettext, _ = i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language"), who.account.lang))
        try:
            r = await self._maintenance_run(who, job, dry_run)
        except Refused as e:
            if e.status == 404:
                raise
            return self.redirect(who, "/maintenance", error=f"{job}: {gettext('failed')}: {e.text(gettext)}")
        head = gettext("Dry run") if dry_run else gettext("Ran")
        text = f"{head} {job}: {gettext(r['action'])} {gettext('matched')} {r['matched']}, {gettext('acted on')} {len(r['acted'])}"
        return self.redirect(who, "/maintenance", msg=text)

    async def balancer_page(self, request: Request, who: Who, result: dict | None = None) -> Response:
        return self.render(request, "balancer.html", who, b=await self._balancer(), now=time.time(), result=result)

    async def balancer_mode(self, request: Request, who: Who) -> Response:
        form = await request.form()
        result = await self._balancer_set(who, form.get("virtual"), form.get("real"), form.get("mode"))
        return await self.balancer_page(request, who, result)

    async def policies_page(self, request: Request, who: Who) -> Response:
        policies = self._policies()
        profiles = policies["session_profiles"]
        names = list(profiles)
        keys = list(profiles[names[0]]) if names else []
        rows = [(k, [_setting(k, profiles[n][k]) for n in names]) for k in keys]
        for c in policies["content_profiles"]:
            for r in c["rules"]:
                r["conditions_text"] = "; ".join(f"{k} = {_setting(k, v)}" for k, v in r["conditions"].items())
        for v in policies["recipient_verification"]:
            for k in ("verify_positive_ttl", "verify_negative_ttl"):
                v[k + "_text"] = _setting(k, v[k])
        return self.render(request, "policies.html", who, p=policies, profile_names=names, profile_rows=rows,
                           setting=_setting)

    async def users_page(self, request: Request, who: Who) -> Response:
        return self.render(request, "users.html", who, u=await self._users(), msg=self.status(request, who))

    async def users_add_page(self, request: Request, who: Who) -> Response:
        form = await request.form()
        password = str(form.get("password") or "")
        if password != str(form.get("confirm") or ""):
            raise Refused(400, "the two passwords differ; nothing changed")
        result = await self._user_add(who, str(form.get("address") or ""), password or None)
        return self.redirect(who, "/users", msg=f"add: {result['mailbox']}")

    async def alias_set_page(self, request: Request, who: Who) -> Response:
        form = await request.form()
        targets = str(form.get("targets") or "").replace(",", " ").split()
        result = await self._alias_set(who, str(form.get("alias") or ""), targets)
        return self.redirect(who, "/users", msg=f"alias: {result['alias']} -> {', '.join(result['targets'])}")

    async def alias_delete_page(self, request: Request, who: Who) -> Response:
        address = request.path_params["address"]
        form = await request.form()
        if form.get("confirm") != "yes":
            return self.render(request, "users_confirm.html", who, kind="alias", address=address,
                               action=f"/users/alias/{urllib.parse.quote(address, safe='@')}/delete")
        result = await self._alias_delete(who, address)
        return self.redirect(who, "/users", msg=f"alias delete: {result['alias']}")

    async def users_act(self, request: Request, who: Who) -> Response:
        form = await request.form()
        action = request.path_params["action"]
        if action == "delete" and form.get("confirm") != "yes":
            address = request.path_params["address"]
            return self.render(request, "users_confirm.html", who, kind="mailbox", address=address,
                               action=f"/users/{urllib.parse.quote(address, safe='@')}/delete")
        password = None
        if action == "password":
            password = str(form.get("password") or "")
            if password != str(form.get("confirm") or ""):
                raise Refused(400, "the two passwords differ; nothing changed")
        result = await self._user_act(who, request.path_params["address"], action, password)
        return self.redirect(who, "/users", msg=f"{action}: {result['mailbox']}")

    async def dns_page(self, request: Request, who: Who) -> Response:
        """The last periodic round, or (?run=1) a check made now; a check changes nothing,
        so every role may run it."""
        last = await self._dns_last()
        error, ran = "", request.query_params.get("run") == "1"
        reports = last["reports"]
        if ran:
            try:
                reports = await self._dns_check()
            except Refused as e:
                error, reports = e.text(self.gettext_of(request, who)), []
        return self.render(request, "dns.html", who, reports=reports, ran=ran, error=error, last=last,
                           checked_at=time.time() if ran else last["last_run"])

    async def config_page(self, request: Request, who: Who) -> Response:
        cfg = await self._config()
        return self.render(request, "config.html", who, cfg=cfg, text=cfg["text"], base=cfg["digest"], checked=None,
                           msg=self.status(request, who), error="")

    async def config_check_page(self, request: Request, who: Who) -> Response:
        form = await request.form()
        text = str(form.get("text") or "").replace("\r\n", "\n")
        cfg = await self._config()
        checked = await self._config_check(text)
        return self.render(request, "config.html", who, cfg=cfg, text=text, base=str(form.get("base") or ""),
                           checked=checked, error="")

    async def config_apply_page(self, request: Request, who: Who) -> Response:
        form = await request.form()
        text = str(form.get("text") or "").replace("\r\n", "\n")
        base = str(form.get("base") or "") or None
        try:
            result = await self._config_apply(who, text, base)
        except Refused as e:
            if e.status not in (400, 409):
                raise
            cfg = await self._config()
            return self.render(request, "config.html", who, e.status, cfg=cfg, text=text, base=base or "",
                               checked=await self._config_check(text), error=e.text(self.gettext_of(request, who)))
        gettext, _ = i18n.gettext_for(i18n.negotiate(request.headers.get("accept-language"), who.account.lang))
        msg = f"{gettext('Applied and reloaded')}: {', '.join(result['changed']) or gettext('nothing changed')}"
        return self.redirect(who, "/config", msg=msg)

    async def config_version_page(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        try:
            text = await asyncio.to_thread(configedit.read_version, self.data_dir, name)
        except LookupError as e:
            raise Refused(404, str(e)) from None
        return self.render(request, "config_version.html", who, version=name, text=text,
                           diff=configedit.diff(self.node.config_text or "", text, "running", name))

    async def settings_page(self, request: Request, who: Who) -> Response:
        return self.render(request, "settings.html", who, languages=i18n.LANGUAGES, roles=ROLES)

    async def settings_post(self, request: Request, who: Who) -> Response:
        form = await request.form()
        lang = str(form.get("lang") or "")
        try:
            await asyncio.to_thread(self.accounts.set_lang, who.account.name, None if lang == "browser" else lang)
        except AccountError as e:
            raise Refused(400, str(e)) from None
        self.write_audit(who, "settings lang", lang, "ok")
        return RedirectResponse("/settings", 303)

    # -- API -------------------------------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def api_me(self, request: Request, who: Who) -> Response:
        return JSONResponse({"name": who.account.name, "role": who.account.role, "via": who.via})

    async def api_queue(self, request: Request, who: Who) -> Response:
        p = request.query_params
        offset = _int(p.get("offset"), None)
        limit = _int(p.get("limit"), None)
        return JSONResponse(await self._queue_list(p, offset, limit))

    async def api_backup(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)
        ids, filters = body.get("ids") or [], body.get("filters")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise Refused(400, "ids is a list of queue ids")
        if filters is not None and (not isinstance(filters, dict) or
                                    not all(isinstance(v, str) for v in filters.values())):
            raise Refused(400, "filters is an object of the queue list's filters (strings)")
        path, result = await self._backup(who, ids, None if ids else self._filters(filters or {}),
                                          _then(body.get("then")))
        return self._archive_response(path, result)

    async def api_restore(self, request: Request, who: Who) -> Response:
        hold = request.query_params.get("hold") in ("1", "true", "yes")
        return JSONResponse(await self._restore(who, request.stream(), request.query_params.get("name") or "upload",
                                                hold))

    async def api_finish(self, request: Request, who: Who) -> Response:
        name = request.query_params.get("name") or "upload"
        check = await self._finish_check(who, request.stream(), name)
        if request.query_params.get("dry_run") in ("1", "true", "yes"):
            return JSONResponse({**check, "dry_run": True, "deleted": [], "skipped": []})
        return JSONResponse({**check, "dry_run": False, **(await self._finish_delete(who, check["ids"], name))})

    async def api_message(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        return JSONResponse(await self.call("show", {"id": qid, "lines": _int(request.query_params.get("lines"), 50)}))

    async def api_message_act(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        action = request.path_params["action"]
        if action not in QUEUE_ACTIONS:
            raise Refused(404, "no such action")
        return JSONResponse(await self._act(who, action, [qid], None))

    async def api_trace(self, request: Request, who: Who) -> Response:
        q = (request.query_params.get("q") or "").strip()
        if not q:
            raise Refused(400, "q is a queue id, a Message-ID or an address")
        return JSONResponse(await self._trace(q, _since(request.query_params.get("since") or "7d")))

    async def api_events(self, request: Request, who: Who) -> Response:
        p = request.query_params
        limit = min(_int(p.get("limit"), 1000) or 1000, 10_000)
        return JSONResponse(await self._events(p.get("grep"), _since(p.get("since") or "1d"), limit))

    async def api_events_tail(self, request: Request, who: Who) -> Response:
        p = request.query_params
        after = p.get("after")
        return JSONResponse(await self._tail(None if after in (None, "") else _int(after, 0), p.get("grep") or None))

    async def api_stats(self, request: Request, who: Who) -> Response:
        p = request.query_params
        by = p.get("by") or "hour"
        if by not in ("hour", "day"):
            raise Refused(400, "by is hour or day")
        return JSONResponse(await self._stats(by, _since(p.get("since") or ("24h" if by == "hour" else "30d"))))

    async def api_alerts(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._alerts(_since(request.query_params.get("since") or "7d")))

    async def api_alerts_test(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)
        return JSONResponse(await self._alert_test(who, str(body.get("category") or ""), str(body.get("to") or "")))

    async def api_maintenance(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._maintenance())

    async def api_maintenance_run(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)  # optional: {"dry_run": true}
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise Refused(400, "dry_run is true or false")
        return JSONResponse(await self._maintenance_run(who, request.path_params["job"], dry_run))

    async def api_config(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._config())

    async def api_config_check(self, request: Request, who: Who) -> Response:
        body = await _json_body(request, configedit.MAX_TEXT + MAX_JSON)
        if not isinstance(body.get("text"), str):
            raise Refused(400, "text is the configuration (TOML) as a string")
        return JSONResponse(await self._config_check(body["text"]))

    async def api_config_apply(self, request: Request, who: Who) -> Response:
        body = await _json_body(request, configedit.MAX_TEXT + MAX_JSON)
        if not isinstance(body.get("text"), str) or not isinstance(body.get("base", ""), str):
            raise Refused(400, "text is the configuration (TOML) as a string; base the digest it was edited from")
        return JSONResponse(await self._config_apply(who, body["text"], body.get("base") or None))

    async def api_config_version(self, request: Request, who: Who) -> Response:
        name = request.path_params["name"]
        try:
            text = await asyncio.to_thread(configedit.read_version, self.data_dir, name)
        except LookupError as e:
            raise Refused(404, str(e)) from None
        return JSONResponse({"name": name, "text": text})

    async def api_balancer(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._balancer())

    async def api_policies(self, request: Request, who: Who) -> Response:
        return JSONResponse(self._policies())
    async def api_balancer_mode(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)
        return JSONResponse(await self._balancer_set(who, body.get("virtual"), body.get("real"), body.get("mode")))

    async def api_users(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._users())

    async def api_users_act(self, request: Request, who: Who) -> Response:
        action = request.path_params["action"]
        password = None
        if action == "password":
            body = await _json_body(request)
            if not isinstance(body.get("password"), str):
                raise Refused(400, "password is the new password as a string")
            password = body["password"]
        return JSONResponse(await self._user_act(who, request.path_params["address"], action, password))

    async def api_user_add(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)
        address, password = body.get("address"), body.get("password")
        if not isinstance(address, str) or not (password is None or isinstance(password, str)):
            raise Refused(400, "address is the new mailbox; password (optional) its password, as strings")
        return JSONResponse(await self._user_add(who, address, password))

    async def api_alias_set(self, request: Request, who: Who) -> Response:
        body = await _json_body(request)
        alias, targets = body.get("alias"), body.get("targets")
        if not isinstance(alias, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise Refused(400, "alias is an address and targets a list of addresses")
        return JSONResponse(await self._alias_set(who, alias, targets))

    async def api_alias_delete(self, request: Request, who: Who) -> Response:
        if request.path_params["action"] != "delete":
            raise Refused(404, "no such action")
        return JSONResponse(await self._alias_delete(who, request.path_params["address"]))

    async def api_dns(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._dns_last())

    async def api_dns_check(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self._dns_check())

    async def api_quarantine(self, request: Request, who: Who) -> Response:
        p = request.query_params
        args = {k: p.get(k) for k in ("kind", "from", "to", "reason", "older_than") if p.get(k)}
        return JSONResponse(await self.call("quarantine_list", {"filters": args}))

    async def api_quarantine_item(self, request: Request, who: Who) -> Response:
        return JSONResponse(await self.call("quarantine_show", {"id": _qid(request.path_params["qid"])}))

    async def api_quarantine_act(self, request: Request, who: Who) -> Response:
        qid = _qid(request.path_params["qid"])
        return JSONResponse(await self._quarantine_act(who, qid, request.path_params["action"]))


class _Headers:
    """Security headers on every answer: CSP without inline script or style, no framing,
    no sniffing, no caching of pages; HSTS over TLS."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        https = scope.get("scheme") == "https"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def page_links(offset: int, limit: int, count: int, url, around: int = 3) -> dict:
    """The queue page's paging: page n of total, and links to the first and last pages and
    to those within `around` of this one (None between them: a gap shown as an ellipsis).
    Only the rows of one page are ever asked of the node (offset/limit)."""
    total = max(1, -(-count // limit)) if limit > 0 else 1
    current = min(offset // limit + 1, total) if limit > 0 else 1
    shown = sorted({1, total, *range(max(1, current - around), min(total, current + around) + 1)})
    links: list[dict | None] = []
    for n in shown:
        if links and links[-1] is not None and n > links[-1]["n"] + 1:
            links.append(None)
        links.append({"n": n, "url": url((n - 1) * limit), "current": n == current})
    return {"current": current, "total": total, "links": links}


def _int(text, default):
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise Refused(400, "{text} is not a number", text=repr(text)) from None
    if value < 0:
        raise Refused(400, "{value} is negative", value=value)
    return value


_SIZE_KEYS = {"max_message_size", "max_header_size", "size_over"}
_DURATION_KEYS = {"greet_pause", "idle_timeout", "greylist_delay", "greylist_window", "greylist_remember",
                  "verify_positive_ttl", "verify_negative_ttl"}


def _setting(key: str, value) -> str:
    """A config value as the Policies page shows it: sizes and durations as the config
    writes them, yes/no, lists joined, tables as key = value."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in _SIZE_KEYS and isinstance(value, int | float):
        return format_size(int(value)) if value else "0"
    if key in _DURATION_KEYS and isinstance(value, int | float):
        if value and value < 60 and not float(value).is_integer():
            return f"{value:g}s"  # a pause of half a second is not "0s"
        return format_duration(float(value)) if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ", ".join(_setting(key, v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_setting(k, v)}" for k, v in value.items())
    return str(value)


def _address(text: str) -> str:
    """An address typed in a form or sent to the API, lower-cased and bounded (the Users
    store checks it strictly)."""
    text = text.strip().lower()
    if len(text) > 320 or not text or any(c.isspace() or not c.isprintable() for c in text):
        raise Refused(400, "{text} is not an address", text=repr(for_log(text[:80])))
    return text


def _then(value) -> str | None:
    """What a backup does here afterwards, as a form or a JSON body says it: "hold", else
    nothing ("keep", empty or absent); anything else is left for _backup to refuse."""
    if value in (None, "", "keep"):
        return None
    return value if isinstance(value, str) else repr(value)


def _qid(text: str) -> str:
    if not is_queue_id(text):
        raise Refused(404, "not a queue id")
    return text


def _since(text: str) -> float:
    try:
        return time.time() - parse_duration(text)
    except ValueError as e:
        raise Refused(400, "since: {error}", error=str(e)) from None


def _safe_next(target: str | None) -> str:
    """Only a path on this console (never //host or a scheme): no open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return ""
    return target


async def _json_body(request: Request, limit: int = MAX_JSON) -> dict:
    raw = await request.body()
    if len(raw) > limit:
        raise Refused(413, "the body is too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body is a JSON object")
    return body
