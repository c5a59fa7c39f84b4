#!/usr/bin/env python3
"""Local emulator of the cloud mail services pcr_email talks to, for the integration tests.

One plain-HTTP server on loopback (the base URLs are configuration) that follows the public
documentation of:

* the Microsoft identity platform (v2.0): ``/{tenant}/oauth2/v2.0/authorize`` and ``/token``
  (authorization code with PKCE S256, client secret, refresh tokens with rotation, and the
  app-only ``client_credentials`` grant: ``client_id`` + ``client_secret`` in the form or HTTP
  Basic, ``scope`` exactly one ``<resource>/.default`` of ``https://outlook.office365.com``
  (IMAP, POP, SMTP) or ``https://graph.microsoft.com``; the reply has ``token_type``,
  ``expires_in``, ``ext_expires_in``, ``access_token`` and no refresh token);
* Microsoft Graph mail (``/v1.0``): ``/me``, ``/me/sendMail`` (MIME as base64 text/plain, and
  JSON; the sent copy saved in the sender's Sent Items, unless JSON ``saveToSentItems`` is
  false), ``/me/mailFolders`` (+ ``childFolders``), folder ``messages`` with ``$top``/``$skip``
  paging through ``@odata.nextLink``, ``$orderby``, the ``PR_MESSAGE_SIZE`` extended property,
  ``/me/messages/{id}`` GET/PATCH/DELETE, ``/$value``, ``/move`` (immutable ids honoured), and
  the folder's delta query ``/me/mailFolders/{id}/messages/delta`` (see below); the
  same under ``/users/{mailbox}`` (app-only tokens: the Graph resource, the ``Mail.*`` app
  roles and the app's mailbox grant; delegated tokens: the user's own or Full Access mailboxes);
* Google OAuth 2.0: ``/o/oauth2/v2/auth`` and ``/token`` (authorization code with PKCE,
  ``access_type=offline``, refresh without rotation, and the RFC 7523 JWT bearer grant of
  service accounts, with the RS256 signature verified against the registered public key);
* the Gmail API (``/gmail/v1/users/{userId}``): ``profile``, ``messages`` (paging with
  ``nextPageToken``), ``messages/{id}`` (``format=raw|minimal|metadata|full``), ``modify``,
  ``batchModify``, ``trash``, ``labels``, ``messages/send`` (JSON ``raw`` and the media upload),
  and ``history`` (see below).

Graph delta query (message: delta; "Get incremental changes to messages in a folder"): every
change to a message (arrival, ``isRead``, a move) gives it the mailbox's next change number,
and a message leaving a folder (moved, deleted) leaves a tombstone there. A round without a
state token returns every message in the folder; a round from a ``$deltatoken`` returns the
messages of the folder changed since that token's round began, and the messages moved out or
deleted as ``{"id", "@removed": {"reason": "deleted"}}``; ``changeType=created|updated|deleted``
filters the incremental rounds (the initial one returns everything). Pages hold
``Prefer: odata.maxpagesize=N`` messages (``$top`` also accepted; default 10); each ends with
an ``@odata.nextLink`` (``$skiptoken``) or, last, an ``@odata.deltaLink`` (``$deltatoken``), both
of the form ``{base}/v1.0/me/mailFolders('{id}')/messages/delta?...`` as Graph writes them.
``$select``/``$expand`` of the first request are kept in the tokens (opaque, reusable until
invalidated). A token the emulator does not know, or one issued before
``/_admin/sync_state`` invalidated the mailbox's tokens, is refused: ``410``
``{"error": {"code": "SyncStateNotFound"}}`` unless the admin call chose another status and
code.

Gmail history (users.history.list): the mailbox's ``historyId`` grows (by 1-3, not contiguous)
with every change: a message added (``messagesAdded``, its labels at that time), labels added
or removed (``labelsAdded``/``labelsRemoved`` with ``labelIds``). ``startHistoryId`` (required)
returns the records after it, oldest first, filtered by the repeated ``historyTypes`` and by
``labelId`` (records whose message had that label then), ``maxResults`` (default 100, at most
500) per page with ``nextPageToken``; every page carries the mailbox's current ``historyId``.
A ``startHistoryId`` older than the oldest record kept (``/_admin/sync_state`` forgets all
records so far) answers ``404 NOT_FOUND``.

Errors use each service's documented shape: OAuth ``{"error": "invalid_grant",
"error_description": ...}``, Graph ``{"error": {"code": "InvalidAuthenticationToken",
"message": ...}}``, Gmail ``{"error": {"code": 401, "message": ..., "status":
"UNAUTHENTICATED"}}``. The client credentials grant answers ``invalid_client`` (401: wrong or
revoked secret AADSTS7000215, expired secret AADSTS7000222, no secret AADSTS7000218),
``unauthorized_client`` (400, unknown application AADSTS700016), ``invalid_scope`` (400, not
exactly one ``/.default`` scope, AADSTS1002012), ``invalid_resource`` (400, a resource other
than the two above, AADSTS500011), ``invalid_request`` (400, no scope, AADSTS900144).

Token introspection for the mail protocol servers (RFC 7662; what Exchange Online and Gmail
do inside their IMAP/POP/SMTP front ends): ``POST /_introspect?user=<login>&service=<imap|pop3|
smtp>`` (both query parameters optional; without ``service``, the ``X-Dovecot-Auth-Service``
header that Dovecot's oauth2 passdb sends with ``send_auth_headers = yes``) with the form
``token=<access token>`` (other form fields ignored) answers 200
``{"active": true, "email": <mailbox>, "username": <mailbox>, "scope", "client_id", "exp",
"iat", "token_type": "Bearer", "sub"}`` or ``{"active": false}``. The mailbox is:

* app-only (client credentials) token: the ``user`` parameter (lower-cased), when the token
  is for ``https://outlook.office365.com``, the app had the role of the service when the token
  was issued (``IMAP.AccessAsApp``, ``POP.AccessAsApp``, ``SMTP.SendAsApp``) and the mailbox is
  in the app's grant now; else inactive (also without ``user``);
* Microsoft delegated token: its signed-in user, or the ``user`` parameter when that is a
  mailbox the signed-in user has Full Access to; with ``service`` the token's scope must hold
  ``https://outlook.office.com/IMAP.AccessAsUser.All``, ``.../POP.AccessAsUser.All`` or
  ``.../SMTP.Send`` (``outlook.office365.com`` accepted too), else inactive;
* Google token (code, refresh or service-account grant): its user; with ``service`` the scope
  must hold ``https://mail.google.com/``, else inactive.

Expired, revoked (``/_admin/expire_access_tokens``) or unknown tokens are inactive. The
emulator does not refuse a delegated token whose mailbox differs from ``user``: the caller
compares ``email`` with the login (as Dovecot's ``username_attribute`` check does).

Test-only parts, all under ``/_admin`` (JSON in, JSON out):

* ``POST /_admin/clients`` ``{"provider": "microsoft"|"google", "client_id"?, "client_secret"?,
  "redirect_uris"?: [...], "access_token_lifetime"?: s, "rotate_refresh_tokens"?: bool,
  "refresh_delay_ms"?: ms (each refresh_token grant waits this long before it is looked at, so
  that concurrent refreshes overlap),
  "app_roles"?: ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp", "Mail.ReadWrite",
  "Mail.Send", ...], "mailboxes"?: [...]|"*", "client_secret_expires_at"?: epoch s}``;
  ``app_roles`` are the application permissions consented for the app (copied into each
  token when it is issued), ``mailboxes`` the Exchange service principal's mailbox grant
  (checked at each use, so it can change under a live token)
* ``POST /_admin/app_access`` ``{"client_id", "app_roles"?, "mailboxes"?}`` (change them)
* ``POST /_admin/revoke_secret`` ``{"client_id", "expired"?: bool}``: the secret is refused
  from now on (``invalid_client``: AADSTS7000215, or AADSTS7000222 with ``expired``)
* ``POST /_admin/users`` ``{"provider", "email", "display_name"?, "mail"?: null to omit}``
* ``POST /_admin/full_access`` ``{"user", "mailboxes": [...]}`` (Exchange Full Access of a
  Microsoft user to other mailboxes, e.g. a shared mailbox)
* ``POST /_admin/service_accounts`` ``{"client_email", "public_key_pem", "delegated": [...]|"*"}``
* ``POST /_admin/seed`` ``{"provider", "user", "raw_b64", "folder"?, "labels"?, "is_read"?}``
  (``{"id"}``), or with ``"raws_b64": [...]`` instead of ``raw_b64`` many at once (``{"ids"}``,
  for the benchmarks)
* ``GET /_admin/sent?user=`` (what was sent), ``GET /_admin/mailbox?provider=&user=``
* ``POST /_admin/fault`` ``{"path": regex, "method"?, "user"?, "client_id"?, "status",
  "retry_after"?, "retry_after_date"?: bool, "count"?: 1, "body"?, "content_type"?}``
  (``user`` on ``/_introspect``: the ``user`` query parameter, i.e. the login being checked)
* ``POST /_admin/revoke`` ``{"user"?, "client_id"?}`` (refresh tokens),
  ``POST /_admin/expire_access_tokens`` ``{"user"?, "client_id"?, "token"?}`` (at least one,
  all given must match; app-only tokens have no user: name their ``client_id`` or ``token``)
* ``POST /_admin/sync_state`` ``{"provider": "microsoft"|"google", "user", "status"?: 410,
  "code"?: "SyncStateNotFound"}``: Microsoft: every delta or skip token of the mailbox issued
  so far is refused from now on with that status and Graph error code (e.g. ``400``
  ``syncStateInvalid``, ``410`` ``resyncRequired``); Google: every ``historyId`` up to the
  current one becomes too old (404)
* ``GET /_admin/stats?client_id=&user=`` (grants issued, requests seen), ``GET /_admin/health``
* ``POST /_admin/reset``: forget everything, then register the ``--seed-users`` again

``--seed-users a@x,b@x`` registers these users for both providers at start and after every
reset (``scripts/test-servers.sh`` passes the OAuth test mailboxes of its Dovecot).

The sign-in a browser would do is the authorize endpoint itself: it "signs in" the user named
by the test-only ``_user`` query parameter (else ``login_hint``) and redirects (302) to
``redirect_uri`` with ``code`` and ``state``; ``_deny=1`` redirects with ``error=access_denied``.
"""

import argparse
import base64
import binascii
import email
import email.policy
import hashlib
import json
import re
import secrets
import sys
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GRAPH_MAX_REQUEST = 4 * 1024 * 1024
GMAIL_MAX_UPLOAD = 35 * 1024 * 1024
CODE_LIFETIME = 600
WELL_KNOWN = ["inbox", "archive", "deleteditems", "drafts", "junkemail", "sentitems", "outbox"]
WELL_KNOWN_NAMES = {
    "inbox": "Inbox",
    "archive": "Archive",
    "deleteditems": "Deleted Items",
    "drafts": "Drafts",
    "junkemail": "Junk Email",
    "sentitems": "Sent Items",
    "outbox": "Outbox",
}
GMAIL_SYSTEM_LABELS = ["INBOX", "SPAM", "TRASH", "UNREAD", "STARRED", "IMPORTANT", "SENT",
                       "DRAFT", "CATEGORY_PERSONAL", "CATEGORY_SOCIAL", "CATEGORY_PROMOTIONS",
                       "CATEGORY_UPDATES", "CATEGORY_FORUMS"]
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Resources an app-only (client credentials) token may be for: Exchange Online (IMAP, POP,
# SMTP) and Graph.
OUTLOOK_RESOURCE = "https://outlook.office365.com"
GRAPH_RESOURCE = "https://graph.microsoft.com"
APP_RESOURCES = [OUTLOOK_RESOURCE, GRAPH_RESOURCE]
# Mail protocols as named by the introspection caller (Dovecot's X-Dovecot-Auth-Service header,
# the SMTP server's service parameter).
SERVICES = {"imap": "imap", "pop3": "pop", "pop": "pop", "smtp": "smtp", "submission": "smtp"}
APP_ROLE_OF_SERVICE = {"imap": "IMAP.AccessAsApp", "pop": "POP.AccessAsApp",
                       "smtp": "SMTP.SendAsApp"}
DELEGATED_SCOPE_OF_SERVICE = {"imap": "IMAP.AccessAsUser.All", "pop": "POP.AccessAsUser.All",
                              "smtp": "SMTP.Send"}
OUTLOOK_SCOPE_PREFIXES = ["https://outlook.office.com/", "https://outlook.office365.com/"]
GMAIL_SCOPE = "https://mail.google.com/"
GRAPH_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="", authorization_uri='
                          '"https://login.microsoftonline.com/common/oauth2/authorize", '
                          'client_id="00000003-0000-0000-c000-000000000000"'}
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

LOCK = threading.RLock()


def now():
    return time.time()


def b64url_decode(text):
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class OAuthError(Exception):
    def __init__(self, status, error, description, provider="microsoft", codes=None):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.provider = provider
        self.codes = codes or []

    def body(self):
        if self.provider == "microsoft":
            return {
                "error": self.error,
                "error_description": f"{self.description}\r\nTrace ID: {uuid.uuid4()}\r\n"
                                     f"Correlation ID: {uuid.uuid4()}\r\nTimestamp: "
                                     f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%SZ')}",
                "error_codes": self.codes,
                "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
                "trace_id": str(uuid.uuid4()),
                "correlation_id": str(uuid.uuid4()),
            }
        return {"error": self.error, "error_description": self.description}


class ApiError(Exception):
    """A Graph or Gmail error reply."""

    def __init__(self, service, status, code, message, reason=None, headers=None):
        super().__init__(message)
        self.service = service
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers or {}

    def body(self):
        if self.service == "graph":
            return {"error": {"code": self.code, "message": self.message, "innerError": {
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4())}}}
        return {"error": {"code": self.status, "message": self.message, "errors": [{
            "message": self.message, "domain": "global",
            "reason": self.reason or "failedPrecondition"}], "status": self.code}}


# ---- state ------------------------------------------------------------------------------

class World:
    def __init__(self, token_lifetime, seed_users=()):
        self.default_lifetime = token_lifetime
        self.seed_users = list(seed_users)
        self.reset()

    def reset(self):
        self.clients = {}
        self.users = {}          # (provider, email lower) -> user dict
        self.service_accounts = {}
        self.codes = {}
        self.refresh_tokens = {}
        self.access_tokens = {}
        self.faults = []
        self.sent = []
        self.log = []
        self.stats = {}
        self.full_access = {}    # Microsoft user (lower) -> set of other mailboxes (lower)
        self.delta_tokens = {}   # Graph $skiptoken/$deltatoken -> the state of the round
        for address in self.seed_users:
            for provider in ("microsoft", "google"):
                self.users[(provider, address.lower())] = new_user(provider, address, address,
                                                                   address)

    def count(self, key):
        self.stats[key] = self.stats.get(key, 0) + 1

    def user(self, provider, address):
        return self.users.get((provider, (address or "").lower()))


WORLD = None


def new_user(provider, address, display_name, mail):
    user = {"provider": provider, "email": address, "display_name": display_name,
            "mail": mail, "id": str(uuid.uuid4()), "messages": {}, "folders": {}, "labels": {},
            "history": 1000,
            # Graph delta: the last change number, tombstones of messages that left a folder,
            # the generation of valid tokens and how older ones are refused.
            "changes": 0, "tombstones": [], "sync_generation": 0, "sync_refusal": None,
            # Gmail history: the records, and the oldest startHistoryId still answered.
            "history_log": [], "history_floor": 0}
    if provider == "microsoft":
        for wk in WELL_KNOWN:
            fid = "AAMkFolder" + b64url_encode(secrets.token_bytes(12))
            user["folders"][fid] = {"id": fid, "displayName": WELL_KNOWN_NAMES[wk],
                                    "parentFolderId": "root", "wellKnown": wk}
    else:
        for label in GMAIL_SYSTEM_LABELS:
            user["labels"][label] = {"id": label, "name": label, "type": "system"}
    return user


def graph_folder(user, ref):
    """A folder by id or well-known name (case-insensitive)."""
    if ref in user["folders"]:
        return user["folders"][ref]
    for folder in user["folders"].values():
        if folder.get("wellKnown") == ref.lower():
            return folder
    return None


def graph_touch(user, msg, entered=False):
    """A change to a Graph message (arrival in a folder when `entered`): its change number."""
    user["changes"] += 1
    msg["changed"] = user["changes"]
    if entered or "entered" not in msg:
        msg["entered"] = user["changes"]


def graph_left(user, msg_id, folder_id):
    """A message left a folder (moved out or deleted): the folder's delta reports it."""
    user["changes"] += 1
    user["tombstones"].append({"seq": user["changes"], "folder": folder_id, "id": msg_id})


def gmail_history(user, kind, msg, label_ids=None):
    """One Gmail history record (the mailbox's historyId grows by 1-3 each time)."""
    user["history"] += 1 + secrets.randbelow(3)
    entry = {"message": {"id": msg["id"], "threadId": msg["threadId"],
                         "labelIds": list(msg["labels"])}}
    if label_ids is not None:
        entry["labelIds"] = list(label_ids)
    user["history_log"].append({"id": user["history"], "kind": kind, "entry": entry})
    msg["history"] = user["history"]


def header_summary(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return {name: str(msg.get(name, "")) for name in
            ["From", "To", "Cc", "Bcc", "Subject", "Message-ID", "In-Reply-To", "References"]}


# ---- the request handler --------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without this, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    server_version = "pcr-cloud-emulator/1"

    def log_message(self, fmt, *args):  # quieter: one line per request
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    # -- plumbing --

    def base_url(self):
        return "http://" + (self.headers.get("Host") or "%s:%d" % self.server.server_address)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status, body=b"", content_type="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        # Record before answering: a client that reads this response and then asks
        # /_admin/stats must already see this request in the log.
        self.record(status)
        self.send_response(status)
        if body or status not in (204, 304):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.last_status = status

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")

    def dispatch(self, method):
        self.last_status = 0
        self.recorded = False
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        q = {k: v[-1] for k, v in query.items()}
        body = self.read_body()
        self.req_user = None
        self.req_client = None
        try:
            if path.startswith("/_admin/"):
                self.admin(method, path, q, body)
            else:
                self.service(method, path, q, body)
        except OAuthError as e:
            self.send(e.status, e.body())
        except ApiError as e:
            self.send(e.status, e.body(), headers=e.headers)
        except Exception as e:  # a bug in the emulator: say so loudly
            self.send(500, {"error": {"code": "EmulatorBug", "message": repr(e)}})
            raise
        finally:
            self.record(self.last_status)

    def record(self, status):
        """Log this request (once) for /_admin/stats; admin calls are not logged."""
        if self.recorded:
            return
        self.recorded = True
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/_admin/"):
            return
        with LOCK:
            WORLD.log.append({"t": now(), "method": self.command, "path": path,
                              "user": self.req_user, "client_id": self.req_client,
                              "status": status})
            del WORLD.log[:-200000]

    def fault(self, method, path):
        """An injected failure for this request, if one matches (consumed)."""
        with LOCK:
            for f in WORLD.faults:
                if f["count"] <= 0:
                    continue
                if f.get("method") and f["method"].upper() != method:
                    continue
                if not re.search(f["path"], path):
                    continue
                if f.get("user") and (self.req_user or "").lower() != f["user"].lower():
                    continue
                if f.get("client_id") and self.req_client != f["client_id"]:
                    continue
                f["count"] -= 1
                f["hits"] = f.get("hits", 0) + 1
                return dict(f)
        return None

    def apply_fault(self, method, path):
        f = self.fault(method, path)
        if not f:
            return False
        headers = {}
        if f.get("retry_after") is not None:
            if f.get("retry_after_date"):
                when = datetime.fromtimestamp(now() + f["retry_after"], timezone.utc)
                headers["Retry-After"] = format_datetime(when, usegmt=True)
            else:
                headers["Retry-After"] = str(f["retry_after"])
        body = f.get("body")
        if body is None:
            body = {"error": {"code": "TooManyRequests" if f["status"] == 429 else "Injected",
                              "message": "injected by the test"}}
        self.send(f["status"], body, f.get("content_type", "application/json"), headers)
        return True

    # -- routing of the services --

    def service(self, method, path, q, body):
        form = {}
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            form = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(),
                                                                keep_blank_values=True).items()}
        self.req_client = form.get("client_id") or q.get("client_id")
        if path == "/_introspect":
            # A fault with "user" hits the introspection of that login only.
            self.req_user = (q.get("user") or "").strip().lower() or None
            if self.apply_fault(method, path):
                return
            if method != "POST":
                return self.send(405, {"error": "invalid_request",
                                       "error_description": "introspection is POST only"},
                                 headers={"Allow": "POST"})
            return self.introspect(q, form)
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/(authorize|token)", path)
        if m and m.group(1) not in ("v1.0", "gmail"):
            self.tenant = m.group(1)
            if self.apply_fault(method, path):
                return
            if m.group(2) == "authorize" and method == "GET":
                return self.authorize("microsoft", q)
            if m.group(2) == "token" and method == "POST":
                return self.token("microsoft", form)
        if path == "/o/oauth2/v2/auth" and method == "GET":
            if self.apply_fault(method, path):
                return
            return self.authorize("google", q)
        if path == "/token" and method == "POST":
            if self.apply_fault(method, path):
                return
            return self.token("google", form)
        if path.startswith("/v1.0/"):
            return self.graph(method, path[len("/v1.0"):], q, body)
        if path.startswith("/gmail/v1/users/") or path.startswith("/upload/gmail/v1/users/"):
            return self.gmail(method, path, q, body)
        self.send(404, {"error": {"code": "NotFound", "message": f"no route {method} {path}"}})

    # -- OAuth --

    def authorize(self, provider, q):
        with LOCK:
            client = WORLD.clients.get(q.get("client_id", ""))
            if not client or client["provider"] != provider:
                return self.send(400, {"error": "unauthorized_client" if provider == "microsoft"
                                       else "invalid_client",
                                       "error_description": "AADSTS700016: Application not found"
                                       if provider == "microsoft" else "The OAuth client was not found."})
            redirect = q.get("redirect_uri", "")
            if client["redirect_uris"] and redirect not in client["redirect_uris"]:
                return self.send(400, {"error": "invalid_request",
                                       "error_description": "AADSTS50011: The redirect URI "
                                       "specified in the request does not match the redirect "
                                       "URIs configured for the application."
                                       if provider == "microsoft" else "redirect_uri_mismatch"})

            def back(params):
                sep = "&" if "?" in redirect else "?"
                params["state"] = q.get("state", "")
                self.send(302, b"", headers={"Location": redirect + sep +
                                             urllib.parse.urlencode(params)})

            if q.get("response_type") != "code":
                return back({"error": "unsupported_response_type",
                             "error_description": "only the code flow is supported"})
            if q.get("_deny"):
                return back({"error": "access_denied",
                             "error_description": "The user has denied access"})
            method = q.get("code_challenge_method", "plain" if q.get("code_challenge") else "")
            if q.get("code_challenge") and method != "S256":
                return back({"error": "invalid_request",
                             "error_description": "code_challenge_method must be S256"})
            who = q.get("_user") or q.get("login_hint", "")
            user = WORLD.user(provider, who)
            if not user:
                return back({"error": "access_denied",
                             "error_description": f"no such user {who!r}"})
            scope = q.get("scope", "")
            offline = ("offline_access" in scope.split()) if provider == "microsoft" \
                else q.get("access_type") == "offline"
            code = ("M." if provider == "microsoft" else "4/") + b64url_encode(secrets.token_bytes(24))
            WORLD.codes[code] = {"client_id": client["client_id"], "redirect_uri": redirect,
                                 "challenge": q.get("code_challenge"), "scope": scope,
                                 "user": user["email"], "expires": now() + CODE_LIFETIME,
                                 "used": False, "offline": offline, "provider": provider}
            WORLD.count(f"authorize:{client['client_id']}")
        params = {"code": code}
        if provider == "microsoft":
            params["session_state"] = str(uuid.uuid4())
        back(params)

    def client_auth(self, provider, form, confidential=False):
        """The client of a token request; `confidential`: a secret is required (client
        credentials), even for a client registered without one."""
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            cid, _, sec = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(sec)
        self.req_client = client_id
        client = WORLD.clients.get(client_id or "")
        if not client or client["provider"] != provider:
            if provider == "microsoft":
                raise OAuthError(400, "unauthorized_client",
                                 f"AADSTS700016: Application with identifier '{client_id}' was "
                                 "not found in the directory.", provider, [700016])
            raise OAuthError(401, "invalid_client", "The OAuth client was not found.", provider)
        if confidential and not secret:
            raise OAuthError(401, "invalid_client", "AADSTS7000218: The request body must "
                             "contain the following parameter: 'client_assertion' or "
                             "'client_secret'.", provider, [7000218])
        if (client["client_secret"] or confidential) and \
                (secret != client["client_secret"] or client.get("secret_revoked")):
            if provider == "microsoft":
                raise OAuthError(401, "invalid_client", "AADSTS7000215: Invalid client secret "
                                 "provided. Ensure the secret being sent in the request is the "
                                 "client secret value, not the client secret ID.", provider,
                                 [7000215])
            raise OAuthError(401, "invalid_client", "Unauthorized", provider)
        expires_at = client.get("client_secret_expires_at")
        if client["client_secret"] and (client.get("secret_expired") or
                                        (expires_at is not None and expires_at < now())):
            if provider == "microsoft":
                raise OAuthError(401, "invalid_client", "AADSTS7000222: The provided client "
                                 f"secret keys for app '{client_id}' are expired. Visit the "
                                 "Azure portal to create new keys for your app: "
                                 "https://aka.ms/NewClientSecret, or consider using "
                                 "certificate credentials for added security: "
                                 "https://aka.ms/certCreds.", provider, [7000222])
            raise OAuthError(401, "invalid_client", "Unauthorized", provider)
        return client

    def issue(self, provider, client, user_email, scope, offline, rotate_from=None):
        lifetime = client.get("access_token_lifetime") or WORLD.default_lifetime
        access = ("eyJ0eXAiOiJKV1Qi." if provider == "microsoft" else "ya29.") + \
            b64url_encode(secrets.token_bytes(32))
        WORLD.access_tokens[access] = {"provider": provider, "user": user_email,
                                       "scope": scope, "expires": now() + lifetime,
                                       "issued": now(), "client_id": client["client_id"],
                                       "valid": True}
        reply = {"access_token": access, "token_type": "Bearer", "expires_in": lifetime,
                 "scope": scope}
        if provider == "microsoft":
            reply["ext_expires_in"] = lifetime
        if offline:
            if rotate_from is None or client.get("rotate_refresh_tokens", provider == "microsoft"):
                refresh = ("M.C5_" if provider == "microsoft" else "1//") + \
                    b64url_encode(secrets.token_bytes(40))
                WORLD.refresh_tokens[refresh] = {"provider": provider, "user": user_email,
                                                 "scope": scope, "client_id": client["client_id"],
                                                 "valid": True}
                reply["refresh_token"] = refresh
                if rotate_from is not None:
                    # Rotation: the token just used is no longer accepted.
                    WORLD.refresh_tokens[rotate_from]["valid"] = False
        return reply

    def token(self, provider, form):
        grant = form.get("grant_type", "")
        if grant == "refresh_token":
            with LOCK:
                delay = (WORLD.clients.get(form.get("client_id", "")) or {}).get("refresh_delay_ms")
            if delay:
                time.sleep(delay / 1000)
                with LOCK:
                    WORLD.count(f"grant:refresh_token_delayed:{form.get('client_id', '')}")
        with LOCK:
            if grant == JWT_BEARER and provider == "google":
                return self.send(200, self.jwt_grant(form))
            app_only = grant == "client_credentials" and provider == "microsoft"
            client = self.client_auth(provider, form, confidential=app_only)
            if grant == "authorization_code":
                reply = self.code_grant(provider, client, form)
            elif grant == "refresh_token":
                reply = self.refresh_grant(provider, client, form)
            elif app_only:
                reply = self.client_credentials_grant(client, form)
            else:
                raise OAuthError(400, "unsupported_grant_type",
                                 f"AADSTS70003: The app requested an unsupported grant type "
                                 f"'{grant}'." if provider == "microsoft" else
                                 "Invalid grant_type: " + grant, provider, [70003])
        self.send(200, reply, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def code_grant(self, provider, client, form):
        code = WORLD.codes.get(form.get("code", ""))
        if not code or code["client_id"] != client["client_id"]:
            raise OAuthError(400, "invalid_grant", "AADSTS9002313: Invalid request. Request is "
                             "malformed or invalid." if provider == "microsoft" else "Malformed "
                             "auth code.", provider, [9002313])
        if code["used"]:
            raise OAuthError(400, "invalid_grant", "AADSTS54005: OAuth2 Authorization code was "
                             "already redeemed, please retry with a new valid code or use an "
                             "existing refresh token." if provider == "microsoft" else
                             "Bad Request", provider, [54005])
        code["used"] = True
        if code["expires"] < now():
            raise OAuthError(400, "invalid_grant", "AADSTS70008: The provided authorization "
                             "code or refresh token has expired due to inactivity."
                             if provider == "microsoft" else "Bad Request", provider, [70008])
        if form.get("redirect_uri") != code["redirect_uri"]:
            if provider == "microsoft":
                raise OAuthError(400, "invalid_grant", "AADSTS70002: The reply URL specified in "
                                 "the request does not match the reply URL used to obtain the "
                                 "authorization code.", provider, [70002])
            raise OAuthError(400, "redirect_uri_mismatch", "Bad Request", provider)
        if code["challenge"]:
            verifier = form.get("code_verifier", "")
            if not re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", verifier) or \
                    b64url_encode(hashlib.sha256(verifier.encode()).digest()) != code["challenge"]:
                raise OAuthError(400, "invalid_grant", "AADSTS501481: The Code_Verifier does "
                                 "not match the code_challenge supplied in the authorization "
                                 "request." if provider == "microsoft" else
                                 "Invalid code verifier.", provider, [501481])
        WORLD.count(f"grant:authorization_code:{client['client_id']}")
        return self.issue(provider, client, code["user"], code["scope"], code["offline"])

    def refresh_grant(self, provider, client, form):
        token = form.get("refresh_token", "")
        record = WORLD.refresh_tokens.get(token)
        WORLD.count(f"grant:refresh_token_attempt:{client['client_id']}")
        if not record or not record["valid"] or record["client_id"] != client["client_id"]:
            raise OAuthError(400, "invalid_grant", "AADSTS70000: The provided value for the "
                             "'refresh_token' is not valid. The refresh token has been revoked "
                             "or used." if provider == "microsoft" else
                             "Token has been expired or revoked.", provider, [70000])
        if record["provider"] == "microsoft" and form.get("scope") is None:
            raise OAuthError(400, "invalid_request", "AADSTS900144: The request body must "
                             "contain the following parameter: 'scope'.", provider, [900144])
        WORLD.count(f"grant:refresh_token:{client['client_id']}")
        return self.issue(provider, client, record["user"], record["scope"], True,
                          rotate_from=token)

    def client_credentials_grant(self, client, form):
        """Microsoft's app-only grant: one `<resource>/.default` scope, no refresh token; the
        token carries the app roles consented now."""
        scope = (form.get("scope") or "").strip()
        if not scope:
            raise OAuthError(400, "invalid_request", "AADSTS900144: The request body must "
                             "contain the following parameter: 'scope'.", "microsoft",
                             [900144])
        parts = scope.split()
        if len(parts) != 1 or not parts[0].endswith("/.default"):
            raise OAuthError(400, "invalid_scope", f"AADSTS1002012: The provided value for "
                             f"scope {scope} is not valid. Client credential flows must have a "
                             "scope value with /.default suffixed to the resource identifier "
                             "(application ID URI).", "microsoft", [1002012])
        resource = parts[0][:-len("/.default")].rstrip("/")
        canonical = next((r for r in APP_RESOURCES if r.lower() == resource.lower()), None)
        if canonical is None:
            raise OAuthError(400, "invalid_resource", f"AADSTS500011: The resource principal "
                             f"named {resource} was not found in the tenant named "
                             f"{getattr(self, 'tenant', 'common')}. This can happen if the "
                             "application has not been installed by the administrator of the "
                             "tenant or consented to by any user in the tenant. You might "
                             "have sent your authentication request to the wrong tenant.",
                             "microsoft", [500011])
        lifetime = client.get("access_token_lifetime") or WORLD.default_lifetime
        access = "eyJ0eXAiOiJKV1Qi." + b64url_encode(secrets.token_bytes(32))
        WORLD.access_tokens[access] = {"provider": "microsoft", "user": None, "app": True,
                                       "roles": list(client.get("app_roles") or []),
                                       "resource": canonical, "scope": canonical + "/.default",
                                       "expires": now() + lifetime, "issued": now(),
                                       "client_id": client["client_id"], "valid": True}
        WORLD.count(f"grant:client_credentials:{client['client_id']}")
        return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                "access_token": access}

    # -- introspection (what the IMAP/POP/SMTP front ends of Exchange and Gmail do) --

    def introspect(self, q, form):
        token = form.get("token", "")
        wanted = (q.get("user") or "").strip().lower()
        # The protocol: the query parameter, else the header Dovecot's oauth2 passdb sends
        # with send_auth_headers = yes.
        raw_service = (q.get("service") or self.headers.get("X-Dovecot-Auth-Service")
                       or "").strip().lower()
        service = SERVICES.get(raw_service) if raw_service else ""
        with LOCK:
            record = WORLD.access_tokens.get(token)
            mailbox = None
            if record is not None:
                self.req_client = record["client_id"]
                self.req_user = record["user"] or wanted or None
                if service is not None:
                    mailbox = self.introspect_mailbox(record, wanted, service)
            if mailbox is None:
                reply = {"active": False}
            else:
                reply = {"active": True, "email": mailbox, "username": mailbox,
                         "scope": " ".join(record["roles"]) if record.get("app")
                         else record["scope"],
                         "client_id": record["client_id"], "token_type": "Bearer",
                         "exp": int(record["expires"]),
                         "iat": int(record.get("issued", record["expires"])),
                         "sub": record["client_id"] if record.get("app") else record["user"]}
                if record.get("app"):
                    reply["aud"] = record["resource"]
        self.send(200, reply, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def introspect_mailbox(self, record, wanted, service):
        """The mailbox this token opens for `service` ('' = any) and login `wanted`, or None."""
        if not record["valid"] or record["expires"] < now():
            return None
        if record.get("app"):
            if not wanted or record["resource"] != OUTLOOK_RESOURCE:
                return None
            roles = {r.lower() for r in record["roles"]}
            if service and APP_ROLE_OF_SERVICE[service].lower() not in roles:
                return None
            client = WORLD.clients.get(record["client_id"]) or {}
            grant = client.get("mailboxes") or []
            if grant != "*" and wanted not in grant:
                return None
            return wanted
        scopes = {s.lower() for s in record["scope"].split()}
        if record["provider"] == "microsoft":
            if service and not any((prefix + DELEGATED_SCOPE_OF_SERVICE[service]).lower()
                                   in scopes for prefix in OUTLOOK_SCOPE_PREFIXES):
                return None
            own = record["user"]
            if wanted and wanted != own.lower() and \
                    wanted in WORLD.full_access.get(own.lower(), ()):
                return wanted
            return own
        if service and GMAIL_SCOPE not in scopes:
            return None
        return record["user"]

    def jwt_grant(self, form):
        def bad(description):
            return OAuthError(400, "invalid_grant", description, "google")
        parts = form.get("assertion", "").split(".")
        if len(parts) != 3:
            raise bad("Invalid JWT: not three parts")
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            raise bad("Invalid JWT: not base64url JSON")
        if header.get("alg") != "RS256":
            raise bad("Invalid JWT: alg must be RS256")
        account = WORLD.service_accounts.get(claims.get("iss", ""))
        self.req_client = claims.get("iss")
        if not account:
            raise bad("Invalid grant: account not found")
        if not rs256_verify(account["n"], account["e"], f"{parts[0]}.{parts[1]}".encode(),
                            signature):
            raise bad("Invalid JWT Signature.")
        audience = self.base_url() + "/token"
        if claims.get("aud") != audience:
            raise bad(f"Invalid JWT: the aud claim must be {audience}")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > 3600 or \
                exp < now() or iat > now() + 300:
            raise bad("Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                      "reasonable timeframe. Check your iat and exp values in the JWT claim.")
        if not claims.get("scope"):
            raise OAuthError(400, "invalid_scope", "Invalid OAuth scope or ID token audience "
                             "provided.", "google")
        subject = claims.get("sub") or ""
        delegated = account["delegated"]
        if not subject or (delegated != "*" and subject.lower() not in delegated):
            raise OAuthError(401, "unauthorized_client", "Client is unauthorized to retrieve "
                             "access tokens using this method, or client not authorized for any "
                             "of the scopes requested.", "google")
        if not WORLD.user("google", subject):
            raise bad("Invalid email or User ID")
        WORLD.count(f"grant:jwt:{claims['iss']}")
        client = {"client_id": claims["iss"], "access_token_lifetime":
                  account.get("access_token_lifetime")}
        return self.issue("google", client, WORLD.user("google", subject)["email"],
                          claims["scope"], False)

    # -- bearer tokens --

    def bearer(self, provider):
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.startswith("Bearer ") else ""
        record = WORLD.access_tokens.get(token)
        if record and record["provider"] == provider:
            self.req_user = record["user"]
            self.req_client = record["client_id"]
        if provider == "microsoft":
            headers = GRAPH_WWW_AUTHENTICATE
            if not token:
                raise ApiError("graph", 401, "InvalidAuthenticationToken",
                               "Access token is empty.", headers=headers)
            if not record or record["provider"] != provider:
                raise ApiError("graph", 401, "InvalidAuthenticationToken",
                               "IDX14100: JWT is not well formed, there are no dots (.).",
                               headers=headers)
            if not record["valid"] or record["expires"] < now():
                raise ApiError("graph", 401, "InvalidAuthenticationToken",
                               "Lifetime validation failed, the token is expired.",
                               headers=headers)
        else:
            headers = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                       'error="invalid_token"'}
            if not record or record["provider"] != provider or not record["valid"] or \
                    record["expires"] < now():
                raise ApiError("gmail", 401, "UNAUTHENTICATED",
                               "Request had invalid authentication credentials. Expected OAuth "
                               "2 access token, login cookie or other valid authentication "
                               "credential. See https://developers.google.com/identity/sign-in/"
                               "web/devconsole-project.", reason="authError", headers=headers)
        return record

    # -- Microsoft Graph --

    def graph(self, method, path, q, body):
        other = re.fullmatch(r"/users/([^/]+)(/.*)?", path)
        with LOCK:
            record = self.bearer("microsoft")
            if record.get("app"):
                if record["resource"] != GRAPH_RESOURCE:
                    raise ApiError("graph", 401, "InvalidAuthenticationToken",
                                   "Access token validation failure. Invalid audience.",
                                   headers=GRAPH_WWW_AUTHENTICATE)
                if not other:
                    raise ApiError("graph", 400, "BadRequest", "/me request is only valid "
                                   "with delegated authentication flow.")
            if other:
                self.req_user = urllib.parse.unquote(other.group(1))
        if self.apply_fault(method, "/v1.0" + path):
            return
        with LOCK:
            if other:
                user = self.graph_mailbox(record, urllib.parse.unquote(other.group(1)))
                scopes = {r.lower() for r in record["roles"]} if record.get("app") else \
                    {s.lower() for s in record["scope"].split()}
                return self.graph_route(method, "/me" + (other.group(2) or ""), q, body, user,
                                        scopes, "/users/" + other.group(1))
            user = WORLD.user("microsoft", record["user"])
            scopes = {s.lower() for s in record["scope"].split()}
            return self.graph_route(method, path, q, body, user, scopes)

    def graph_mailbox(self, record, ref):
        """The mailbox of `/users/{ref}` (address or id), if this token may open it."""
        user = WORLD.user("microsoft", ref) or next(
            (u for u in WORLD.users.values() if u["provider"] == "microsoft" and u["id"] == ref),
            None)
        if not user:
            raise ApiError("graph", 404, "ErrorInvalidUser",
                           f"The requested user '{ref}' is invalid.")
        address = user["email"].lower()
        if record.get("app"):
            grant = (WORLD.clients.get(record["client_id"]) or {}).get("mailboxes") or []
            if grant != "*" and address not in grant:
                raise ApiError("graph", 403, "ErrorAccessDenied", "Access to OData is "
                               "disabled: [RAOP] : Blocked by tenant configured AppOnly "
                               "AccessPolicy settings.")
        else:
            own = record["user"].lower()
            if address != own and address not in WORLD.full_access.get(own, ()):
                raise ApiError("graph", 403, "ErrorAccessDenied",
                               "Access is denied. Check credentials and try again.")
        return user

    def graph_need(self, scopes, *any_of):
        if not any(s.lower() in scopes for s in any_of):
            raise ApiError("graph", 403, "ErrorAccessDenied",
                           "Access is denied. Check credentials and try again.")

    def graph_route(self, method, path, q, body, user, scopes, prefix="/me"):
        """`path` starts with /me; `prefix` is what the request said instead (/users/x)."""
        base = self.base_url() + "/v1.0"
        link = base + prefix + path[len("/me"):]
        if path == "/me" and method == "GET":
            self.graph_need(scopes, "user.read", "mail.read", "mail.readwrite")
            return self.send(200, {"@odata.context": base + "/$metadata#users/$entity",
                                   "id": user["id"], "displayName": user["display_name"],
                                   "mail": user["mail"], "userPrincipalName": user["email"]})
        if path == "/me/sendMail" and method == "POST":
            self.graph_need(scopes, "mail.send")
            return self.graph_send(body, user)
        if path == "/me/mailFolders" and method in ("GET", "POST"):
            return self.graph_folders(method, "root", q, body, user, scopes, link)
        # Graph writes its own links as mailfolders('{id}'); both spellings are accepted.
        m = re.fullmatch(r"/me/mailfolders(?:\('([^']+)'\)|/([^/]+))/messages/delta",
                         urllib.parse.unquote(path), re.IGNORECASE)
        if m and method == "GET":
            folder = graph_folder(user, m.group(1) or m.group(2))
            if not folder:
                raise ApiError("graph", 404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
            self.graph_need(scopes, "mail.read", "mail.readbasic", "mail.readwrite")
            return self.graph_delta(folder, q, user, base + prefix)
        m = re.fullmatch(r"/me/mailFolders/([^/]+)(/childFolders|/messages)?", path)
        if m:
            folder = graph_folder(user, urllib.parse.unquote(m.group(1)))
            if not folder:
                raise ApiError("graph", 404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
            if m.group(2) == "/childFolders":
                return self.graph_folders(method, folder["id"], q, body, user, scopes,
                                          link)
            if m.group(2) == "/messages" and method == "GET":
                self.graph_need(scopes, "mail.read", "mail.readwrite")
                return self.graph_list(folder, q, user, link)
            if m.group(2) is None and method == "GET":
                self.graph_need(scopes, "mail.read", "mail.readwrite")
                return self.send(200, self.folder_json(user, folder))
        m = re.fullmatch(r"/me/messages/([^/]+)(/\$value|/move)?", path)
        if m:
            mid = urllib.parse.unquote(m.group(1))
            msg = user["messages"].get(mid)
            if not msg:
                raise ApiError("graph", 404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
            action = m.group(2)
            if action == "/$value" and method == "GET":
                self.graph_need(scopes, "mail.read", "mail.readwrite")
                return self.send(200, msg["raw"], "text/plain")
            if action is None and method == "GET":
                self.graph_need(scopes, "mail.read", "mail.readwrite")
                return self.send(200, self.message_json(msg, None))
            if action is None and method == "PATCH":
                self.graph_need(scopes, "mail.readwrite")
                changes = json.loads(body or b"{}")
                if "isRead" in changes:
                    msg["isRead"] = bool(changes["isRead"])
                msg["lastModified"] = now()
                graph_touch(user, msg)
                return self.send(200, self.message_json(msg, None))
            if action is None and method == "DELETE":
                self.graph_need(scopes, "mail.readwrite")
                deleted = graph_folder(user, "deleteditems")
                if msg["folder"] == deleted["id"]:
                    del user["messages"][mid]
                    graph_left(user, mid, deleted["id"])
                else:
                    self.graph_move(user, msg, deleted["id"])
                return self.send(204)
            if action == "/move" and method == "POST":
                self.graph_need(scopes, "mail.readwrite")
                target = graph_folder(user, json.loads(body or b"{}").get("destinationId", ""))
                if not target:
                    raise ApiError("graph", 400, "ErrorInvalidIdMalformed",
                                   "Id is malformed.")
                moved = self.graph_move(user, msg, target["id"])
                return self.send(201, self.message_json(moved, None))
        raise ApiError("graph", 400, "BadRequest",
                       f"Resource not found for the segment '{path.rsplit('/', 1)[-1]}'.")

    def immutable(self):
        return 'immutableid' in self.headers.get("Prefer", "").lower().replace('"', '')

    def graph_move(self, user, msg, folder_id):
        graph_left(user, msg["id"], msg["folder"])
        msg["folder"] = folder_id
        msg["lastModified"] = now()
        if not self.immutable():
            # Without immutable ids a move gives the message a new id (as Exchange does).
            del user["messages"][msg["id"]]
            msg["id"] = "AAMk" + b64url_encode(secrets.token_bytes(24))
            user["messages"][msg["id"]] = msg
        graph_touch(user, msg, entered=True)
        return msg

    def graph_send(self, body, user):
        ctype = self.headers.get("Content-Type", "")
        if len(body) > GRAPH_MAX_REQUEST:
            raise ApiError("graph", 413, "RequestEntityTooLarge",
                           "The request is larger than 4 MB.")
        if ctype.startswith("text/plain"):
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError("graph", 400, "ErrorMimeContentInvalidBase64String",
                               "Invalid base64 string for MIME content.")
            if b"\n\n" not in raw.replace(b"\r\n", b"\n") or b":" not in raw.split(b"\n", 1)[0]:
                raise ApiError("graph", 400, "ErrorMimeContentInvalid",
                               "The MIME content is not valid.")
            WORLD.sent.append({"via": "graph", "user": user["email"], "format": "mime",
                               "raw_b64": base64.b64encode(raw).decode(), "t": now(),
                               "headers": header_summary(raw)})
            # The MIME send takes no parameters: the copy is saved (saveToSentItems's default).
            self.graph_save_sent(user, raw)
        elif ctype.startswith("application/json"):
            request = json.loads(body or b"{}")
            message = request.get("message")
            if not isinstance(message, dict):
                raise ApiError("graph", 400, "ErrorInvalidParameter",
                               "The value of the parameter 'Message' is empty.")
            WORLD.sent.append({"via": "graph", "user": user["email"], "format": "json",
                               "json": message, "t": now()})
            if str(request.get("saveToSentItems", True)).lower() != "false":
                content = (message.get("body") or {}).get("content") or ""
                raw = (f"From: {user['email']}\r\nSubject: {message.get('subject') or ''}\r\n"
                       f"\r\n{content}\r\n").encode()
                self.graph_save_sent(user, raw)
        else:
            raise ApiError("graph", 415, "UnsupportedMediaType",
                           "Content-Type must be text/plain (MIME) or application/json.")
        return self.send(202)

    def graph_save_sent(self, user, raw):
        """The sent copy in the sending mailbox's Sent Items (read, as Exchange saves it)."""
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        seq = sum(len(u["messages"]) for u in WORLD.users.values()) + len(WORLD.sent)
        mid = "AAMk" + b64url_encode(secrets.token_bytes(24))
        user["messages"][mid] = {
            "id": mid, "raw": raw, "subject": str(parsed.get("Subject", "")),
            "messageId": str(parsed.get("Message-ID", "")), "received": now(),
            "lastModified": now(), "seq": seq, "isRead": True,
            "folder": graph_folder(user, "sentitems")["id"]}
        graph_touch(user, user["messages"][mid], entered=True)

    def folder_json(self, user, folder):
        items = [m for m in user["messages"].values() if m["folder"] == folder["id"]]
        return {"id": folder["id"], "displayName": folder["displayName"],
                "parentFolderId": folder["parentFolderId"],
                "childFolderCount": sum(1 for f in user["folders"].values()
                                        if f["parentFolderId"] == folder["id"]),
                "unreadItemCount": sum(1 for m in items if not m["isRead"]),
                "totalItemCount": len(items)}

    def graph_folders(self, method, parent, q, body, user, scopes, url):
        if method == "POST":
            self.graph_need(scopes, "mail.readwrite")
            name = (json.loads(body or b"{}").get("displayName") or "").strip()
            if not name:
                raise ApiError("graph", 400, "ErrorInvalidParameter", "displayName is required")
            for f in user["folders"].values():
                if f["parentFolderId"] == parent and f["displayName"].lower() == name.lower():
                    raise ApiError("graph", 409, "ErrorFolderExists",
                                   "A folder with the specified name already exists.")
            fid = "AAMkFolder" + b64url_encode(secrets.token_bytes(12))
            user["folders"][fid] = {"id": fid, "displayName": name, "parentFolderId": parent}
            return self.send(201, self.folder_json(user, user["folders"][fid]))
        if method != "GET":
            raise ApiError("graph", 405, "MethodNotAllowed", "method not allowed")
        self.graph_need(scopes, "mail.read", "mail.readwrite")
        folders = [self.folder_json(user, f) for f in user["folders"].values()
                   if f["parentFolderId"] == parent]
        return self.send(200, self.page(folders, q, url, 10))

    def page(self, items, q, url, default_top):
        top = max(1, min(int(q.get("$top", default_top)), 1000))
        skip = int(q.get("$skip", 0))
        result = {"value": items[skip:skip + top]}
        if skip + top < len(items):
            params = dict(q)
            params["$skip"] = str(skip + top)
            result["@odata.nextLink"] = url + "?" + urllib.parse.urlencode(params)
        return result

    def message_json(self, msg, q):
        data = {"id": msg["id"], "internetMessageId": msg["messageId"],
                "isRead": msg["isRead"], "subject": msg["subject"],
                "receivedDateTime": datetime.fromtimestamp(msg["received"], timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lastModifiedDateTime": datetime.fromtimestamp(msg["lastModified"], timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "parentFolderId": msg["folder"]}
        if q and "singleValueExtendedProperties" in q.get("$expand", ""):
            data["singleValueExtendedProperties"] = [{"id": "Integer 0xe08",
                                                      "value": str(len(msg["raw"]))}]
        return data

    def graph_delta(self, folder, q, user, base):
        """One page of a delta round on `folder` (see the module's documentation)."""
        token = q.get("$skiptoken") or q.get("$deltatoken")
        if token:
            state = WORLD.delta_tokens.get(token)
            if not state or state["user"] != user["email"].lower() or \
                    state["folder"] != folder["id"]:
                raise ApiError("graph", 410, "SyncStateNotFound",
                               "The sync state was not found; start a new round.")
            if state["generation"] != user["sync_generation"]:
                refusal = user["sync_refusal"] or {}
                raise ApiError("graph", int(refusal.get("status", 410)),
                               refusal.get("code", "SyncStateNotFound"),
                               "The sync state is no longer valid; start a new round.")
            params = state["params"]
            if "$deltatoken" in q and "$skiptoken" not in q:
                # A new round: what changed since the last one began.
                since, upto, after = state["upto"], user["changes"], 0
            else:
                since, upto, after = state["since"], state["upto"], state["after"]
        else:
            params = {k: v for k, v in q.items() if k in ("$select", "$expand", "changeType")}
            change_type = params.get("changeType")
            if change_type not in (None, "created", "updated", "deleted"):
                raise ApiError("graph", 400, "BadRequest",
                               f"Invalid changeType '{change_type}'.")
            since, upto, after = None, user["changes"], 0
        size = 10
        prefer = re.search(r"odata\.maxpagesize=(\d+)", self.headers.get("Prefer", ""))
        if prefer:
            size = int(prefer.group(1))
        elif q.get("$top"):
            size = int(q["$top"])
        size = max(1, min(size, 1000))
        entries = []
        change_type = params.get("changeType")
        for msg in user["messages"].values():
            if msg["folder"] != folder["id"] or msg["changed"] > upto:
                continue
            if since is not None:
                if msg["changed"] <= since:
                    continue
                if change_type == "created" and msg["entered"] <= since:
                    continue
                if change_type == "updated" and msg["entered"] > since:
                    continue
                if change_type == "deleted":
                    continue
            entries.append((msg["changed"], msg, None))
        if since is not None and change_type in (None, "deleted"):
            for tomb in user["tombstones"]:
                msg = user["messages"].get(tomb["id"])
                if tomb["folder"] == folder["id"] and since < tomb["seq"] <= upto and \
                        not (msg and msg["folder"] == folder["id"]):
                    entries.append((tomb["seq"], None, tomb["id"]))
        entries = sorted((e for e in entries if e[0] > after), key=lambda e: e[0])
        chunk, rest = entries[:size], entries[size:]
        value = []
        for _, msg, removed in chunk:
            if msg is None:
                value.append({"@odata.type": "#microsoft.graph.message", "id": removed,
                              "@removed": {"reason": "deleted"}})
            else:
                data = self.message_json(msg, params)
                data["@odata.type"] = "#microsoft.graph.message"
                value.append(data)
        new = b64url_encode(secrets.token_bytes(24))
        state = {"user": user["email"].lower(), "folder": folder["id"], "params": params,
                 "generation": user["sync_generation"], "since": since, "upto": upto,
                 "after": chunk[-1][0] if chunk else after}
        WORLD.delta_tokens[new] = state
        link = f"{base}/mailFolders('{folder['id']}')/messages/delta?"
        result = {"@odata.context": base + "/$metadata#Collection(message)", "value": value}
        # As Graph writes them: `$` unencoded (the token is URL-safe base64).
        if rest:
            result["@odata.nextLink"] = link + "$skiptoken=" + new
        else:
            result["@odata.deltaLink"] = link + "$deltatoken=" + new
        return self.send(200, result)

    def graph_list(self, folder, q, user, url):
        items = [m for m in user["messages"].values() if m["folder"] == folder["id"]]
        order = q.get("$orderby", "receivedDateTime desc").split()
        items.sort(key=lambda m: (m["received"], m["seq"]),
                   reverse=len(order) > 1 and order[1].lower() == "desc")
        return self.send(200, self.page([self.message_json(m, q) for m in items], q, url, 10))

    # -- Gmail --

    def gmail(self, method, path, q, body):
        upload = path.startswith("/upload/")
        rest = path[len("/upload/gmail/v1/users/" if upload else "/gmail/v1/users/"):]
        user_ref, _, sub = rest.partition("/")
        user_ref = urllib.parse.unquote(user_ref)
        with LOCK:
            record = self.bearer("google")
        if self.apply_fault(method, path):
            return
        with LOCK:
            if user_ref != "me" and user_ref.lower() != record["user"].lower():
                raise ApiError("gmail", 403, "PERMISSION_DENIED",
                               f"Delegation denied for {record['user']}", reason="forbidden")
            user = WORLD.user("google", record["user"])
            return self.gmail_route(method, "/" + sub, q, body, user, upload)

    def gmail_message(self, user, mid):
        msg = user["messages"].get(mid)
        if not msg:
            raise ApiError("gmail", 404, "NOT_FOUND", "Requested entity was not found.",
                           reason="notFound")
        return msg

    def gmail_json(self, msg, fmt):
        data = {"id": msg["id"], "threadId": msg["threadId"], "labelIds": msg["labels"],
                "snippet": msg["subject"][:100], "sizeEstimate": len(msg["raw"]),
                "historyId": str(msg["history"]), "internalDate": str(int(msg["received"] * 1000))}
        if fmt == "raw":
            data["raw"] = base64.urlsafe_b64encode(msg["raw"]).decode()
        elif fmt in ("full", "metadata"):
            data["payload"] = {"headers": [{"name": k, "value": v}
                                           for k, v in header_summary(msg["raw"]).items() if v]}
        return data

    def gmail_labels(self, user, ids):
        for label in ids:
            if label not in user["labels"]:
                raise ApiError("gmail", 400, "INVALID_ARGUMENT", f"Invalid label: {label}",
                               reason="invalidArgument")

    def gmail_route(self, method, path, q, body, user, upload):
        if path == "/profile" and method == "GET":
            return self.send(200, {"emailAddress": user["email"],
                                   "messagesTotal": len(user["messages"]),
                                   "threadsTotal": len(user["messages"]),
                                   "historyId": str(user["history"])})
        if path == "/messages/send" and method == "POST":
            return self.gmail_send(body, user, upload, q)
        if path == "/history" and method == "GET":
            return self.gmail_history_list(user, q)
        if path == "/messages" and method == "GET":
            wanted = [v for k, vs in urllib.parse.parse_qs(
                urllib.parse.urlsplit(self.path).query).items() if k == "labelIds" for v in vs]
            spam_trash = q.get("includeSpamTrash", "false") == "true"
            items = [m for m in user["messages"].values()
                     if all(label in m["labels"] for label in wanted) and
                     (spam_trash or not {"SPAM", "TRASH"} & set(m["labels"]))]
            items.sort(key=lambda m: (m["received"], m["seq"]), reverse=True)
            size = max(1, min(int(q.get("maxResults", 100)), 500))
            start = int(b64url_decode(q["pageToken"]).decode()) if q.get("pageToken") else 0
            chunk = items[start:start + size]
            result = {"resultSizeEstimate": len(items)}
            if chunk:
                result["messages"] = [{"id": m["id"], "threadId": m["threadId"]} for m in chunk]
            if start + size < len(items):
                result["nextPageToken"] = b64url_encode(str(start + size).encode())
            return self.send(200, result)
        if path == "/messages/batchModify" and method == "POST":
            req = json.loads(body or b"{}")
            self.gmail_labels(user, req.get("addLabelIds", []) + req.get("removeLabelIds", []))
            for mid in req.get("ids", []):
                if mid in user["messages"]:
                    self.gmail_relabel(user, user["messages"][mid], req)
            return self.send(204)
        m = re.fullmatch(r"/messages/([^/]+)(/modify|/trash|/untrash)?", path)
        if m:
            msg = self.gmail_message(user, urllib.parse.unquote(m.group(1)))
            if m.group(2) is None and method == "GET":
                return self.send(200, self.gmail_json(msg, q.get("format", "full")))
            if m.group(2) == "/modify" and method == "POST":
                req = json.loads(body or b"{}")
                self.gmail_labels(user, req.get("addLabelIds", []) +
                                  req.get("removeLabelIds", []))
                self.gmail_relabel(user, msg, req)
                return self.send(200, self.gmail_json(msg, "minimal"))
            if m.group(2) == "/trash" and method == "POST":
                self.gmail_relabel(user, msg, {"addLabelIds": ["TRASH"]})
                return self.send(200, self.gmail_json(msg, "minimal"))
        if path == "/labels" and method == "GET":
            return self.send(200, {"labels": [self.label_json(user, lb, False)
                                              for lb in user["labels"].values()]})
        if path == "/labels" and method == "POST":
            req = json.loads(body or b"{}")
            name = (req.get("name") or "").strip()
            if not name:
                raise ApiError("gmail", 400, "INVALID_ARGUMENT", "Invalid label name",
                               reason="invalidArgument")
            if any(lb["name"].lower() == name.lower() for lb in user["labels"].values()):
                raise ApiError("gmail", 409, "ALREADY_EXISTS",
                               "Label name exists or conflicts", reason="duplicate")
            lid = "Label_" + str(len(user["labels"]) + 1)
            user["labels"][lid] = {"id": lid, "name": name, "type": "user",
                                   "labelListVisibility": req.get("labelListVisibility"),
                                   "messageListVisibility": req.get("messageListVisibility")}
            return self.send(200, self.label_json(user, user["labels"][lid], False))
        m = re.fullmatch(r"/labels/([^/]+)", path)
        if m and method == "GET":
            label = user["labels"].get(urllib.parse.unquote(m.group(1)))
            if not label:
                raise ApiError("gmail", 404, "NOT_FOUND", "Requested entity was not found.",
                               reason="notFound")
            return self.send(200, self.label_json(user, label, True))
        raise ApiError("gmail", 404, "NOT_FOUND", f"no route {method} {path}",
                       reason="notFound")

    def gmail_history_list(self, user, q):
        start = q.get("startHistoryId", "")
        if not start.strip().isdigit():
            raise ApiError("gmail", 400, "INVALID_ARGUMENT",
                           "Invalid startHistoryId" if start else
                           "Missing required parameter: startHistoryId",
                           reason="invalidArgument")
        start = int(start)
        if start < user["history_floor"]:
            raise ApiError("gmail", 404, "NOT_FOUND", "Requested entity was not found.",
                           reason="notFound")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        kinds = {"messageAdded": "messagesAdded", "messageDeleted": "messagesDeleted",
                 "labelAdded": "labelsAdded", "labelRemoved": "labelsRemoved"}
        wanted = query.get("historyTypes", [])
        for kind in wanted:
            if kind not in kinds:
                raise ApiError("gmail", 400, "INVALID_ARGUMENT",
                               f"Invalid value at 'history_types' ({kind})",
                               reason="invalidArgument")
        wanted = {kinds[k] for k in wanted} or set(kinds.values())
        label = q.get("labelId")
        after = int(b64url_decode(q["pageToken"]).decode()) if q.get("pageToken") else start
        size = max(1, min(int(q.get("maxResults", 100)), 500))
        records = [r for r in user["history_log"] if r["id"] > after and
                   r["kind"] in wanted and
                   (not label or label in r["entry"]["message"]["labelIds"])]
        chunk = records[:size]
        result = {"historyId": str(user["history"])}
        if chunk:
            result["history"] = [{"id": str(r["id"]),
                                  "messages": [{"id": r["entry"]["message"]["id"],
                                                "threadId": r["entry"]["message"]["threadId"]}],
                                  r["kind"]: [r["entry"]]} for r in chunk]
        if len(records) > size:
            result["nextPageToken"] = b64url_encode(str(chunk[-1]["id"]).encode())
        return self.send(200, result)

    def label_json(self, user, label, counts):
        data = {k: v for k, v in label.items() if v is not None}
        if counts:
            items = [m for m in user["messages"].values() if label["id"] in m["labels"]]
            data["messagesTotal"] = len(items)
            data["messagesUnread"] = sum(1 for m in items if "UNREAD" in m["labels"])
            data["threadsTotal"] = len(items)
        return data

    def gmail_relabel(self, user, msg, req):
        removed = [lb for lb in req.get("removeLabelIds", []) if lb in msg["labels"]]
        labels = [lb for lb in msg["labels"] if lb not in removed]
        added = []
        for lb in req.get("addLabelIds", []):
            if lb not in labels:
                labels.append(lb)
                added.append(lb)
        msg["labels"] = labels
        if added:
            gmail_history(user, "labelsAdded", msg, added)
        if removed:
            gmail_history(user, "labelsRemoved", msg, removed)

    def gmail_send(self, body, user, upload, q):
        if upload:
            if q.get("uploadType") != "media":
                raise ApiError("gmail", 400, "INVALID_ARGUMENT", "uploadType must be media",
                               reason="invalidArgument")
            if not self.headers.get("Content-Type", "").startswith("message/rfc822"):
                raise ApiError("gmail", 400, "INVALID_ARGUMENT",
                               "Media type 'x' is not supported. Valid media types: [message/*]",
                               reason="badContent")
            if len(body) > GMAIL_MAX_UPLOAD:
                raise ApiError("gmail", 413, "FAILED_PRECONDITION", "Request too large",
                               reason="uploadTooLarge")
            raw = body
        else:
            try:
                raw = b64url_decode(json.loads(body or b"{}").get("raw") or "")
            except (ValueError, binascii.Error):
                raise ApiError("gmail", 400, "INVALID_ARGUMENT",
                               "Invalid value at 'message.raw' (TYPE_BYTES), Base64 decoding "
                               "failed", reason="invalidArgument")
        if not raw:
            raise ApiError("gmail", 400, "FAILED_PRECONDITION", "Recipient address required",
                           reason="failedPrecondition")
        mid = secrets.token_hex(8)
        WORLD.sent.append({"via": "gmail", "user": user["email"], "format": "upload"
                           if upload else "raw", "raw_b64": base64.b64encode(raw).decode(),
                           "t": now(), "id": mid, "headers": header_summary(raw)})
        return self.send(200, {"id": mid, "threadId": mid, "labelIds": ["SENT"]})

    # -- admin --

    def admin(self, method, path, q, body):
        req = json.loads(body or b"{}") if method == "POST" else {}
        with LOCK:
            if path == "/_admin/health":
                return self.send(200, {"ok": True})
            if path == "/_admin/reset" and method == "POST":
                WORLD.reset()
                return self.send(200, {"ok": True})
            if path == "/_admin/clients" and method == "POST":
                provider = req["provider"]
                cid = req.get("client_id") or str(uuid.uuid4())
                WORLD.clients[cid] = {
                    "provider": provider, "client_id": cid,
                    "client_secret": req.get("client_secret", secrets.token_urlsafe(24)),
                    "redirect_uris": req.get("redirect_uris") or [],
                    "access_token_lifetime": req.get("access_token_lifetime"),
                    "rotate_refresh_tokens": req.get("rotate_refresh_tokens",
                                                     provider == "microsoft"),
                    "client_secret_expires_at": req.get("client_secret_expires_at"),
                    "app_roles": list(req.get("app_roles") or []),
                    "refresh_delay_ms": req.get("refresh_delay_ms"),
                    "mailboxes": mailbox_grant(req.get("mailboxes"))}
                return self.send(200, WORLD.clients[cid])
            if path == "/_admin/app_access" and method == "POST":
                client = WORLD.clients.get(req.get("client_id") or "")
                if not client:
                    return self.send(404, {"error": "no such client"})
                if "app_roles" in req:
                    client["app_roles"] = list(req["app_roles"] or [])
                if "mailboxes" in req:
                    client["mailboxes"] = mailbox_grant(req["mailboxes"])
                return self.send(200, client)
            if path == "/_admin/revoke_secret" and method == "POST":
                client = WORLD.clients.get(req.get("client_id") or "")
                if not client:
                    return self.send(404, {"error": "no such client"})
                client["secret_expired" if req.get("expired") else "secret_revoked"] = True
                return self.send(200, {"client_id": client["client_id"]})
            if path == "/_admin/full_access" and method == "POST":
                WORLD.full_access[req["user"].lower()] = {m.lower() for m in req["mailboxes"]}
                return self.send(200, {"user": req["user"],
                                       "mailboxes": sorted(WORLD.full_access[req["user"].lower()])})
            if path == "/_admin/users" and method == "POST":
                provider, address = req["provider"], req["email"]
                user = new_user(provider, address, req.get("display_name", address),
                                req.get("mail", address))
                WORLD.users[(provider, address.lower())] = user
                return self.send(200, {"email": address, "id": user["id"]})
            if path == "/_admin/service_accounts" and method == "POST":
                n, e = parse_rsa_public_key(req["public_key_pem"])
                delegated = req.get("delegated", "*")
                if delegated != "*":
                    delegated = [d.lower() for d in delegated]
                WORLD.service_accounts[req["client_email"]] = {
                    "n": n, "e": e, "delegated": delegated,
                    "access_token_lifetime": req.get("access_token_lifetime")}
                return self.send(200, {"client_email": req["client_email"]})
            if path == "/_admin/seed" and method == "POST":
                if "raws_b64" in req:
                    ids = [self.seed(dict(req, raw_b64=raw))["id"] for raw in req["raws_b64"]]
                    return self.send(200, {"ids": ids})
                return self.send(200, self.seed(req))
            if path == "/_admin/sent" and method == "GET":
                user = (q.get("user") or "").lower()
                return self.send(200, {"sent": [s for s in WORLD.sent
                                                if not user or s["user"].lower() == user]})
            if path == "/_admin/mailbox" and method == "GET":
                user = WORLD.user(q["provider"], q["user"])
                if not user:
                    return self.send(404, {"error": "no such user"})
                return self.send(200, self.mailbox_dump(user))
            if path == "/_admin/fault" and method == "POST":
                fault = {"path": req["path"], "method": req.get("method"),
                         "user": req.get("user"), "client_id": req.get("client_id"),
                         "status": int(req["status"]), "retry_after": req.get("retry_after"),
                         "retry_after_date": req.get("retry_after_date", False),
                         "count": int(req.get("count", 1)), "body": req.get("body"),
                         "content_type": req.get("content_type", "application/json"),
                         "id": len(WORLD.faults)}
                WORLD.faults.append(fault)
                return self.send(200, {"id": fault["id"]})
            if path == "/_admin/revoke" and method == "POST":
                revoked = 0
                for record in WORLD.refresh_tokens.values():
                    if (not req.get("user") or record["user"].lower() == req["user"].lower()) \
                            and (not req.get("client_id") or
                                 record["client_id"] == req["client_id"]) and record["valid"]:
                        record["valid"] = False
                        revoked += 1
                return self.send(200, {"revoked": revoked})
            if path == "/_admin/expire_access_tokens" and method == "POST":
                if not any(req.get(k) for k in ("user", "client_id", "token")):
                    return self.send(400, {"error": "name a user, client_id or token"})
                expired = 0
                for token, record in WORLD.access_tokens.items():
                    if req.get("user") and (record["user"] or "").lower() != req["user"].lower():
                        continue
                    if req.get("client_id") and record["client_id"] != req["client_id"]:
                        continue
                    if req.get("token") and token != req["token"]:
                        continue
                    if record["valid"]:
                        record["valid"] = False
                        expired += 1
                return self.send(200, {"expired": expired})
            if path == "/_admin/sync_state" and method == "POST":
                user = WORLD.user(req["provider"], req["user"])
                if not user:
                    return self.send(404, {"error": "no such user"})
                if req["provider"] == "microsoft":
                    user["sync_generation"] += 1
                    user["sync_refusal"] = {"status": int(req.get("status", 410)),
                                            "code": req.get("code", "SyncStateNotFound")}
                    return self.send(200, {"generation": user["sync_generation"]})
                user["history"] += 1
                user["history_floor"] = user["history"]
                user["history_log"] = []
                return self.send(200, {"history_floor": user["history_floor"]})
            if path == "/_admin/stats" and method == "GET":
                cid = q.get("client_id", "")
                user = (q.get("user") or "").lower()
                grants = {k.split(":")[1]: v for k, v in WORLD.stats.items()
                          if k.startswith("grant:") and k.endswith(":" + cid)}
                valid = sum(1 for r in WORLD.refresh_tokens.values()
                            if r["valid"] and (not cid or r["client_id"] == cid) and
                            (not user or r["user"].lower() == user))
                requests = [{k: v for k, v in entry.items() if k != "t"}
                            for entry in WORLD.log
                            if (not user or (entry["user"] or "").lower() == user) and
                            (not cid or entry["client_id"] == cid)]
                return self.send(200, {"grants": grants, "valid_refresh_tokens": valid,
                                       "requests": requests})
        self.send(404, {"error": f"no admin route {method} {path}"})

    def seed(self, req):
        provider = req["provider"]
        user = WORLD.user(provider, req["user"])
        if not user:
            raise ApiError("graph", 404, "NoSuchUser", "no such user " + req["user"])
        raw = base64.b64decode(req["raw_b64"])
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        seq = sum(len(u["messages"]) for u in WORLD.users.values()) + len(WORLD.sent)
        received = req.get("received", now() + seq * 1e-6)
        msg = {"raw": raw, "subject": str(parsed.get("Subject", "")),
               "messageId": str(parsed.get("Message-ID", "")), "received": received,
               "lastModified": received, "seq": seq, "isRead": bool(req.get("is_read"))}
        if provider == "microsoft":
            folder = graph_folder(user, req.get("folder", "inbox"))
            if not folder:
                folder = next((f for f in user["folders"].values()
                               if f["displayName"].lower() == req["folder"].lower()), None)
            if not folder:
                raise ApiError("graph", 404, "ErrorItemNotFound", "no such folder")
            msg["id"] = "AAMk" + b64url_encode(secrets.token_bytes(24))
            msg["folder"] = folder["id"]
            graph_touch(user, msg, entered=True)
        else:
            labels = list(req.get("labels", ["INBOX"]))
            if not req.get("is_read") and "UNREAD" not in labels:
                labels.append("UNREAD")
            msg["id"] = secrets.token_hex(8)
            msg["threadId"] = msg["id"]
            msg["labels"] = labels
            gmail_history(user, "messagesAdded", msg)
        user["messages"][msg["id"]] = msg
        return {"id": msg["id"]}

    def mailbox_dump(self, user):
        out = []
        for msg in sorted(user["messages"].values(), key=lambda m: m["seq"]):
            entry = {"id": msg["id"], "subject": msg["subject"], "message_id": msg["messageId"],
                     "size": len(msg["raw"])}
            if user["provider"] == "microsoft":
                folder = user["folders"][msg["folder"]]
                entry.update({"folder": folder["displayName"], "folder_id": folder["id"],
                              "is_read": msg["isRead"]})
            else:
                entry.update({"labels": msg["labels"],
                              "label_names": [user["labels"][lb]["name"]
                                              for lb in msg["labels"] if lb in user["labels"]],
                              "is_read": "UNREAD" not in msg["labels"]})
            out.append(entry)
        folders = list(user["folders"].values()) if user["provider"] == "microsoft" else \
            list(user["labels"].values())
        return {"messages": out, "folders": folders}


def mailbox_grant(value):
    """An app's mailbox grant: "*" (every mailbox) or a list of lower-cased addresses."""
    if value == "*":
        return "*"
    return [m.lower() for m in (value or [])]


# ---- RSA (RS256 verification with the standard library) --------------------------------

def der_read(data, pos):
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    return tag, data[pos:pos + length], pos + length


def parse_rsa_public_key(pem):
    """(n, e) of a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) or ``RSA PUBLIC KEY``."""
    lines = [ln for ln in pem.strip().splitlines() if not ln.startswith("-----")]
    der = base64.b64decode("".join(lines))
    tag, body, _ = der_read(der, 0)
    if "RSA PUBLIC KEY" not in pem:
        _, _, pos = der_read(body, 0)            # AlgorithmIdentifier
        tag, bits, _ = der_read(body, pos)       # BIT STRING
        tag, body, _ = der_read(bits[1:], 0)     # RSAPublicKey SEQUENCE
    _, n, pos = der_read(body, 0)
    _, e, _ = der_read(body, pos)
    return int.from_bytes(n, "big"), int.from_bytes(e, "big")


def rs256_verify(n, e, message, signature):
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")
    digest = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    expected = b"\x00\x01" + b"\xff" * (k - len(digest) - 3) + b"\x00" + digest
    return secrets.compare_digest(em, expected)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24880)
    parser.add_argument("--access-token-lifetime", type=int, default=3600,
                        help="expires_in of access tokens (seconds) unless a client sets its own")
    parser.add_argument("--seed-users", default="",
                        help="comma-separated addresses registered for both providers at start "
                             "and after each /_admin/reset")
    args = parser.parse_args()
    global WORLD
    WORLD = World(args.access_token_lifetime,
                  [a.strip() for a in args.seed_users.split(",") if a.strip()])
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"cloud emulator on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
