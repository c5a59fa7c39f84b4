<?php
/**
 * The incoming half of the README's main job: runs the System Check Email event on the demo's
 * embedded default (the INI master reads a local Maildir, `INCOMING_MAILBOX_TYPE = MAILDIR`)
 * exactly as PCR-360's event system does, then shows the summary the Events screen would store
 * and the Inquiries and thread entries this run created. A second run creates nothing.
 *
 *   php -d extension=... -d pcr_email.config=<demo>/configs/pcr360.ini demo-check.php <demo>
 *
 * Run by scripts/demo.sh; PCR_DEMO_DB names the SampleHost database (default <demo>/pcr360-demo.sqlite).
 */
declare(strict_types=1);

require __DIR__ . '/SampleHost.php';

/** Passes every call on to the SampleHost and remembers what each message brought along. */
final class RecordingHost implements PCR_Utility_EmailHost
{
    /** @var array<string, list<string>> attachment descriptions by SD number */
    public array $attachments = [];

    public function __construct(private SampleHost $inner)
    {
    }

    public function emailAccounts(): array
    {
        return $this->inner->emailAccounts();
    }

    public function blockedEmails(): array
    {
        return $this->inner->blockedEmails();
    }

    public function createInquiry(array $mail): string
    {
        $sd = $this->inner->createInquiry($mail);
        $this->remember($sd, $mail);
        return $sd;
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        $ok = $this->inner->addToThread($sdNumber, $mail);
        if ($ok) {
            $this->remember($sdNumber, $mail);
        }
        return $ok;
    }

    public function deliverMessage(array $message): void
    {
        $this->inner->deliverMessage($message);
    }

    public function logError(string $message, array $context): void
    {
        $this->inner->logError($message, $context);
    }

    private function remember(string $sd, array $mail): void
    {
        foreach ($mail['attachments'] as $a) {
            // The file at $a['path'] is removed when eventCheckMail returns: a real host copies it.
            $ok = is_file($a['path']) && filesize($a['path']) === $a['size'];
            $this->attachments[$sd][] = sprintf('%s (%s, %d bytes%s)', $a['filename'], $a['content_type'],
                $a['size'], $ok ? '' : ', FILE MISSING');
        }
    }
}

function cut(string $s, int $width): string
{
    // Characters, not bytes (no mbstring needed); invalid UTF-8 is shown as it is.
    $s = trim(preg_replace('/\s+/u', ' ', $s) ?? $s);
    if (preg_match('/^.{' . ($width - 1) . '}(?=..)/us', $s, $m)) {
        return $m[0] . '…';
    }
    return $s;
}

/** "reason: n, ..." for a skip_reasons value, whatever its shape (map of counts or list). */
function reasons(mixed $r): string
{
    if (!is_array($r) || $r === []) {
        return '';
    }
    $out = [];
    foreach ($r as $k => $v) {
        $out[] = is_int($k) ? (is_scalar($v) ? (string) $v : json_encode($v)) : "$k: " . (is_scalar($v) ? $v : json_encode($v));
    }
    return implode(', ', $out);
}

$demo = $argv[1] ?? dirname((string) ini_get('pcr_email.config'), 2);
$host = new SampleHost(getenv('PCR_DEMO_DB') ?: "$demo/pcr360-demo.sqlite");
$recording = new RecordingHost($host);
PCR_Utility_EmailManager::setDefaultHost($recording);

$marks = $host->marks();
$data = '{"host":"pcr360.example.edu"}';   // the event row's Data, as stored on the Events screen
echo "== System Check Email: (new PCR_Utility_EmailManager())->eventCheckMail('$data')\n";
$started = microtime(true);
try {
    $summary = (new PCR_Utility_EmailManager())->eventCheckMail($data);
} catch (PCR_Utility_EmailException $e) {
    fprintf(STDERR, "eventCheckMail failed: %s: %s\n", get_class($e), $e->getMessage());
    exit(1);
}
$ms = (microtime(true) - $started) * 1000;

printf("host %s, status %s, %.0f ms\n\n", $summary['host'] ?? '?', $summary['status'] ?? '?', $ms);
$cols = ['fetched', 'inquiries', 'threaded', 'skipped', 'duplicates', 'failed', 'quarantined'];
if (array_key_exists('deferred', $summary['mailboxes'][0] ?? [])) {
    $cols[] = 'deferred';   // left for the next run (MAX_MESSAGES)
}
printf("%-8s %-32s %-8s", 'account', 'mailbox', 'protocol');
foreach ($cols as $c) {
    printf(' %' . max(strlen($c), 5) . 's', $c);
}
echo "\n";
foreach ($summary['mailboxes'] ?? [] as $m) {
    printf("%-8s %-32s %-8s", (string) $m['account'], cut((string) ($m['email'] ?? ''), 32), $m['protocol'] ?? '');
    foreach ($cols as $c) {
        printf(' %' . max(strlen($c), 5) . 's', (string) ($m[$c] ?? 0));
    }
    echo "\n";
    if (($why = reasons($m['skip_reasons'] ?? [])) !== '') {
        echo "         skipped: $why\n";
    }
    foreach ($m['errors'] ?? [] as $err) {
        echo '         error: ', is_string($err) ? $err : json_encode($err, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE), "\n";
    }
}
foreach ($summary['errors'] ?? [] as $err) {
    echo 'error: ', is_string($err) ? $err : json_encode($err, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE), "\n";
}
if (isset($summary['totals'])) {
    printf("%-8s %-32s %-8s", 'totals', '', '');
    foreach ($cols as $c) {
        printf(' %' . max(strlen($c), 5) . 's', (string) ($summary['totals'][$c] ?? 0));
    }
    echo "\n";
}
echo "\nEvent Data returned (what the Events screen shows):\n",
    json_encode($summary, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE), "\n";

$inquiries = $host->inquiries($marks['inquiries']);
$thread = $host->threadEntries($marks['thread']);
echo "\n== Inquiries created by this run: ", count($inquiries), "\n";
foreach ($inquiries as $q) {
    printf("%-12s %-30s %s\n", $q['sd_number'], cut((string) $q['sender'], 30), cut((string) $q['subject'], 60));
    printf("%-12s %s\n", '', cut((string) $q['body'], 90));
    foreach ($recording->attachments[$q['sd_number']] ?? [] as $a) {
        printf("%-12s attachment: %s\n", '', $a);
    }
}
echo "\n== Thread entries added by this run: ", count($thread), "\n";
foreach ($thread as $t) {
    echo rtrim(sprintf("%-12s %-30s %-50s %s", $t['sd_number'], cut((string) $t['sender'], 30),
        cut((string) $t['subject'], 50), $t['auto'] !== null ? "auto: {$t['auto']}" : '')), "\n";
}
$errors = $host->errorLog($marks['error_log']);
if ($errors !== []) {
    echo "\n== Error Log entries written by this run: ", count($errors), "\n";
    foreach ($errors as $e) {
        echo '  ', cut((string) $e['message'], 150), "\n";
    }
}
if ($inquiries === [] && $thread === []) {
    echo "\nNothing new: every message in the Maildir was processed by an earlier run",
        " (scripts/demo.sh --reset starts over).\n";
}
$maildir = "$demo/maildir";
if (is_dir($maildir)) {
    printf("\nMaildir %s: %d in new/, %d in cur/\n", $maildir,
        count(glob("$maildir/new/*") ?: []), count(glob("$maildir/cur/*") ?: []));
}
