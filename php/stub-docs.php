<?php
/**
 * The PHPDoc of stubs/pcr_email.stub.php, written by hand: PHP's Reflection of an internal
 * class has no doc comments, so php/gen-stubs.php takes the signatures from the built
 * extension and the documentation from here, keyed 'Class', 'Class::method' and
 * 'Class::$property'. gen-stubs.php refuses to write a stub when a class, method or property
 * has no entry here, or an entry names one that does not exist.
 *
 * The array shapes (psalm / PHPStan syntax, which PhpStorm reads too) are what the code really
 * returns: keep them in step with src/outbound.rs (send, sendBatch, resolveAccount),
 * src/account_check.rs (checkAccount), src/oauth_signin.rs (completeAuthorization),
 * src/checkmail/summary.rs (the eventCheckMail summary), src/host/mail.rs ($mail) and
 * src/mime/mod.rs (ParsedMail, whose fields $mail lends).
 */

// ---- shapes used more than once ----------------------------------------------------------

$address = "string|array{email: string, name?: string|null}";
$addresses = "$address|list<$address>";

$message = <<<PHPDOC
array{
    to: $addresses,
    cc?: $addresses|null,
    bcc?: $addresses|null,
    reply_to?: $addresses|null,
    subject?: string|null,
    text?: string|null,
    html?: string|null,
    attachments?: list<array{path?: string, content?: string, content_base64?: string, filename?: string, content_type?: string, inline?: bool, content_id?: string}>|null,
    headers?: array<string, string|int|float|bool>|list<string|array{0: string, 1: string|int|float|bool}>|null,
    kind?: 'general'|'service_desk'|'sd_thread'|''|null,
    tenant?: int|numeric-string|null,
    sd_number?: string|null,
    in_reply_to?: string|null
}
PHPDOC;

$sendResult = <<<PHPDOC
array{
    status: 'sent'|'written'|'redirected'|'disabled'|'skipped',
    account: int|'master'|null,
    transport: string|null,
    from: string|null,
    message_id: string|null,
    path?: string,
    reason?: string
}
PHPDOC;

$batchFailure = <<<PHPDOC
array{
    status: 'failed',
    error: string,
    exception: class-string<\PCR_Utility_EmailException>,
    account?: int|'master',
    server?: string,
    smtp_code?: int|null,
    transient?: bool
}
PHPDOC;

$mailAddress = 'array{email: string, name: string|null}';

$mail = <<<PHPDOC
array{
    account: array{RECID: int|'master', EMAIL: string, TENANTS_RECID: int},
    host: string,
    message_id: string|null,
    in_reply_to: string|null,
    references: list<string>,
    from: $mailAddress|null,
    to: list<$mailAddress>,
    cc: list<$mailAddress>,
    reply_to: list<$mailAddress>,
    subject: string,
    date: string|null,
    text: string,
    html: string|null,
    attachments: list<array{filename: string, content_type: string, size: int, content_id: string|null, inline: bool, path: string}>,
    sd_number: string|null,
    auto: 'auto-reply'|'bounce'|null,
    headers: array<string, string|list<string>>,
    return_path: string|null,
    message_key: string,
    problems: list<string>,
    attempt: int
}
PHPDOC;

$accountKeys = <<<PHPDOC
    RECID: int|'master',
    TENANTS_RECID: int,
    ACCOUNT_TYPE: 'master'|'default'|'service_desk',
    EMAIL: string,
    DISPLAY_NAME: string|null,
    LOGIN: string,
    SYSADMIN: string|null,
    VERIFY_CERT: bool,
    OUTGOING_TRANSPORT_TYPE?: string,
    OUTGOING_HOST?: string|null,
    OUTGOING_PORT?: int,
    OUTGOING_SSL?: ''|'SSL'|'TLS',
    INCOMING_MAILBOX_TYPE?: string,
    INCOMING_HOST?: string|null,
    INCOMING_PORT?: int,
    INCOMING_SSL?: ''|'SSL'|'TLS',
    INCOMING_FOLDER?: string,
    INCOMING_PATH?: string|null
PHPDOC;

$account = "array{\n$accountKeys\n}";

$checkReport = <<<PHPDOC
array{
$accountKeys,
    outgoing: array{transport: string|null, server?: string, ok: bool, steps?: list<string>, error?: string, code?: int|null, transient?: bool}|null,
    incoming: array{protocol: string|null, ok: bool, messages?: int, error?: string, server?: string}|null,
    oauth?: array{provider?: 'OFFICE365'|'GMAIL', grant?: string, service_account?: bool, authorized?: bool, access_token_valid?: bool, access_token_valid_until?: int|null, refresh_token_saved_at?: int|null, mailbox?: string|null, last_error?: string|null, api?: array{ok: bool, server?: string, mailbox?: string|null, error?: string}, ok: bool, error?: string}|array{auth_type: 'XOAUTH2', grant: string|null, provider: string|null, token_obtained: bool, mechanism: string|null, mailbox: string, ok: bool, error?: string},
    ok: bool
}
PHPDOC;

$counts = 'fetched: int, inquiries: int, threaded: int, skipped: int, duplicates: int, failed: int, quarantined: int, deferred: int';

$summary = <<<PHPDOC
array{
    host: string,
    environment: string,
    status: 'ok'|'errors'|'disabled'|'send_email_off',
    errors: list<string>,
    warnings: list<string>,
    mailboxes: list<array{account: int|'master', email: string, protocol: string, $counts, skip_reasons: array<string, int>, errors: list<string>}>,
    totals: array{mailboxes: int, $counts, errors: int},
    duration_ms: int
}
PHPDOC;

$inApp = <<<PHPDOC
array{
    to: list<$mailAddress>,
    cc: list<$mailAddress>,
    bcc: list<$mailAddress>,
    reply_to: list<$mailAddress>,
    subject: string,
    text: string|null,
    html: string|null,
    attachments: list<array{filename: string, content_type: string, size: int, inline: bool, content_id: string|null, content_base64: string}>,
    kind: 'general'|'service_desk'|'sd_thread',
    tenant: int,
    sd_number: string|null
}
PHPDOC;

$row = 'array<string, mixed>';

$E = '\PCR_Utility_EmailException';
$Config = '\PCR_Utility_EmailConfigException';
$Transport = '\PCR_Utility_EmailTransportException';
$Mailbox = '\PCR_Utility_EmailMailboxException';
$Auth = '\PCR_Utility_EmailAuthException';
$TypeError = '\TypeError';

return [
    // ---- the host interface ------------------------------------------------------------------
    'PCR_Utility_EmailHost' => <<<DOC
The application's side of the contract (SPEC §5): PCR-360 implements it and hands an instance
to PCR_Utility_EmailManager (constructor or setDefaultHost()). The extension calls these
methods from PHP's thread; an exception thrown by one of them is caught by the extension,
logged, and the mail concerned is retried on the next run.
DOC,
    'PCR_Utility_EmailHost::emailAccounts' => <<<DOC
The tenant email account rows (the tenant email accounts screen), as the database returns them:
the INI keys (EMAIL, OUTGOING_*, INCOMING_*, ...) plus RECID, TENANTS_RECID, ACCOUNT_TYPE
('default' or 'service_desk'), SYSADMIN and OAUTH. A list, or an array keyed by RECID.

@return list<$row>|array<int|string, $row>
@throws \Throwable when the rows cannot be read (the extension logs it and uses none)
DOC,
    'PCR_Utility_EmailHost::blockedEmails' => <<<DOC
The Blocked Emails patterns: `*` wildcards on the sender address, or `/regex/flags` on the
sender address and the subject.

@return list<string>
@throws \Throwable when the list cannot be read (the run goes on without it)
DOC,
    'PCR_Utility_EmailHost::createInquiry' => <<<DOC
Creates an Inquiry from an incoming message and returns its SD number. Must be idempotent on
`\$mail['message_key']` (`\$mail['attempt']` > 1: the same message handed over again).
`\$mail['sd_number']` is the item the message named (subject or our Message-ID) when
addToThread() said there is no such item; null when it named none.

@param $mail \$mail
@return string the new item's SD number
@throws \Throwable to refuse the message for now: it stays in its mailbox and is retried
DOC,
    'PCR_Utility_EmailHost::addToThread' => <<<DOC
Adds an incoming message to the thread of an existing Service Desk item.

@param string \$sdNumber the item named in the subject or by our Message-ID
@param $mail \$mail
@return bool false when there is no such item (then createInquiry() is called)
@throws \Throwable to refuse the message for now: it stays in its mailbox and is retried
DOC,
    'PCR_Utility_EmailHost::deliverMessage' => <<<DOC
Delivers a message in-app (a Message) instead of by email: constants.SEND_EMAIL is false, or
the routing redirects it.

@param $inApp \$message
@throws \Throwable send() then throws it on as a PCR_Utility_EmailException
DOC,
    'PCR_Utility_EmailHost::logError' => <<<DOC
Writes to the application's Error Log. Never called with a password, secret or token.

@param string \$message
@param array<string, mixed> \$context e.g. account, server, code, transient, message_id
@throws \Throwable ignored: logging never makes things worse
DOC,

    // ---- the manager ---------------------------------------------------------------------------
    'PCR_Utility_EmailManager' => <<<DOC
PCR-360's email: sends through the account that routing picks for the kind of mail and tenant,
and reads the Service Desk mailboxes (the System Check Email event). Arguments are converted as
PHP converts those of its own functions: numeric strings are accepted for int parameters unless
the calling file declares strict_types=1, and a wrong type is PHP's TypeError
("PCR_Utility_EmailManager::send(): Argument #1 (\$message) must be of type array, string given").
DOC,
    'PCR_Utility_EmailManager::__construct' => <<<DOC
Reads the INI file for the environment.

@param string|null \$configFile default: php.ini pcr_email.config (/var/www/pcr360/configs/pcr360.ini)
@param string|null \$environment the INI section; default: pcr_email.environment, else APPLICATION_ENV, else 'prod'
@param \PCR_Utility_EmailHost|null \$host default: the one given to setDefaultHost()
@throws $Config when the INI file cannot be read or its email settings are invalid
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::setDefaultHost' => <<<DOC
The host used by managers constructed without one (the event system's `new
PCR_Utility_EmailManager()`), for the rest of the request.

@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::eventCheckMail' => <<<DOC
The System Check Email event: reads every Service Desk mailbox, hands each new message to the
host (addToThread / createInquiry) and returns the summary for the Events screen. One mailbox
failing never stops the others: its failure is in the summary, not thrown.

@param array{host: string}|object|string|null \$data the event's Data: {"host":"pcr360.example.edu"}
       as JSON string, array or object, or the bare host name; a URL
       (https://pcr360.example.edu/) is taken as its host name
@return $summary
@throws $E when the Data names no host, there is no host object, or the state store cannot be used
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::send' => <<<DOC
Sends one message through the account routing picks for its kind and tenant.

@param $message \$message
@return $sendResult
@throws $E a malformed message (before anything is sent), or a failure of the host's deliverMessage()
@throws $Config the account that would send is misconfigured (its mail is never sent by another)
@throws $Transport the server refused or could not be reached (logged; see smtpCode, transient)
@throws $Auth an OAuth2 account could not obtain a token
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::sendBatch' => <<<DOC
Sends many messages over shared connections. Never throws for one message: its entry says
'failed' with the error and the exception class send() would have thrown.

@param array<array-key, $message> \$messages
@return list<$sendResult|$batchFailure>
       one entry per message, in order
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::resolveAccount' => <<<DOC
The account routing picks for this kind of mail and tenant, without secrets; null when nothing
would be sent (disabled, redirected in-app, or skipped).

@param 'general'|'service_desk'|'sd_thread' \$kind
@param int \$tenant TENANTS_RECID (0: none); a numeric string is accepted unless the caller declares strict_types=1
@return $account|null
@throws $E an unknown kind
@throws $Config the account that would send is misconfigured (as send() would throw it)
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::checkAccount' => <<<DOC
Connects and authenticates to the account's servers without sending, reading or changing mail.
A failed check is reported ('ok' => false, with the error), not thrown.

@param int|string \$recid 'master' or a tenant account's RECID
@return $checkReport
@throws $E no such account
@throws $Config the account is misconfigured
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::authorizationUrl' => <<<DOC
"Click to Authenticate" on an OFFICE365 / GMAIL tenant account: the provider's sign-in URL to
send the administrator's browser to.

@param int \$recid the tenant account's RECID
@param string \$redirectUri https://<host>/core/oauth2/validated
@throws $E no host object, or no such account
@throws $Config the account is not an OAuth2 account or is misconfigured
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::completeAuthorization' => <<<DOC
The sign-in page's redirect back (`state` and `code` of its query): stores the account's tokens
and returns the signed-in mailbox.

@return array{recid: int, provider: 'OFFICE365'|'GMAIL', mailbox: string, differs_from_email: bool, email?: string}
@throws $Auth an unknown, reused or expired state, or a refused code (logged)
@throws $E no host object
@throws $TypeError
DOC,
    'PCR_Utility_EmailManager::encryptPassword' => <<<DOC
Encrypts a password for the INI file or a tenant row (`ENC:v1:...`), with the key file of that
INI file and environment (created when missing).

@param string|null \$configFile default: php.ini pcr_email.config
@param string|null \$environment default: pcr_email.environment, else APPLICATION_ENV, else 'prod'
@throws $Config the INI file cannot be read, or the key file cannot be created or read
@throws $TypeError
@throws \ValueError \$plain is not valid UTF-8
DOC,

    // ---- exceptions ------------------------------------------------------------------------------
    'PCR_Utility_EmailException' => <<<DOC
Every error of the extension: a malformed message, a host failure, and the subclasses below.
DOC,
    'PCR_Utility_EmailConfigException' => <<<DOC
The INI file, a tenant row or the key file is invalid or unreadable; names the account and key.
DOC,
    'PCR_Utility_EmailTransportException' => <<<DOC
Sending failed: the server refused the message or could not be reached.
DOC,
    'PCR_Utility_EmailTransportException::$account' => "The account: 'master' or the tenant account's RECID (as a string).",
    'PCR_Utility_EmailTransportException::$server' => 'The server that failed: host:port, the sendmail binary, the FILE directory or the API.',
    'PCR_Utility_EmailTransportException::$smtpCode' => 'The SMTP reply code (the HTTP status for Microsoft 365 / Gmail), when the server gave one.',
    'PCR_Utility_EmailTransportException::$transient' => 'True when trying again later may succeed (4xx, a timeout, a dropped connection).',
    'PCR_Utility_EmailMailboxException' => <<<DOC
A mailbox could not be read (connection, login, folder).
DOC,
    'PCR_Utility_EmailMailboxException::$account' => "The account: 'master' or the tenant account's RECID (as a string).",
    'PCR_Utility_EmailMailboxException::$server' => 'The mailbox server (host:port), Maildir or API that failed.',
    'PCR_Utility_EmailAuthException' => <<<DOC
OAuth2: a sign-in could not be completed or an account could not obtain a token.
DOC,
    'PCR_Utility_EmailAuthException::$account' => "The account: 'master', the tenant account's RECID, or 'unknown' when the sign-in reply names none.",
];
