<?php
/**
 * Pre-flight check before switching PCR-360 to the pcr_email extension: runs checkAccount()
 * over the INI master and every tenant email account and prints one line per problem.
 * Nothing is sent, read or changed (checkAccount() connects and signs in only).
 *
 *   php php/cli/preflight.php [--config=/var/www/pcr360/configs/pcr360.ini] [--env=prod]
 *       [--rows=accounts.json | --bootstrap=app-bootstrap.php --host=My_EmailHost]
 *
 * Tenant rows come from a JSON file (a list of rows as the application's emailAccounts()
 * returns them, e.g. exported from the database) or from the application's own host class
 * (--bootstrap is required first; the class is constructed without arguments). Without
 * either, only the INI master is checked.
 *
 * Output: "PROBLEM <account>: <what>" lines, then one summary line. Exit status: 0 when every
 * account passed, 1 when any has a problem, 2 when the check itself could not run.
 */
declare(strict_types=1);

/** A host that only lists tenant rows and collects what the extension logs. */
final class Preflight_Host implements PCR_Utility_EmailHost
{
    /** @var list<string> */
    public array $logged = [];

    /** @param list<array<string, mixed>> $rows */
    public function __construct(private array $rows, private ?PCR_Utility_EmailHost $app = null)
    {
    }

    public function emailAccounts(): array
    {
        return $this->app ? $this->app->emailAccounts() : $this->rows;
    }

    public function blockedEmails(): array
    {
        return [];
    }

    public function createInquiry(array $mail): string
    {
        throw new LogicException('preflight never reads mail');
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        throw new LogicException('preflight never reads mail');
    }

    public function deliverMessage(array $message): void
    {
        throw new LogicException('preflight never sends');
    }

    public function logError(string $message, array $context): void
    {
        $this->logged[] = $message;
    }
}

/** @return list<string> what is wrong in one checkAccount() report */
function preflight_problems(array $report): array
{
    $problems = [];
    foreach (['outgoing', 'incoming', 'oauth'] as $side) {
        $part = $report[$side] ?? null;
        if (is_array($part) && ($part['ok'] ?? true) === false) {
            $where = $part['server'] ?? $part['transport'] ?? $part['protocol'] ?? '';
            $problems[] = $side . ($where !== '' ? " ($where)" : '') . ': '
                . ($part['error'] ?? 'check failed');
        }
    }
    if (!$problems && ($report['ok'] ?? false) !== true) {
        $problems[] = 'check failed';
    }
    return $problems;
}

function preflight_main(array $argv): int
{
    $opts = getopt('', ['config:', 'env:', 'rows:', 'bootstrap:', 'host:', 'help']);
    if (isset($opts['help'])) {
        fwrite(STDOUT, "usage: php preflight.php [--config=pcr360.ini] [--env=prod] "
            . "[--rows=accounts.json | --bootstrap=file.php --host=Class]\n");
        return 0;
    }
    if (!extension_loaded('pcr_email')) {
        fwrite(STDERR, "preflight: the pcr_email extension is not loaded (php -d extension=pcr_email ...)\n");
        return 2;
    }
    $rows = [];
    $app = null;
    if (isset($opts['rows'])) {
        $rows = json_decode((string) @file_get_contents($opts['rows']), true);
        if (!is_array($rows) || !array_is_list($rows)) {
            fwrite(STDERR, "preflight: {$opts['rows']} is not a JSON list of account rows\n");
            return 2;
        }
    } elseif (isset($opts['host'])) {
        if (isset($opts['bootstrap'])) {
            require $opts['bootstrap'];
        }
        $class = $opts['host'];
        if (!class_exists($class) || !is_subclass_of($class, PCR_Utility_EmailHost::class)) {
            fwrite(STDERR, "preflight: $class is not a class implementing PCR_Utility_EmailHost\n");
            return 2;
        }
        $app = new $class();
    }
    $host = new Preflight_Host($rows, $app);
    try {
        $manager = new PCR_Utility_EmailManager($opts['config'] ?? null, $opts['env'] ?? null, $host);
    } catch (PCR_Utility_EmailException $e) {
        fwrite(STDOUT, 'PROBLEM configuration: ' . $e->getMessage() . "\n");
        fwrite(STDOUT, "preflight: the INI file could not be used; nothing else was checked\n");
        return 1;
    }
    $ids = ['master'];
    foreach ($host->emailAccounts() as $row) {
        if (is_array($row) && isset($row['RECID'])) {
            $ids[] = (string) $row['RECID'];
        }
    }
    $checked = 0;
    $failed = 0;
    foreach ($ids as $id) {
        $checked++;
        try {
            $problems = preflight_problems($manager->checkAccount($id));
        } catch (PCR_Utility_EmailException $e) {
            // A row that cannot be used: the reason is what the extension logged for it.
            $reasons = array_filter($host->logged, fn($m) => str_contains($m, "(account $id,")
                || str_contains($m, "account $id:"));
            $reasons = array_filter($reasons, fn($m) => !str_contains($m, 'is stored in clear'));
            $host->logged = array_values(array_diff($host->logged, $reasons));
            $problems = $reasons ? array_values(array_unique($reasons)) : [$e->getMessage()];
        }
        foreach ($problems as $problem) {
            fwrite(STDOUT, "PROBLEM account $id: $problem\n");
        }
        $failed += $problems ? 1 : 0;
    }
    // What the extension logged meanwhile: broken rows (also reported above), passwords
    // stored in clear (a notice: encrypt them with pcr-email-encrypt).
    $logged = 0;
    foreach (array_unique($host->logged) as $message) {
        $notice = str_contains($message, 'is stored in clear');
        $logged += $notice ? 0 : 1;
        fwrite(STDOUT, ($notice ? 'NOTICE ' : 'PROBLEM log: ') . $message . "\n");
    }
    fwrite(STDOUT, "preflight: $checked account(s) checked, $failed with problems"
        . ($logged ? ", $logged other problem(s) logged" : '') . "\n");
    return $failed + $logged ? 1 : 0;
}

exit(preflight_main($argv));
