<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/SqliteHost.php';

/**
 * email.STATE_DSN belongs to the INI file that says it (issue 13 review): one PHP process with
 * two managers whose INI files share a STATE_DIR (as [prod] and [test] of one pcr360.ini share
 * the default) keeps each one's state where its own file says, whichever was loaded last; and
 * a DSN the parser cannot read never shows any part of its password.
 */
final class StateDsnTest extends TestCase
{
    private const DATA = ['host' => 'x'];

    private string $dir;
    private string $db;
    private string $dsn;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-statedsn-');
        $this->db = 'pcr_php_' . bin2hex(random_bytes(5));
        self::sql("CREATE DATABASE $this->db");
        $keyIni = write_ini("$this->dir/key", ['KEY_FILE' => "$this->dir/pcr360-email.key"]);
        $password = PCR_Utility_EmailManager::encryptPassword(test_env('PCR_MARIADB_PASS'), $keyIni, 'test');
        $this->dsn = sprintf('mysql://%s:%s@%s:%d/%s', test_env('PCR_MARIADB_USER'), $password,
            test_env('PCR_TEST_HOST'), (int) test_env('PCR_MARIADB_PORT'), $this->db);
    }

    protected function tearDown(): void
    {
        self::sql("DROP DATABASE IF EXISTS $this->db");
    }

    private static function sql(string $statement): string
    {
        return run_checked([test_env('PCR_MARIADB_CTL'), 'sql', $statement]);
    }

    private function ledgerRows(): int
    {
        return (int) trim(self::sql("SELECT COUNT(*) FROM $this->db.pcr_email_ledger"));
    }

    /** An INI file in $name with the shared STATE_DIR, and $extra. */
    private function ini(string $name, array $extra): string
    {
        return write_ini("$this->dir/$name", $extra + [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$this->dir/$name/out",
            'SYSADMIN' => 'admin@test.local',
            'STATE_DIR' => "$this->dir/state",
            'LOG_FILE' => "$this->dir/$name/email.log",
            'KEY_FILE' => "$this->dir/pcr360-email.key",
            'TIMEOUT' => 10,
        ]);
    }

    private static function message(string $id): string
    {
        return "From: Customer <customer@example.org>\r\nTo: Service Desk <desk@test.local>\r\n"
            . "Subject: request $id\r\nDate: Tue, 05 Mar 2024 14:22:01 -0500\r\nMessage-ID: <$id>\r\n"
            . "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello.\r\n";
    }

    private function runEvent(PCR_Utility_EmailManager $manager): void
    {
        $summary = $manager->eventCheckMail(self::DATA);
        $this->assertSame('ok', $summary['status'], json_encode($summary));
    }

    public function testTwoManagersWithOneStateDirKeepTheirStateWhereTheirOwnIniSays(): void
    {
        $iniA = $this->ini('a', ['STATE_DSN' => $this->dsn]);
        $iniB = $this->ini('b', []);
        $row = fn(int $recid, string $maildir) => ['RECID' => $recid, 'TENANTS_RECID' => 1,
            'ACCOUNT_TYPE' => 'service_desk', 'DISPLAY_NAME' => 'Service Desk', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$this->dir/sd-out", 'PROCESSED_ACTION' => 'seen', 'EMAIL' => "helpdesk$recid@test.local",
            'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $maildir];
        $mailA = maildir_create($this->dir, 'MaildirA');
        $mailB = maildir_create($this->dir, 'MaildirB');
        $rowA = $row(7, $mailA);
        $rowB = $row(8, $mailB);
        $hostDb = "$this->dir/host.sqlite";
        SqliteHost::create($hostDb);
        // Both managers live side by side, as in one PHP process serving both INI files.
        $managerA = new PCR_Utility_EmailManager($iniA, 'test', new SqliteHost($hostDb, [$rowA]));
        $managerB = new PCR_Utility_EmailManager($iniB, 'test', new SqliteHost($hostDb, [$rowB]));

        // A's first run, B loaded after A: A's ledger is in the database, no SQLite store in the STATE_DIR.
        maildir_put($mailA, self::message(token('a1') . '@example.org'));
        $this->runEvent($managerA);
        $this->assertSame(1, $this->ledgerRows());
        $this->assertFileDoesNotExist("$this->dir/state/pcr_email.sqlite");

        // B (no STATE_DSN, same STATE_DIR) runs in the same process: SQLite.
        maildir_put($mailB, self::message(token('b1') . '@example.org'));
        $this->runEvent($managerB);
        $this->assertFileExists("$this->dir/state/pcr_email.sqlite");
        $this->assertSame(1, $this->ledgerRows(), "B's ledger is not in A's database");

        // A again, after B's run: still the database, not B's SQLite.
        maildir_put($mailA, self::message(token('a2') . '@example.org'));
        $this->runEvent($managerA);
        $this->assertSame(2, $this->ledgerRows(), "A's second run kept its ledger in the database");

        // A third manager of A's file loaded after B's: B still uses SQLite.
        new PCR_Utility_EmailManager($iniA, 'test', new TestHost());
        maildir_put($mailB, self::message(token('b2') . '@example.org'));
        $this->runEvent($managerB);
        $this->assertSame(2, $this->ledgerRows(), "B's second run kept its ledger in SQLite");
        $this->assertCount(4, SqliteHost::rows($hostDb, 'inquiries'), 'each message one Inquiry');
    }

    public function testADsnWithAnUnencodedQuestionMarkInThePasswordNeverShowsThePassword(): void
    {
        $ini = $this->ini('leak', ['STATE_DSN' => 'mysql://pcr:Xp@s/s?Ytail9@127.0.0.1/pcr360']);
        try {
            (new PCR_Utility_EmailManager($ini, 'test', new TestHost()))->eventCheckMail(self::DATA);
            $this->fail('the DSN was accepted');
        } catch (Throwable $e) {
            $message = $e->getMessage();
            foreach (['Xp', 's/s', 'Ytail9', 'tail'] as $part) {
                $this->assertStringNotContainsString($part, $message);
            }
            $this->assertStringContainsString('STATE_DSN', $message);
            $this->assertStringContainsString('percent-encode ? # @ / in the password', $message);
        }
    }
}
