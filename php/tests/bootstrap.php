<?php
declare(strict_types=1);

// PHP-level tests run with the built extension loaded (php/run-tests.sh passes -d extension=).
if (!extension_loaded('pcr_email')) {
    fwrite(STDERR, "pcr_email is not loaded: run php/run-tests.sh\n");
    exit(2);
}

require_once __DIR__ . '/TestHost.php';

/** A value from the test servers' environment (.testenv/env); a missing one fails the test. */
function test_env(string $name): string
{
    $v = getenv($name);
    if ($v === false || $v === '') {
        throw new RuntimeException("$name is not set: start the servers with scripts/test-servers.sh start");
    }
    return $v;
}

/** A fresh directory under the system temp dir, removed at exit. */
function temp_dir(string $prefix = 'pcr-email-'): string
{
    $dir = sys_get_temp_dir() . '/' . $prefix . bin2hex(random_bytes(6));
    mkdir($dir, 0700, true);
    register_shutdown_function(function () use ($dir) {
        exec('rm -rf ' . escapeshellarg($dir));
    });
    return $dir;
}

/**
 * Writes a pcr360.ini with a [prod] section holding $email (email.* keys) and $constants, and
 * a [test : prod] section overriding with $test. Returns its path.
 */
function write_ini(string $dir, array $email, array $constants = [], array $test = []): string
{
    $lines = ["; written by the PHP tests", "[prod]"];
    foreach ($constants as $k => $v) {
        $lines[] = "constants.$k = " . ini_value($v);
    }
    foreach ($email as $k => $v) {
        $lines[] = "email.$k = " . ini_value($v);
    }
    $lines[] = '';
    $lines[] = '[test : prod]';
    foreach ($test as $k => $v) {
        $lines[] = "$k = " . ini_value($v);
    }
    @mkdir($dir . '/configs', 0700, true);
    $path = $dir . '/configs/pcr360.ini';
    file_put_contents($path, implode("\n", $lines) . "\n");
    return $path;
}

function ini_value($v): string
{
    if (is_bool($v)) {
        return $v ? 'true' : 'false';
    }
    if (is_int($v)) {
        return (string) $v;
    }
    return '"' . $v . '"';
}

/** The command line of a child PHP with the extension, -d settings, TestHost.php and $requires loaded. */
function php_command(string $code, array $ini, array $requires): array
{
    $cmd = [PHP_BINARY, '-d', 'extension=' . test_env('PCR_EMAIL_SO')];
    foreach ($ini as $k => $v) {
        $cmd[] = '-d';
        $cmd[] = "$k=$v";
    }
    $prelude = '';
    foreach (array_merge(['TestHost.php'], $requires) as $file) {
        $prelude .= 'require ' . var_export(__DIR__ . '/' . $file, true) . ';';
    }
    $cmd[] = '-r';
    $cmd[] = $prelude . $code;
    return $cmd;
}

/** Runs PHP code in a child process with the extension and extra -d settings; returns [exit, stdout, stderr]. */
function run_php(string $code, array $ini = [], array $env = []): array
{
    $cmd = php_command($code, $ini, []);
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env + getenv());
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    return [proc_close($proc), $out, $err];
}

/** A token unique to one test, to find its mail among everything the servers received. */
function token(string $tag = 't'): string
{
    return $tag . '-' . bin2hex(random_bytes(5));
}

/**
 * Waits (up to $seconds) for mail received by the local SMTP server on $port whose raw text
 * contains $needle; returns a list of ['meta' => envelope array, 'raw' => string].
 */
function smtp_received(int $port, string $needle, int $expect = 1, float $seconds = 10.0): array
{
    $dir = test_env('PCR_SMTP_DROP_DIR') . '/' . $port;
    $deadline = microtime(true) + $seconds;
    do {
        $found = [];
        foreach (glob($dir . '/*.eml') ?: [] as $eml) {
            $raw = (string) @file_get_contents($eml);
            if (strpos($raw, $needle) !== false) {
                $meta = json_decode((string) @file_get_contents(substr($eml, 0, -4) . '.json'), true);
                $found[] = ['meta' => $meta, 'raw' => $raw];
            }
        }
        if (count($found) >= $expect) {
            return $found;
        }
        usleep(50000);
    } while (microtime(true) < $deadline);
    return $found;
}

/** email.* keys of a master account on the local STARTTLS+AUTH SMTP server. */
function smtp_master(array $overrides = []): array
{
    return $overrides + [
        'EMAIL' => 'desk@test.local',
        'DISPLAY_NAME' => 'PCR-360 Service Desk',
        'LOGIN' => test_env('PCR_SMTP_USER'),
        'PASSWORD' => test_env('PCR_SMTP_PASS'),
        'OUTGOING_TRANSPORT_TYPE' => 'SMTP',
        'OUTGOING_HOST' => test_env('PCR_TEST_TLS_HOST'),
        'OUTGOING_PORT' => (int) test_env('PCR_SMTP_STARTTLS_PORT'),
        'OUTGOING_SSL' => 'TLS',
        'CA_FILE' => test_env('PCR_TEST_CA'),
        'TIMEOUT' => 5,
    ];
}

// ---- The cloud emulator (tests/servers/cloud_emulator.py): OFFICE365 / GMAIL accounts ----

/** PCR-360's OAuth2 redirect URI, as registered with the emulator's clients. */
const OAUTH_REDIRECT_URI = 'https://pcr360.example.edu/core/oauth2/validated';

/**
 * One HTTP request that does not follow redirects (as a test's "browser"):
 * [status, headers (lower-case name => value), body].
 */
function http_request(string $method, string $url, ?string $body = null, array $headers = []): array
{
    $ctx = stream_context_create(['http' => [
        'method' => $method,
        'header' => implode("\r\n", $headers),
        'content' => $body ?? '',
        'follow_location' => 0,
        'ignore_errors' => true,
        'timeout' => 30,
    ]]);
    $text = @file_get_contents($url, false, $ctx);
    $lines = $http_response_header ?? [];
    if ($text === false && $lines === []) {
        throw new RuntimeException("$method $url: unreachable (start the servers with scripts/test-servers.sh start)");
    }
    $status = 0;
    $h = [];
    foreach ($lines as $line) {
        if (preg_match('#^HTTP/\S+\s+(\d{3})#', $line, $m)) {
            $status = (int) $m[1];
            $h = [];
        } elseif (strpos($line, ':') !== false) {
            [$k, $v] = explode(':', $line, 2);
            $h[strtolower(trim($k))] = trim($v);
        }
    }
    return [$status, $h, (string) $text];
}

/** An admin call to the cloud emulator; fails unless it answers 2xx. */
function cloud_admin(string $method, string $path, ?array $body = null): array
{
    $url = test_env('PCR_CLOUD_URL') . $path;
    [$status, , $text] = http_request($method, $url, $body === null ? null : json_encode($body),
        $body === null ? [] : ['Content-Type: application/json']);
    if ($status < 200 || $status >= 300) {
        throw new RuntimeException("cloud emulator $method $path: $status $text");
    }
    return (array) json_decode($text, true);
}

/**
 * Registers an OAuth client (optionally with a short access token lifetime, in seconds) and a
 * mailbox user at the emulator; names are unique per call. $provider: microsoft | google.
 * Returns ['provider', 'client_id', 'client_secret', 'mailbox'].
 */
function cloud_tenant(string $provider, string $tag, ?int $tokenLifetime = null, ?int $refreshDelayMs = null): array
{
    $name = $tag . bin2hex(random_bytes(6));
    $client = cloud_admin('POST', '/_admin/clients', [
        'provider' => $provider,
        'client_id' => "app-$name",
        'client_secret' => "secret-$name-Zq9",
        'redirect_uris' => [OAUTH_REDIRECT_URI],
        'access_token_lifetime' => $tokenLifetime,
        'refresh_delay_ms' => $refreshDelayMs,
    ]);
    $mailbox = "$name@tenant.example";
    cloud_admin('POST', '/_admin/users', ['provider' => $provider, 'email' => $mailbox, 'display_name' => "Box $name"]);
    return ['provider' => $provider, 'client_id' => $client['client_id'],
        'client_secret' => $client['client_secret'], 'mailbox' => $mailbox];
}

/**
 * A tenant email account row sending and receiving through the emulator (OFFICE365 for a
 * microsoft tenant, GMAIL for a google one), its OAuth2 tab filled in as an administrator
 * would; $extra overrides or adds keys.
 */
function cloud_row(int $recid, array $tenant, string $email, string $type = 'service_desk', int $tenants = 1,
    array $extra = []): array
{
    $base = test_env('PCR_CLOUD_URL');
    $ms = $tenant['provider'] === 'microsoft';
    $kind = $ms ? 'OFFICE365' : 'GMAIL';
    $oauth = $ms ? [
        'APPLICATION_ID' => $tenant['client_id'],
        'SECRET_KEY' => $tenant['client_secret'],
        'AUTHORITY_URL' => "$base/common",
        'AUTHORIZATION_ENDPOINT' => '/oauth2/v2.0/authorize',
        'TOKEN_ENDPOINT' => '/oauth2/v2.0/token',
        'SCOPES' => 'openid profile offline_access user.read mail.readwrite mail.send',
        'API_BASE_URL' => "$base/v1.0",
    ] : [
        'APPLICATION_ID' => $tenant['client_id'],
        'SECRET_KEY' => $tenant['client_secret'],
        'AUTHORITY_URL' => '',
        'AUTHORIZATION_ENDPOINT' => "$base/o/oauth2/v2/auth",
        'TOKEN_ENDPOINT' => "$base/token",
        'SCOPES' => 'https://mail.google.com/',
        'API_BASE_URL' => $base,
    ];
    $row = ['RECID' => $recid, 'TENANTS_RECID' => $tenants, 'ACCOUNT_TYPE' => $type, 'EMAIL' => $email,
        'DISPLAY_NAME' => 'Service Desk', 'OUTGOING_TRANSPORT_TYPE' => $kind, 'OAUTH' => $oauth, 'TIMEOUT' => 10];
    if ($type === 'service_desk') {
        $row['INCOMING_MAILBOX_TYPE'] = $kind;
    }
    return $extra + $row;
}

/**
 * The administrator's browser after "Click to Authenticate": opens the authorization URL at
 * the emulator, which signs in $asUser (else the login_hint) and redirects to PCR-360's
 * redirect URI; returns that redirect's query parameters (code, state, or error).
 */
function browser_sign_in(string $url, ?string $asUser = null): array
{
    if ($asUser !== null) {
        $url .= '&_user=' . rawurlencode($asUser);
    }
    [$status, $headers] = http_request('GET', $url);
    if ($status !== 302 || !isset($headers['location'])) {
        throw new RuntimeException("the sign-in page did not redirect ($status): $url");
    }
    $location = $headers['location'];
    if (strpos($location, OAUTH_REDIRECT_URI . '?') !== 0) {
        throw new RuntimeException("redirected elsewhere: $location");
    }
    parse_str((string) parse_url($location, PHP_URL_QUERY), $params);
    return $params;
}

/** The messages the emulator's API sent from $user, oldest first: [meta..., 'raw' => MIME]. */
function cloud_sent(string $user): array
{
    $out = [];
    foreach (cloud_admin('GET', '/_admin/sent?user=' . rawurlencode($user))['sent'] as $s) {
        $s['raw'] = base64_decode($s['raw_b64'] ?? '');
        $out[] = $s;
    }
    return $out;
}

/** Grants issued and refresh tokens still valid for a client (and user), per the emulator. */
function cloud_stats(string $clientId, string $user = ''): array
{
    return cloud_admin('GET', '/_admin/stats?client_id=' . rawurlencode($clientId) . '&user=' . rawurlencode($user));
}

/** Puts a message into an emulated mailbox (Graph inbox / Gmail INBOX); returns its id. */
function cloud_seed(string $provider, string $user, string $raw, bool $read = false): string
{
    return cloud_admin('POST', '/_admin/seed', ['provider' => $provider, 'user' => $user,
        'raw_b64' => base64_encode($raw), 'is_read' => $read])['id'];
}

// ---- Mailboxes for the eventCheckMail tests: Dovecot users (IMAP/POP3) and local Maildirs ----

/** A Dovecot user of the test environment, e.g. mail_user('mbox1'): ['email', 'password']. */
function mail_user(string $local): array
{
    return ['email' => $local . '@' . test_env('PCR_MAIL_DOMAIN'),
        'password' => test_env('PCR_PASS_' . strtoupper($local))];
}

/** Runs a command (argv list) with $stdin; returns stdout, throws with its output on failure. */
function run_checked(array $argv, ?string $stdin = null): string
{
    $proc = proc_open($argv, [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
    if (!is_resource($proc)) {
        throw new RuntimeException('cannot run ' . implode(' ', $argv));
    }
    fwrite($pipes[0], $stdin ?? '');
    fclose($pipes[0]);
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    $code = proc_close($proc);
    if ($code !== 0) {
        throw new RuntimeException(implode(' ', $argv) . " failed ($code): $out$err");
    }
    return (string) $out;
}

/** doveadm against the test Dovecot, e.g. doveadm('flags', 'add', '-u', $user, '\Seen', 'mailbox', 'INBOX', 'all'). */
function doveadm(string ...$args): string
{
    return run_checked(array_merge([test_env('PCR_DOVEADM'), '-c', test_env('PCR_DOVECOT_CONF')], $args));
}

/** Delivers a raw message into a folder of a Dovecot user with dovecot-lda (as mail from outside). */
function dovecot_deliver(string $local, string $raw, string $folder = 'INBOX'): void
{
    $argv = [test_env('PCR_DOVECOT_LDA'), '-c', test_env('PCR_DOVECOT_CONF'), '-e', '-d', mail_user($local)['email']];
    if ($folder !== 'INBOX') {
        array_push($argv, '-m', $folder);
    }
    run_checked($argv, $raw);
}

/**
 * Delivers many raw messages into a Dovecot user's INBOX at once: written straight into its
 * Maildir (PCR_MAIL_ROOT/<user>/Maildir/new, owned like the Maildir), as a local delivery agent
 * does; Dovecot takes them in at its next look. One dovecot-lda process per message costs tens
 * of milliseconds each.
 */
function dovecot_deliver_many(string $local, array $raws): void
{
    $dir = test_env('PCR_MAIL_ROOT') . '/' . mail_user($local)['email'] . '/Maildir';
    if (!is_dir("$dir/new") || !is_dir("$dir/tmp")) {
        throw new RuntimeException("no Maildir at $dir");
    }
    $owner = fileowner($dir);
    $group = filegroup($dir);
    foreach ($raws as $raw) {
        $path = maildir_put($dir, $raw);
        chown($path, $owner);
        chgrp($path, $group);
    }
}

/** The folders of a Dovecot user. */
function mailbox_folders(string $local): array
{
    $out = doveadm('mailbox', 'list', '-u', mail_user($local)['email']);
    return array_values(array_filter(array_map('trim', explode("\n", $out)), 'strlen'));
}

/** Empties a Dovecot user's mailbox: every message expunged, every folder but INBOX deleted. */
function mailbox_reset(string $local): void
{
    $user = mail_user($local)['email'];
    doveadm('expunge', '-u', $user, 'mailbox', '*', 'all');
    $extra = array_values(array_diff(mailbox_folders($local), ['INBOX']));
    if ($extra !== []) {
        doveadm('mailbox', 'delete', '-u', $user, '-r', '-s', ...$extra);
    }
    if (mailbox_folders($local) !== ['INBOX'] || mailbox_messages($local) !== []) {
        throw new RuntimeException("mailbox of $user could not be emptied");
    }
}

/**
 * The messages in a folder of a Dovecot user, by UID: list of ['uid', 'flags' (without
 * \Recent), 'message_id' (without brackets)]; [] when the folder does not exist.
 */
function mailbox_messages(string $local, string $folder = 'INBOX'): array
{
    if (!in_array($folder, mailbox_folders($local), true)) {
        return [];
    }
    $out = doveadm('-f', 'tab', 'fetch', '-u', mail_user($local)['email'], 'uid flags hdr.message-id',
        'mailbox', $folder, 'all');
    $list = [];
    foreach (array_slice(explode("\n", trim($out)), 1) as $line) {
        $cols = explode("\t", $line);
        if (!ctype_digit(trim($cols[0] ?? ''))) {
            continue;
        }
        $flags = array_values(array_diff(preg_split('/\s+/', trim($cols[1] ?? ''), -1, PREG_SPLIT_NO_EMPTY), ['\Recent']));
        $list[] = ['uid' => (int) $cols[0], 'flags' => $flags, 'message_id' => trim($cols[2] ?? '', " \t<>")];
    }
    usort($list, fn($a, $b) => $a['uid'] <=> $b['uid']);
    return $list;
}

/** A new empty Maildir (new/, cur/, tmp/) under $parent; returns its path. */
function maildir_create(string $parent, string $name = 'Maildir'): string
{
    $dir = "$parent/$name";
    foreach (['new', 'cur', 'tmp'] as $sub) {
        @mkdir("$dir/$sub", 0700, true);
    }
    return $dir;
}

/** Puts a raw message into a Maildir (new/, or cur/ flagged \Seen when $seen); returns its path. */
function maildir_put(string $dir, string $raw, bool $seen = false): string
{
    static $seq = 0;
    $name = sprintf('%d.M%dP%dQ%d.pcr-test', time(), (int) (microtime(true) * 1e6) % 1000000, getmypid(), ++$seq);
    file_put_contents("$dir/tmp/$name", $raw);
    $target = $seen ? "$dir/cur/$name:2,S" : "$dir/new/$name";
    rename("$dir/tmp/$name", $target);
    return $target;
}

/** The message files of a Maildir, as paths relative to it (new/..., cur/..., .Folder/cur/...). */
function maildir_files(string $dir): array
{
    $files = [];
    $it = new RecursiveIteratorIterator(new RecursiveDirectoryIterator($dir, FilesystemIterator::SKIP_DOTS));
    foreach ($it as $file) {
        $rel = substr($file->getPathname(), strlen($dir) + 1);
        if ($file->isFile() && preg_match('#(^|/)(new|cur)/[^/]+$#', $rel)) {
            $files[] = $rel;
        }
    }
    sort($files);
    return $files;
}

/**
 * Starts PHP code in a child process with the extension (stdout and stderr to files) and
 * returns a handle for php_wait(); the child's pid is $handle['pid'].
 */
function php_start(string $code, array $ini = [], array $env = []): array
{
    $cmd = php_command($code, $ini, ['SqliteHost.php']);
    $out = tempnam(sys_get_temp_dir(), 'pcr-child-out-');
    $err = tempnam(sys_get_temp_dir(), 'pcr-child-err-');
    $proc = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', $out, 'w'], 2 => ['file', $err, 'w']],
        $pipes, null, $env + getenv());
    if (!is_resource($proc)) {
        throw new RuntimeException('cannot start a PHP child process');
    }
    return ['proc' => $proc, 'pid' => proc_get_status($proc)['pid'], 'out' => $out, 'err' => $err];
}

/**
 * Waits (at most $seconds; then kills it and throws) for a child of php_start();
 * returns [exit code or -signal, stdout, stderr].
 */
function php_wait(array $child, float $seconds = 60.0): array
{
    $deadline = microtime(true) + $seconds;
    while (($status = proc_get_status($child['proc']))['running']) {
        if (microtime(true) > $deadline) {
            posix_kill($child['pid'], SIGKILL);
            proc_close($child['proc']);
            throw new RuntimeException("child $child[pid] still running after {$seconds}s: killed; stderr: "
                . file_get_contents($child['err']));
        }
        usleep(20000);
    }
    proc_close($child['proc']);
    $code = $status['signaled'] ? -$status['termsig'] : $status['exitcode'];
    $result = [$code, (string) file_get_contents($child['out']), (string) file_get_contents($child['err'])];
    @unlink($child['out']);
    @unlink($child['err']);
    return $result;
}

/**
 * Runs one SQL statement on the extension's state database in a child process and returns
 * the rows. Never open that database from the test process itself: PHP's SQLite and the
 * extension's own SQLite in one process would release each other's POSIX locks (SQLite's
 * documented "multiple copies of SQLite in one process" hazard) and lose the extension's
 * writes.
 */
function state_query(string $dbPath, string $sql): array
{
    [$code, $out, $err] = run_php(
        '$db = new SQLite3(' . var_export($dbPath, true) . '); $db->busyTimeout(5000);'
        . '$r = $db->query(' . var_export($sql, true) . '); $rows = [];'
        . 'while ($r instanceof SQLite3Result && ($row = $r->fetchArray(SQLITE3_ASSOC))) { $rows[] = $row; }'
        . 'echo json_encode(["rows" => $rows, "changes" => $db->changes()]);'
    );
    if ($code !== 0) {
        throw new RuntimeException("state_query failed ($code): $err");
    }
    return json_decode($out, true);
}
