#!/usr/bin/env python3
"""Local emulator of the cloud mail services pcr_email talks to, for the integration tests.

One plain-HTTP server on loopback (the base URLs are configuration) that follows the public
documentation of:

* the Microsoft identity platform (v2.0): ``/{tenant}/oauth2/v2.0/authorize`` and ``/token``
  (authorization code with PKCE S256, client secret, refresh tokens with rotation);
* Microsoft Graph mail (``/v1.0``): ``/me``, ``/me/sendMail`` (MIME as base64 text/plain, and
  JSON), ``/me/mailFolders`` (+ ``childFolders``), folder ``messages`` with ``$top``/``$skip``
  paging through ``@odata.nextLink``, ``$orderby``, the ``PR_MESSAGE_SIZE`` extended property,
  ``/me/messages/{id}`` GET/PATCH/DELETE, ``/$value``, ``/move`` (immutable ids honoured);
* Google OAuth 2.0: ``/o/oauth2/v2/auth`` and ``/token`` (authorization code with PKCE,
  ``access_type=offline``, refresh without rotation, and the RFC 7523 JWT bearer grant of
  service accounts, with the RS256 signature verified against the registered public key);
* the Gmail API (``/gmail/v1/users/{userId}``): ``profile``, ``messages`` (paging with
  ``nextPageToken``), ``messages/{id}`` (``format=raw|minimal|metadata|full``), ``modify``,
  ``batchModify``, ``trash``, ``labels``, ``messages/send`` (JSON ``raw`` and the media upload).

Errors use each service's documented shape: OAuth ``{"error": "invalid_grant",
"error_description": ...}``, Graph ``{"error": {"code": "InvalidAuthenticationToken",
"message": ...}}``, Gmail ``{"error": {"code": 401, "message": ..., "status":
"UNAUTHENTICATED"}}``.

Test-only parts, all under ``/_admin`` (JSON in, JSON out):

* ``POST /_admin/clients`` ``{"provider": "microsoft"|"google", "client_id"?, "client_secret"?,
  "redirect_uris"?: [...], "access_token_lifetime"?: s, "rotate_refresh_tokens"?: bool}``
* ``POST /_admin/users`` ``{"provider", "email", "display_name"?, "mail"?: null to omit}``
* ``POST /_admin/service_accounts`` ``{"client_email", "public_key_pem", "delegated": [...]|"*"}``
* ``POST /_admin/seed`` ``{"provider", "user", "raw_b64", "folder"?, "labels"?, "is_read"?}``
* ``GET /_admin/sent?user=`` (what was sent), ``GET /_admin/mailbox?provider=&user=``
* ``POST /_admin/fault`` ``{"path": regex, "method"?, "user"?, "client_id"?, "status",
  "retry_after"?, "retry_after_date"?: bool, "count"?: 1, "body"?, "content_type"?}``
* ``POST /_admin/revoke`` ``{"user"?, "client_id"?}`` (refresh tokens),
  ``POST /_admin/expire_access_tokens`` ``{"user"}``
* ``GET /_admin/stats?client_id=&user=`` (grants issued, requests seen), ``GET /_admin/health``

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
    def __init__(self, token_lifetime):
        self.default_lifetime = token_lifetime
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

    def count(self, key):
        self.stats[key] = self.stats.get(key, 0) + 1

    def user(self, provider, address):
        return self.users.get((provider, (address or "").lower()))


WORLD = None


def new_user(provider, address, display_name, mail):
    user = {"provider": provider, "email": address, "display_name": display_name,
            "mail": mail, "id": str(uuid.uuid4()), "messages": {}, "folders": {}, "labels": {},
            "history": 1000}
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
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/(authorize|token)", path)
        if m and m.group(1) not in ("v1.0", "gmail"):
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

    def client_auth(self, provider, form):
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
        if client["client_secret"] and secret != client["client_secret"]:
            if provider == "microsoft":
                raise OAuthError(401, "invalid_client", "AADSTS7000215: Invalid client secret "
                                 "provided. Ensure the secret being sent in the request is the "
                                 "client secret value, not the client secret ID.", provider,
                                 [7000215])
            raise OAuthError(401, "invalid_client", "Unauthorized", provider)
        return client

    def issue(self, provider, client, user_email, scope, offline, rotate_from=None):
        lifetime = client.get("access_token_lifetime") or WORLD.default_lifetime
        access = ("eyJ0eXAiOiJKV1Qi." if provider == "microsoft" else "ya29.") + \
            b64url_encode(secrets.token_bytes(32))
        WORLD.access_tokens[access] = {"provider": provider, "user": user_email,
                                       "scope": scope, "expires": now() + lifetime,
                                       "client_id": client["client_id"], "valid": True}
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
        with LOCK:
            if grant == JWT_BEARER and provider == "google":
                return self.send(200, self.jwt_grant(form))
            client = self.client_auth(provider, form)
            if grant == "authorization_code":
                reply = self.code_grant(provider, client, form)
            elif grant == "refresh_token":
                reply = self.refresh_grant(provider, client, form)
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
            headers = {"WWW-Authenticate": 'Bearer realm="", authorization_uri='
                       '"https://login.microsoftonline.com/common/oauth2/authorize", '
                       'client_id="00000003-0000-0000-c000-000000000000"'}
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
        with LOCK:
            record = self.bearer("microsoft")
        if self.apply_fault(method, "/v1.0" + path):
            return
        with LOCK:
            user = WORLD.user("microsoft", record["user"])
            scopes = {s.lower() for s in record["scope"].split()}
            return self.graph_route(method, path, q, body, user, scopes)

    def graph_need(self, scopes, *any_of):
        if not any(s.lower() in scopes for s in any_of):
            raise ApiError("graph", 403, "ErrorAccessDenied",
                           "Access is denied. Check credentials and try again.")

    def graph_route(self, method, path, q, body, user, scopes):
        base = self.base_url() + "/v1.0"
        if path == "/me" and method == "GET":
            self.graph_need(scopes, "user.read", "mail.read", "mail.readwrite")
            return self.send(200, {"@odata.context": base + "/$metadata#users/$entity",
                                   "id": user["id"], "displayName": user["display_name"],
                                   "mail": user["mail"], "userPrincipalName": user["email"]})
        if path == "/me/sendMail" and method == "POST":
            self.graph_need(scopes, "mail.send")
            return self.graph_send(body, user)
        if path == "/me/mailFolders" and method in ("GET", "POST"):
            return self.graph_folders(method, "root", q, body, user, scopes, base + path)
        m = re.fullmatch(r"/me/mailFolders/([^/]+)(/childFolders|/messages)?", path)
        if m:
            folder = graph_folder(user, urllib.parse.unquote(m.group(1)))
            if not folder:
                raise ApiError("graph", 404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
            if m.group(2) == "/childFolders":
                return self.graph_folders(method, folder["id"], q, body, user, scopes,
                                          base + path)
            if m.group(2) == "/messages" and method == "GET":
                self.graph_need(scopes, "mail.read", "mail.readwrite")
                return self.graph_list(folder, q, user, base + path)
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
                return self.send(200, self.message_json(msg, None))
            if action is None and method == "DELETE":
                self.graph_need(scopes, "mail.readwrite")
                deleted = graph_folder(user, "deleteditems")
                if msg["folder"] == deleted["id"]:
                    del user["messages"][mid]
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
        msg["folder"] = folder_id
        msg["lastModified"] = now()
        if not self.immutable():
            # Without immutable ids a move gives the message a new id (as Exchange does).
            del user["messages"][msg["id"]]
            msg["id"] = "AAMk" + b64url_encode(secrets.token_bytes(24))
            user["messages"][msg["id"]] = msg
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
        elif ctype.startswith("application/json"):
            message = json.loads(body or b"{}").get("message")
            if not isinstance(message, dict):
                raise ApiError("graph", 400, "ErrorInvalidParameter",
                               "The value of the parameter 'Message' is empty.")
            WORLD.sent.append({"via": "graph", "user": user["email"], "format": "json",
                               "json": message, "t": now()})
        else:
            raise ApiError("graph", 415, "UnsupportedMediaType",
                           "Content-Type must be text/plain (MIME) or application/json.")
        return self.send(202)

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

    def label_json(self, user, label, counts):
        data = {k: v for k, v in label.items() if v is not None}
        if counts:
            items = [m for m in user["messages"].values() if label["id"] in m["labels"]]
            data["messagesTotal"] = len(items)
            data["messagesUnread"] = sum(1 for m in items if "UNREAD" in m["labels"])
            data["threadsTotal"] = len(items)
        return data

    def gmail_relabel(self, user, msg, req):
        labels = [lb for lb in msg["labels"] if lb not in req.get("removeLabelIds", [])]
        for lb in req.get("addLabelIds", []):
            if lb not in labels:
                labels.append(lb)
        msg["labels"] = labels
        user["history"] += 1
        msg["history"] = user["history"]

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
                                                     provider == "microsoft")}
                return self.send(200, WORLD.clients[cid])
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
                expired = 0
                for record in WORLD.access_tokens.values():
                    if record["user"].lower() == req["user"].lower() and record["valid"]:
                        record["valid"] = False
                        expired += 1
                return self.send(200, {"expired": expired})
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
        else:
            labels = list(req.get("labels", ["INBOX"]))
            if not req.get("is_read") and "UNREAD" not in labels:
                labels.append("UNREAD")
            msg["id"] = secrets.token_hex(8)
            msg["threadId"] = msg["id"]
            msg["labels"] = labels
            user["history"] += 1
            msg["history"] = user["history"]
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
    args = parser.parse_args()
    global WORLD
    WORLD = World(args.access_token_lifetime)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"cloud emulator on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
