<?php
declare(strict_types=1);

/**
 * A PCR_Utility_EmailHost whose Inquiries, thread entries and Error Log live in a SQLite file,
 * like PCR-360's database: several PHP processes (and a process killed half-way) share it, so
 * the tests can count what every run created, by Message-ID.
 *
 * Every createInquiry call is recorded in `calls` (message_key, attempt) before anything else.
 *
 * Options: `sleep_ms` (createInquiry waits this long AFTER noting that it started and BEFORE
 * inserting, so a test can kill the process while an Inquiry is being created), `fail_subject`
 * (createInquiry throws for subjects containing it), `items` (SD numbers that exist besides the
 * Inquiries created here), `idempotent` (createInquiry returns the existing SD number for a
 * `message_key` it already has, as the README asks of PCR-360; needs a database made with
 * `create($path, true)`). Without `idempotent` every call inserts a row, so a test sees any
 * message the extension handed over twice.
 */
final class SqliteHost implements PCR_Utility_EmailHost
{
    private PDO $db;

    public function __construct(string $path, private array $accounts = [], private array $options = [],
        private array $blocked = [])
    {
        $this->db = self::connect($path);
    }

    /**
     * Creates the database (WAL, so readers never wait for a writer); call before any child
     * starts. `$uniqueKeys`: a unique index on inquiries.message_key, for the `idempotent` option.
     */
    public static function create(string $path, bool $uniqueKeys = false): void
    {
        $db = self::connect($path);
        $db->exec('PRAGMA journal_mode=WAL');
        $db->exec('CREATE TABLE IF NOT EXISTS started (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT, pid INTEGER)');
        $db->exec('CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, message_key TEXT,
            message_id TEXT, attempt INTEGER, pid INTEGER)');
        $db->exec('CREATE TABLE IF NOT EXISTS inquiries (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT,
            subject TEXT, pid INTEGER, message_key TEXT, attempt INTEGER)');
        if ($uniqueKeys) {
            $db->exec('CREATE UNIQUE INDEX IF NOT EXISTS inquiries_message_key ON inquiries (message_key)');
        }
        $db->exec('CREATE TABLE IF NOT EXISTS threads (id INTEGER PRIMARY KEY AUTOINCREMENT, sd_number TEXT,
            message_id TEXT, auto TEXT, pid INTEGER)');
        $db->exec('CREATE TABLE IF NOT EXISTS errors (id INTEGER PRIMARY KEY AUTOINCREMENT, message TEXT,
            context TEXT, pid INTEGER)');
    }

    private static function connect(string $path): PDO
    {
        $db = new PDO('sqlite:' . $path, null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION, PDO::ATTR_TIMEOUT => 30]);
        $db->exec('PRAGMA busy_timeout=30000');
        // WAL without an fsync per commit: a commit still survives kill -9 (not a power cut).
        $db->exec('PRAGMA synchronous=NORMAL');
        return $db;
    }

    /** Rows of one table (id order). */
    public static function rows(string $path, string $table): array
    {
        $db = self::connect($path);
        return $db->query("SELECT * FROM $table ORDER BY id")->fetchAll(PDO::FETCH_ASSOC);
    }

    /** One number from a query. */
    public static function count(string $path, string $sql): int
    {
        return (int) self::connect($path)->query($sql)->fetchColumn();
    }

    public function emailAccounts(): array
    {
        return $this->accounts;
    }

    public function blockedEmails(): array
    {
        return $this->blocked;
    }

    public function createInquiry(array $mail): string
    {
        $id = (string) ($mail['message_id'] ?? '');
        $key = (string) ($mail['message_key'] ?? '');
        $attempt = $mail['attempt'] ?? null;
        $this->db->prepare('INSERT INTO started (message_id, pid) VALUES (?, ?)')->execute([$id, getmypid()]);
        $this->db->prepare('INSERT INTO calls (message_key, message_id, attempt, pid) VALUES (?, ?, ?, ?)')
            ->execute([$key, $id, $attempt, getmypid()]);
        $fail = $this->options['fail_subject'] ?? null;
        if ($fail !== null && strpos((string) $mail['subject'], $fail) !== false) {
            throw new RuntimeException("the database refused this Inquiry ($fail)");
        }
        usleep(1000 * (int) ($this->options['sleep_ms'] ?? 0));
        $values = [$id, (string) $mail['subject'], getmypid(), $key, $attempt];
        if (empty($this->options['idempotent'])) {
            $this->db->prepare('INSERT INTO inquiries (message_id, subject, pid, message_key, attempt) VALUES (?, ?, ?, ?, ?)')
                ->execute($values);
            return sprintf('IQ%05d', (int) $this->db->lastInsertId());
        }
        if ($key === '') {
            throw new LogicException('no message_key in $mail');
        }
        // The unique index makes "insert, or find the one already there" one atomic step: a
        // message handed over again after a crash (attempt > 1) gets the SD number it got before.
        $this->db->prepare('INSERT INTO inquiries (message_id, subject, pid, message_key, attempt) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (message_key) DO NOTHING')->execute($values);
        $q = $this->db->prepare('SELECT id FROM inquiries WHERE message_key = ?');
        $q->execute([$key]);
        return sprintf('IQ%05d', (int) $q->fetchColumn());
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        $exists = in_array($sdNumber, $this->options['items'] ?? [], true);
        if (!$exists && preg_match('/^IQ(\d+)$/', $sdNumber, $m)) {
            $q = $this->db->prepare('SELECT COUNT(*) FROM inquiries WHERE id = ?');
            $q->execute([(int) $m[1]]);
            $exists = (int) $q->fetchColumn() > 0;
        }
        if (!$exists) {
            return false;
        }
        $this->db->prepare('INSERT INTO threads (sd_number, message_id, auto, pid) VALUES (?, ?, ?, ?)')
            ->execute([$sdNumber, (string) ($mail['message_id'] ?? ''), $mail['auto'] ?? null, getmypid()]);
        return true;
    }

    public function deliverMessage(array $message): void
    {
        throw new LogicException('deliverMessage is not expected in these tests');
    }

    public function logError(string $message, array $context): void
    {
        $this->db->prepare('INSERT INTO errors (message, context, pid) VALUES (?, ?, ?)')
            ->execute([$message, json_encode($context), getmypid()]);
    }
}
