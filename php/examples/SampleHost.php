<?php
/**
 * A sample PCR_Utility_EmailHost, as PCR-360 implements it, storing Inquiries, thread entries,
 * in-app Messages and the Error Log in SQLite (php8.2-sqlite3). Used by the README's main job.
 *
 * createInquiry() and addToThread() are idempotent on `$mail['message_key']` (README, "Residual
 * window"): a message handed over again after a crash (`$mail['attempt']` > 1) gets the Inquiry
 * or thread entry it got the first time, never a second one.
 */
declare(strict_types=1);

final class SampleHost implements PCR_Utility_EmailHost
{
    private SQLite3 $db;

    public function __construct(string $path)
    {
        $this->db = new SQLite3($path);
        $this->db->enableExceptions(true);
        $this->db->busyTimeout(10000);
        $this->db->exec('PRAGMA journal_mode=WAL');
        $this->db->exec('CREATE TABLE IF NOT EXISTS inquiries (
            sd_number TEXT PRIMARY KEY, created TEXT, sender TEXT, subject TEXT, body TEXT,
            attachments INTEGER, message_id TEXT, mailbox TEXT, message_key TEXT)');
        $this->db->exec('CREATE TABLE IF NOT EXISTS thread (
            id INTEGER PRIMARY KEY, sd_number TEXT, created TEXT, sender TEXT, subject TEXT, auto TEXT,
            message_key TEXT)');
        foreach (['inquiries', 'thread'] as $table) {   // a database of an older sample
            if (!$this->db->querySingle("SELECT COUNT(*) FROM pragma_table_info('$table') WHERE name = 'message_key'")) {
                $this->db->exec("ALTER TABLE $table ADD COLUMN message_key TEXT");
            }
        }
        // What makes a message handed over twice one Inquiry (one thread entry) all the same.
        $this->db->exec('CREATE UNIQUE INDEX IF NOT EXISTS inquiries_message_key ON inquiries (message_key)');
        $this->db->exec('CREATE UNIQUE INDEX IF NOT EXISTS thread_message_key ON thread (sd_number, message_key)');
        $this->db->exec('CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, created TEXT, subject TEXT, recipients TEXT)');
        $this->db->exec('CREATE TABLE IF NOT EXISTS error_log (id INTEGER PRIMARY KEY, created TEXT, message TEXT, context TEXT)');
        // An existing Service Desk item (tenant 1): the demo sends on its thread and the sample
        // Maildir holds replies naming it.
        $this->db->exec("INSERT OR IGNORE INTO inquiries (sd_number, created, sender, subject, body, attachments,
            message_id, mailbox) VALUES ('SO201700043', '2017-06-02T10:15:00+00:00',
            'grace@tenant1.example.edu', 'Phone line down', 'The phone line in the front office is down.', 0,
            NULL, 'servicedesk@tenant1.example.edu')");
    }

    /** Tenant 1 has a Default and a Service Desk account; tenant 2 only a Default one. */
    public function emailAccounts(): array
    {
        $dir = dirname((string) ini_get('pcr_email.config'), 2) . '/email';
        return [
            ['RECID' => 101, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'noreply@tenant1.example.edu',
             'DISPLAY_NAME' => 'Tenant 1', 'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$dir/tenant1-default"],
            ['RECID' => 102, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk', 'EMAIL' => 'servicedesk@tenant1.example.edu',
             'DISPLAY_NAME' => 'Tenant 1 Service Desk', 'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$dir/tenant1-servicedesk"],
            ['RECID' => 201, 'TENANTS_RECID' => 2, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'noreply@tenant2.example.edu',
             'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$dir/tenant2-default"],
        ];
    }

    public function blockedEmails(): array
    {
        return ['*@spam.example', '/^\[SPAM\]/'];
    }

    public function createInquiry(array $mail): string
    {
        // One transaction holding the write lock: the lookup, the next number and the INSERT
        // are one step. Looked up every time, not only when $mail['attempt'] > 1: a state
        // database restored from a backup hands a message over again as attempt 1.
        $this->db->exec('BEGIN IMMEDIATE');
        try {
            $find = $this->db->prepare('SELECT sd_number FROM inquiries WHERE message_key = :k');
            $find->bindValue(':k', $mail['message_key']);
            $found = $find->execute();
            $sd = $found->fetchArray(SQLITE3_NUM)[0] ?? null;
            $found->finalize();
            if ($sd === null) {
                $prefix = 'IQ' . date('Y');
                $n = (int) $this->db->querySingle("SELECT COUNT(*) FROM inquiries WHERE sd_number LIKE '$prefix%'") + 1;
                $sd = sprintf('%s%05d', $prefix, $n);
                $st = $this->db->prepare('INSERT INTO inquiries (sd_number, created, sender, subject, body, attachments,
                    message_id, mailbox, message_key) VALUES (:sd, :c, :f, :s, :b, :a, :m, :mb, :k)');
                $st->bindValue(':sd', $sd);
                $st->bindValue(':c', date('c'));
                $st->bindValue(':f', $mail['from']['email'] ?? '');
                $st->bindValue(':s', $mail['subject']);
                $st->bindValue(':b', $mail['text']);
                $st->bindValue(':a', count($mail['attachments']));
                $st->bindValue(':m', $mail['message_id']);
                $st->bindValue(':mb', $mail['account']['EMAIL'] ?? '');
                $st->bindValue(':k', $mail['message_key']);
                $st->execute();
            }
            $this->db->exec('COMMIT');
            return $sd;
        } catch (Throwable $e) {
            $this->db->exec('ROLLBACK');
            throw $e;   // the message stays in the mailbox; the next run hands it over again
        }
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        $exists = $this->db->querySingle("SELECT COUNT(*) FROM inquiries WHERE sd_number = '"
            . SQLite3::escapeString($sdNumber) . "'");
        if (!$exists) {
            return false;
        }
        // Already on this item's thread (handed over again after a crash): nothing to add.
        $st = $this->db->prepare('INSERT INTO thread (sd_number, created, sender, subject, auto, message_key)
            VALUES (:sd, :c, :f, :s, :a, :k) ON CONFLICT (sd_number, message_key) DO NOTHING');
        $st->bindValue(':sd', $sdNumber);
        $st->bindValue(':c', date('c'));
        $st->bindValue(':f', $mail['from']['email'] ?? '');
        $st->bindValue(':s', $mail['subject']);
        $st->bindValue(':a', $mail['auto']);
        $st->bindValue(':k', $mail['message_key']);
        $st->execute();
        return true;
    }

    public function deliverMessage(array $message): void
    {
        $st = $this->db->prepare('INSERT INTO messages (created, subject, recipients) VALUES (:c, :s, :r)');
        $st->bindValue(':c', date('c'));
        $st->bindValue(':s', $message['subject']);
        $st->bindValue(':r', json_encode($message['to']));
        $st->execute();
    }

    public function logError(string $message, array $context): void
    {
        $st = $this->db->prepare('INSERT INTO error_log (created, message, context) VALUES (:c, :m, :x)');
        $st->bindValue(':c', date('c'));
        $st->bindValue(':m', $message);
        $st->bindValue(':x', json_encode($context));
        $st->execute();
    }

    /** The highest row ids of the inquiries and thread tables, to list what a run adds. */
    public function marks(): array
    {
        return [
            'inquiries' => (int) $this->db->querySingle('SELECT COALESCE(MAX(rowid), 0) FROM inquiries'),
            'thread' => (int) $this->db->querySingle('SELECT COALESCE(MAX(id), 0) FROM thread'),
            'error_log' => (int) $this->db->querySingle('SELECT COALESCE(MAX(id), 0) FROM error_log'),
        ];
    }

    /** Inquiries, in creation order; only those added after the row id `$after` (see marks()). */
    public function inquiries(int $after = 0): array
    {
        return $this->rows('SELECT * FROM inquiries WHERE rowid > ' . $after . ' ORDER BY rowid');
    }

    /** Thread entries, in order; only those after the id `$after` (see marks()). */
    public function threadEntries(int $after = 0): array
    {
        return $this->rows('SELECT * FROM thread WHERE id > ' . $after . ' ORDER BY id');
    }

    /** Error Log entries after the id `$after` (see marks()). */
    public function errorLog(int $after = 0): array
    {
        return $this->rows('SELECT * FROM error_log WHERE id > ' . $after . ' ORDER BY id');
    }

    /** Every row a query returns, as associative arrays. */
    private function rows(string $sql): array
    {
        $out = [];
        $r = $this->db->query($sql);
        while ($row = $r->fetchArray(SQLITE3_ASSOC)) {
            $out[] = $row;
        }
        return $out;
    }
}
