<?php
/**
 * Benchmark (a): the System Check Email event through the extension, with a host that stores
 * nothing (every message becomes an "Inquiry" that is only counted).
 *
 *   php -d extension=libpcr_email.so check.php <run dir>
 *
 * Environment: BENCH_PROTOCOL (IMAP|POP3), BENCH_HOST, BENCH_PORTS and BENCH_USERS (one per
 * mailbox, comma-separated), BENCH_SSL (SSL or empty), BENCH_CA, BENCH_EXPECT (messages per
 * mailbox); passwords from PCR_PASS_<USER>. Writes a fresh pcr360.ini under <run dir> (its
 * STATE_DIR is new, so every message is new) and prints one JSON line: seconds inside
 * eventCheckMail, the summary's totals, host calls. Exits 1 when a count is not what it must be.
 * BENCH_BASELINE=1 stops before eventCheckMail (the fixed memory cost).
 */
declare(strict_types=1);

final class BenchHost implements PCR_Utility_EmailHost
{
    public int $inquiries = 0;
    public int $threadCalls = 0;
    public int $bytes = 0;
    public int $attachments = 0;
    /** @var list<string> */
    public array $errors = [];

    /** @param list<array<string, mixed>> $rows */
    public function __construct(private array $rows)
    {
    }

    public function emailAccounts(): array
    {
        return $this->rows;
    }

    public function blockedEmails(): array
    {
        return [];
    }

    /** hrtime() of the first and the last host call (how long until mail flows, and its rate). */
    public ?int $first = null;
    public ?int $last = null;

    public function createInquiry(array $mail): string
    {
        $this->last = hrtime(true);
        $this->first ??= $this->last;
        $this->inquiries++;
        $this->bytes += strlen($mail['text']) + strlen($mail['html'] ?? '');
        $this->attachments += count($mail['attachments']);
        return sprintf('IQ2025%05d', $this->inquiries);
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        $this->threadCalls++;
        return false;
    }

    public function deliverMessage(array $message): void
    {
    }

    public function logError(string $message, array $context): void
    {
        $this->errors[] = $message;
    }
}

function env(string $name): string
{
    $v = getenv($name);
    if ($v === false) {
        fwrite(STDERR, "check.php: $name is not set\n");
        exit(2);
    }
    return $v;
}

$dir = $argv[1] ?? exit("usage: check.php <run dir>\n");
@mkdir("$dir/configs", 0700, true);
$ini = "$dir/configs/pcr360.ini";
// BENCH_STATE_DIR (diagnosis only): e.g. a tmpfs directory, where fsync costs nothing.
$stateDir = getenv('BENCH_STATE_DIR') ?: "$dir/state";
file_put_contents($ini, <<<INI
[bench]
email.EMAIL = "bench-master@test.local"
email.OUTGOING_TRANSPORT_TYPE = "FILE"
email.STATE_DIR = "$stateDir"
email.KEY_FILE = "$dir/pcr360-email.key"

INI);

$ports = explode(',', env('BENCH_PORTS'));
$users = explode(',', env('BENCH_USERS'));
$rows = [];
foreach ($users as $i => $user) {
    $local = strtoupper(strstr($user, '@', true) ?: $user);
    $rows[] = [
        'RECID' => 1001 + $i, 'TENANTS_RECID' => 1 + $i, 'ACCOUNT_TYPE' => 'service_desk',
        // Stored encrypted, as PCR-360 keeps tenant passwords.
        'EMAIL' => $user, 'LOGIN' => $user,
        'PASSWORD' => PCR_Utility_EmailManager::encryptPassword(env("PCR_PASS_$local"), $ini, 'bench'),
        'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$dir/email",
        'INCOMING_MAILBOX_TYPE' => env('BENCH_PROTOCOL'), 'INCOMING_HOST' => env('BENCH_HOST'),
        'INCOMING_PORT' => (int) $ports[$i], 'INCOMING_SSL' => env('BENCH_SSL'), 'CA_FILE' => env('BENCH_CA'),
        'PROCESSED_ACTION' => 'seen', 'MAX_MESSAGES' => 100000, 'TIMEOUT' => 120,
    ];
}
$host = new BenchHost($rows);
$manager = new PCR_Utility_EmailManager($ini, 'bench', $host);
if (getenv('BENCH_BASELINE') === '1') {
    // The fixed cost: PHP with the extension loaded and a manager built, no mail read.
    echo json_encode(['baseline' => true, 'php_peak_bytes' => memory_get_peak_usage(true)]), "\n";
    exit(0);
}

$started = hrtime(true);
$summary = $manager->eventCheckMail(['host' => 'pcr360.example.edu']);
$seconds = (hrtime(true) - $started) / 1e9;

$expect = (int) env('BENCH_EXPECT') * count($users);
$t = $summary['totals'];
$problems = [];
if ($summary['status'] !== 'ok') {
    $problems[] = "status {$summary['status']}";
}
foreach (['fetched' => $expect, 'inquiries' => $expect, 'failed' => 0, 'skipped' => 0, 'duplicates' => 0] as $k => $want) {
    if (($t[$k] ?? null) !== $want) {
        $problems[] = "$k is " . json_encode($t[$k] ?? null) . ", expected $want";
    }
}
if ($host->inquiries !== $expect) {
    $problems[] = "createInquiry was called {$host->inquiries} times, expected $expect";
}
if ($host->errors !== []) {
    $problems[] = 'logError was called ' . count($host->errors) . " times, first: {$host->errors[0]}";
}
foreach ($summary['errors'] ?? [] as $e) {
    $problems[] = is_string($e) ? $e : json_encode($e);
}
foreach ($summary['mailboxes'] as $m) {
    foreach ($m['errors'] as $e) {
        $problems[] = "mailbox {$m['account']}: $e";
    }
}
echo json_encode([
    'seconds' => round($seconds, 4),
    'totals' => $t,
    'host_calls' => $host->inquiries + $host->threadCalls,
    'first_call_seconds' => $host->first === null ? null : round(($host->first - $started) / 1e9, 4),
    'last_call_seconds' => $host->last === null ? null : round(($host->last - $started) / 1e9, 4),
    'text_bytes' => $host->bytes,
    'attachments' => $host->attachments,
    'php_peak_bytes' => memory_get_peak_usage(true),
    'log_errors' => count($host->errors),
    'log_error_first' => $host->errors[0] ?? null,
    'problems' => $problems,
]), "\n";
exit($problems === [] ? 0 : 1);
