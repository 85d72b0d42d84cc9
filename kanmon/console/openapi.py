"""The OpenAPI 3.1 document of /api/v1 (served at /api/v1/openapi.json without a login).

Role: describe every API route the console serves (a test checks the document and the
routes name the same paths). Trusts: nothing; it is constant. Never: describe a route
that is not served, or leave one out.
"""

from __future__ import annotations

import functools

from kanmon import __version__
from kanmon.config import ALERT_CATEGORIES

_QID = {"name": "qid", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9A-Za-z]{10,20}$"},
        "description": "a queue id"}
_JOB = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "a [[maintenance]] job's name"}
_CONFIG_TEXT = {"type": "object", "required": ["text"], "properties": {
    "text": {"type": "string", "description": "the whole configuration (TOML)"},
    "base": {"type": "string", "description": "the digest of the file the text was edited from (GET /api/v1/config)"}}}
_ERROR = {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OBJ = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
_LIST = {"description": "ok", "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}}
_COMMON = {"401": _ERROR, "403": _ERROR, "400": _ERROR}


def _q(name: str, description: str, kind: str = "string") -> dict:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}, "description": description}


_FILTERS = [
    {"name": "state", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["active", "deferred", "hold", "corrupt", "all"]}},
    _q("from", "sender: a glob or a substring; <> is the null sender"),
    _q("to", "a recipient not yet delivered: a glob or a substring"),
    _q("domain", "a recipient not yet delivered is in this domain"),
    _q("older_than", "arrived longer ago than this duration (1h, 3d)"),
    _q("reason", "a reply of any attempt matches this regex"),
    _q("subject", "the decoded Subject matches this regex"),
    _q("header", "a decoded header line matches this regex"),
    _q("body", "the text of the first 64 KB matches this regex"),
    _q("size", "size bound: >1MB, <=100KB"),
    _q("attempts", "attempts bound: >=5"),
    _q("offset", "skip this many matches (paging)", "integer"),
    _q("limit", "at most this many items (paging)", "integer"),
]


def _op(summary: str, params=(), write: bool = False, body: dict | None = None, response=_OBJ,
        conflict: bool = False) -> dict:
    op = {"summary": summary, "parameters": list(params), "responses": {"200": response, **_COMMON}}
    if write:
        op["description"] = ("A write: needs the role's permission (auditors get 403). With the session cookie it "
                             "also needs the X-CSRF-Token header; with a Bearer token it does not.")
        op["responses"]["404"] = _ERROR
    if conflict:
        op["responses"]["409"] = _ERROR
    if any(p.get("in") == "path" for p in params):
        op["responses"]["404"] = _ERROR  # no such message, job, version or mailbox
    if body is not None:
        op["responses"]["413"] = _ERROR  # a body larger than the API takes
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


@functools.cache
def openapi_document() -> dict:
    paths = {
        "/api/v1/me": {"get": _op("who the token or session belongs to")},
        "/api/v1/queue": {"get": _op("the queue, as `kanmon queue list --json` (same filters)", _FILTERS)},
        "/api/v1/queue/{qid}": {"get": _op("one message: envelope, attempts, headers, first body lines",
                                           [_QID, _q("lines", "body lines", "integer")])},
        "/api/v1/trace": {"get": _op("timelines of the messages matching q, as `kanmon trace --json`",
                                     [{**_q("q", "a queue id, a Message-ID or an address"), "required": True},
                                      _q("since", "only the last duration (default 7d)")], response=_LIST)},
        "/api/v1/events": {"get": _op("the event log, newest last", [_q("grep", "lines containing this text"),
                                                                    _q("since", "duration, default 1d"),
                                                                    _q("limit", "at most this many", "integer")],
                                      response=_LIST)},
        "/api/v1/events/tail": {"get": _op("a live tail of the event log: the lines after line number `after`, "
                                           "oldest first, and `next`, the number to ask after next time (without "
                                           "`after`: no lines, and where a tail starts now)",
                                           [_q("after", "the `next` of the previous answer", "integer"),
                                            _q("grep", "lines containing this text")])},
        "/api/v1/stats": {"get": _op("message volume per hour or day, as `kanmon stats --json`",
                                     [{"name": "by", "in": "query", "required": False,
                                       "schema": {"type": "string", "enum": ["hour", "day"]}},
                                      _q("since", "duration, default 24h (by hour) or 30d (by day)")])},
        "/api/v1/alerts": {"get": _op("active and recent alerts", [_q("since", "duration, default 7d")])},
        "/api/v1/alerts/test": {"post": _op("send a test alert of a category; its queue id", write=True, body={
            "type": "object", "required": ["category"],
            "properties": {"category": {"type": "string", "enum": list(ALERT_CATEGORIES)},
                           "to": {"type": "string", "description": "one mailbox instead of [alerts] to"}}})},
        "/api/v1/maintenance": {"get": _op("the [[maintenance]] jobs with last run, result and next run, as "
                                           "`kanmon maintenance list --json`")},
        "/api/v1/maintenance/{job}/run": {"post": _op(
            "run a [[maintenance]] job now, as `kanmon maintenance run JOB`", [_JOB], write=True, body={
                "type": "object", "properties": {"dry_run": {"type": "boolean", "description": "change nothing"}}})},
        "/api/v1/config": {"get": _op("admin only: the config file, its digest, its diff against the running "
                                      "config, the applied versions")},
        "/api/v1/config/check": {"post": _op("admin only: `kanmon config check` of a text, and its diff against the "
                                             "running config (changes nothing)", write=True, body=_CONFIG_TEXT)},
        "/api/v1/config/apply": {"post": _op(
            "admin only: check the text, write the config file, reload as `kanmon reload` does, keep the version; "
            "409 when the file changed since `base`", write=True, body=_CONFIG_TEXT, conflict=True)},
        "/api/v1/config/history/{name}": {"get": _op("admin only: an applied version's text", [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "a version name from GET /api/v1/config"}])},
        "/api/v1/balancer": {"get": _op("the balancer: `{status, problem, history}`; status is the document of "
                                        "`kanmon balance status --json` (virtual and real servers, health, the "
                                        "serving tier), history its event lines of 30 days")},
        "/api/v1/policies": {"get": _op("the policies and profiles of the running config (read only): ip_policy, "
                                        "recipient_policy, session_profiles (resolved), content_profiles with their "
                                        "rules, recipient_verification per domain, dnsbl, dnsbl_allowlist")},
        "/api/v1/balancer/mode": {"post": _op(
            "set a real server to disabled (drain: no new connections, open ones finish), standby, or enabled "
            "(its configured mode), as `kanmon balance set`; kept across reloads and restarts; the real "
            "server's status after it", write=True, body={
                "type": "object", "required": ["virtual", "real", "mode"], "properties": {
                    "virtual": {"type": "string", "description": "a virtual server's name"},
                    "real": {"type": "string", "description": "a real server's address as the status shows it "
                                                              "(ip:port, [ipv6]:port)"},
                    "mode": {"type": "string", "enum": ["disabled", "standby", "enabled"]}}})},
        "/api/v1/users": {"get": _op("mailboxes as `kanmon user list --json` with each domain's quota and the use "
                                     "of it, aliases, and the domains with their routing")},
        "/api/v1/dns": {"get": _op("the periodic DNS check ([dnscheck] every): its last round as `kanmon dns check "
                                   "--json` reports, and its event lines of 30 days")},
        "/api/v1/dns/check": {"get": _op("check our domains' DNS now; the reports of `kanmon dns check --json`",
                                         response=_LIST)},
        "/api/v1/quarantine": {"get": _op("the quarantine", [_q(k, k) for k in ("kind", "from", "to", "reason", "older_than")])},
        "/api/v1/quarantine/{qid}": {"get": _op("one quarantined message", [_QID])},
    }
    tar = {"description": "the archive (the format of `kanmon queue backup`, docs/queue-backup.md); the header "
                          "X-Kanmon-Count says how many messages it holds, X-Kanmon-Held (with then: hold) how "
                          "many of them were held here",
           "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}
    backup = _op("admin only: download the messages of `ids`, else of `filters` (the query parameters of GET "
                 "/api/v1/queue; none: the whole queue), as a queue backup archive; then: keep (the default, as "
                 "`kanmon queue backup`) leaves them queued here, hold holds here exactly the messages written into "
                 "it once it is complete (`--then hold`: the old relay no longer delivers what the new one will)",
                 write=True, response=tar, body={"type": "object", "properties": {
                     "then": {"type": ["string", "null"], "enum": ["keep", "hold", None],
                              "description": "what is done here after the backup (never delete: the finish step "
                                             "deletes them, POST /api/v1/queue/finish)"},
                     "ids": {"type": "array", "items": {"type": "string"}, "description": "queue ids"},
                     "filters": {"type": "object", "additionalProperties": {"type": "string"},
                                 "description": "state, from, to, domain, older_than, reason, ..."}}})
    paths["/api/v1/queue/backup"] = {"post": backup}
    restore = _op("admin only: restore a queue backup archive (the body, as uploaded), as `kanmon queue restore`: "
                  "verified whole first; a message already here, or restored here before, is skipped. Answers "
                  "`{in_archive, restored, skipped, held, size, origin, then, finish_command, finish_placeholder}`; 413 past "
                  "[console] max_upload",
                  [_q("hold", "true: restore on hold", "boolean"), _q("name", "the archive's name for the audit log")],
                  write=True)
    restore["requestBody"] = {"required": True, "description": "the archive file as it is (any content type)",
                              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    restore["responses"]["413"] = _ERROR
    paths["/api/v1/queue/restore"] = {"post": restore}
    finish = _op("admin only: finish a move on the node a queue backup archive came from (the body, as uploaded; "
                 "the same archive the new node restored): delete here its messages still queued, as `kanmon queue "
                 "delete --ids-from ARCHIVE`. Verified whole first; refused (400) for an archive this node's queue "
                 "did not write, and on a node that restored any of its messages. Answers `{in_archive, origin, "
                 "then, ids, held, size, dry_run, deleted, skipped}`; 413 past [console] max_upload",
                 [_q("dry_run", "true: only count what would be deleted (ids, held)", "boolean"),
                  _q("name", "the archive's name for the audit log")], write=True)
    finish["requestBody"] = restore["requestBody"]
    finish["responses"]["413"] = _ERROR
    paths["/api/v1/queue/finish"] = {"post": finish}
    for action in ("hold", "release", "delete"):
        paths[f"/api/v1/queue/{{qid}}/{action}"] = {"post": _op(f"{action} one message", [_QID], write=True)}
    paths["/api/v1/users/mailboxes"] = {"post": _op(
        "admin only: add a mailbox to the users file (`kanmon user add`); without a password it cannot log in "
        "until one is set", write=True, body={"type": "object", "required": ["address"], "properties": {
            "address": {"type": "string", "description": "the new mailbox, in a local domain"},
            "password": {"type": ["string", "null"], "description": "its password (optional)"}}})}
    paths["/api/v1/users/aliases"] = {"post": _op(
        "admin only: define or replace an alias of the users file (`kanmon user alias ADDRESS TARGETS`)",
        write=True, body={"type": "object", "required": ["alias", "targets"], "properties": {
            "alias": {"type": "string", "description": "the alias address, in a local domain"},
            "targets": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                        "description": "where its mail goes (full addresses)"}}})}
    paths["/api/v1/users/aliases/{address}/delete"] = {"post": _op(
        "admin only: remove an alias of the users file (`kanmon user alias ADDRESS --delete`)",
        [{"name": "address", "in": "path", "required": True, "schema": {"type": "string"}, "description": "an alias"}],
        write=True)}
    paths["/api/v1/users/{address}/{action}"] = {"post": _op(
        "admin only: lock or unlock a mailbox's logins (mail is still delivered), set its password, or remove "
        "it from the users file (its Maildir stays) (`kanmon user lock|unlock|passwd|del`)",
        [{"name": "address", "in": "path", "required": True, "schema": {"type": "string"}, "description": "a mailbox"},
         {"name": "action", "in": "path", "required": True, "schema": {"type": "string",
                                                                        "enum": ["lock", "unlock", "password",
                                                                                 "delete"]}}],
        write=True, body={"type": "object", "properties": {
            "password": {"type": "string", "description": "the new password (action password only)"}}})}
    for action in ("release", "delete"):
        paths[f"/api/v1/quarantine/{{qid}}/{action}"] = {"post": _op(f"{action} one quarantined message", [_QID], write=True)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kanmon console API", "version": __version__,
                 "description": "Authenticate with `Authorization: Bearer TOKEN` (`kanmon admin token NAME`)."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "cookie": {"type": "apiKey", "in": "cookie", "name": "kanmon_session"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
        },
        "security": [{"bearer": []}, {"cookie": []}],
    }
