<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/SqliteHost.php';

/**
 * Several application servers, one state database (email.STATE_DSN, SPEC §8, issue 13): each
 * "server" is a PHP process with its own INI file and STATE_DIR, all naming the same MariaDB
 * database (the test servers' own, scripts/test-servers.sh), and sharing the host's SQLite
 * database as PCR-360's servers share theirs.
 *
 * - two servers checking the same mailboxes (Maildir and IMAP) at the same time: every message
 *   exactly one Inquiry;
 * - one of them killed with SIGKILL in the middle of its run, the other run again: every
 *   message exactly one Inquiry;
 * - two servers refreshing the same OAuth sign-in at the same time: one refresh, the newest
 *   refresh token kept;
 * - the database stopped in the middle of a run: an error in that run's summary, only what the
 *   host took marked processed, and the next run (database back) completes without doubling.
 */
final class SharedStateTest extends TestCase
{
    private const DATA = ['host' => 'x'];

    private string $dir;
    private string $dsn;
    private string $keyFile;

    /** @var resource|null the Dovecot users are shared with CheckMailTest and KillTest: their lock */
    private static $lock = null;

    public static function setUpBeforeClass(): void
    {
        $path = test_env('PCR_TESTENV') . '/checkmail-tests.lock';
        self::$lock = fopen($path, 'c');
        $deadline = microtime(true) + 900;
        while (!flock(self::$lock, LOCK_EX | LOCK_NB)) {
            if (microtime(true) > $deadline) {
                throw new RuntimeException("another run of the mailbox tests holds $path");
            }
            usleep(200000);
        }
    }

    public static function tearDownAfterClass(): void
    {
        if (self::$lock !== null) {
            flock(self::$lock, LOCK_UN);
            fclose(self::$lock);
            self::$lock = null;
        }
    }

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-shared-');
        // A database of this test's own (the test user may create pcr_* databases).
        $db = 'pcr_php_' . bin2hex(random_bytes(5));
        self::sql("CREATE DATABASE $db");
        $this->keyFile = $this->dir . '/pcr360-email.key';
        // The DSN's password stored encrypted, as an administrator keeps it.
        $keyIni = write_ini("$this->dir/key", ['KEY_FILE' => $this->keyFile]);
        $password = PCR_Utility_EmailManager::encryptPassword(test_env('PCR_MARIADB_PASS'), $keyIni, 'test');
        $this->dsn = sprintf('mysql://%s:%s@%s:%d/%s', test_env('PCR_MARIADB_USER'), $password,
            test_env('PCR_TEST_HOST'), (int) test_env('PCR_MARIADB_PORT'), $db);
    }

    protected function tearDown(): void
    {
        // A test that stopped the database starts it again for the next ones.
        run_checked([test_env('PCR_MARIADB_CTL'), 'start']);
        $db = substr($this->dsn, strrpos($this->dsn, '/') + 1);
        self::sql("DROP DATABASE IF EXISTS $db");
    }

    private static function sql(string $statement): string
    {
        return run_checked([test_env('PCR_MARIADB_CTL'), 'sql', $statement]);
    }

    /** Server $n's INI file: its own STATE_DIR and LOG_FILE, the shared DSN and key file. */
    private function server(int $n, array $extra = []): string
    {
        return write_ini("$this->dir/server$n", $extra + [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$this->dir/server$n/out",
            'SYSADMIN' => 'admin@test.local',
            'STATE_DIR' => "$this->dir/server$n/state",
            'LOG_FILE' => "$this->dir/server$n/email.log",
            'KEY_FILE' => $this->keyFile,
            'STATE_DSN' => $this->dsn,
            'TIMEOUT' => 10,
        ]);
    }

    /** PHP code running the event on $ini with a SqliteHost on $db; prints the summary. */
    private static function eventCode(string $ini, string $db, array $rows, array $options = []): string
    {
        return '$h = new SqliteHost(' . var_export($db, true) . ', ' . var_export($rows, true) . ', '
            . var_export($options, true) . ');'
            . 'echo json_encode((new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "test", $h))'
            . '->eventCheckMail(' . var_export(self::DATA, true) . '));';
    }

    private static function message(int $i, string $tag, string $id): string
    {
        return "From: Customer $i <customer$i@example.org>\r\nTo: Service Desk <desk@test.local>\r\n"
            . "Subject: request #$i $tag\r\nDate: Tue, 05 Mar 2024 14:22:01 -0500\r\nMessage-ID: <$id>\r\n"
            . "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello, request $i.\r\n";
    }

    /** $n messages: [Message-IDs, raw messages]. */
    private static function messages(int $n, string $tag): array
    {
        $ids = [];
        $raws = [];
        for ($i = 1; $i <= $n; $i++) {
            $ids[] = "$tag-$i@example.org";
            $raws[] = self::message($i, $tag, end($ids));
        }
        return [$ids, $raws];
    }

    /** The account row of a mailbox holding $raws: a Maildir of this test, or Dovecot's mbox4 over IMAP. */
    private function mailboxRow(string $protocol, array $raws, string $ini): array
    {
        $row = ['RECID' => 7, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk', 'DISPLAY_NAME' => 'Service Desk',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$this->dir/sd-out", 'PROCESSED_ACTION' => 'seen'];
        if ($protocol === 'MAILDIR') {
            $maildir = maildir_create($this->dir);
            foreach ($raws as $raw) {
                maildir_put($maildir, $raw);
            }
            return $row + ['EMAIL' => 'helpdesk@test.local', 'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
                'INCOMING_PATH' => $maildir];
        }
        $user = mail_user('mbox4');
        mailbox_reset('mbox4');
        dovecot_deliver_many('mbox4', $raws);
        return $row + ['EMAIL' => $user['email'], 'LOGIN' => $user['email'],
            'PASSWORD' => PCR_Utility_EmailManager::encryptPassword($user['password'], $ini, 'test'),
            'INCOMING_MAILBOX_TYPE' => 'IMAP', 'INCOMING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'INCOMING_PORT' => (int) test_env('PCR_IMAP_PORT'), 'INCOMING_SSL' => 'TLS',
            'CA_FILE' => test_env('PCR_TEST_CA'), 'TIMEOUT' => 10];
    }

    /** Inquiries per Message-ID, sorted. */
    private static function inquiryCounts(string $db): array
    {
        $counts = array_count_values(array_column(SqliteHost::rows($db, 'inquiries'), 'message_id'));
        ksort($counts);
        return $counts;
    }

    private static function eachOnce(array $ids): array
    {
        $expected = array_fill_keys($ids, 1);
        ksort($expected);
        return $expected;
    }

    public function protocolProvider(): array
    {
        return ['MAILDIR' => ['MAILDIR'], 'IMAP' => ['IMAP']];
    }

    /** @dataProvider protocolProvider */
    public function testTwoServersCheckingTheSameMailboxesAtOnceMakeOneInquiryPerMessage(string $protocol): void
    {
        [$ids, $raws] = self::messages(80, token('two'));
        $ini1 = $this->server(1);
        $ini2 = $this->server(2);
        $row = $this->mailboxRow($protocol, $raws, $ini1);
        $db = "$this->dir/host.sqlite";
        // Not idempotent: a message handed over twice would be two Inquiries.
        SqliteHost::create($db);
        // Each hand-over takes 100 ms: the server that got the mailbox holds it for 8 s.
        $options = ['sleep_ms' => 100];
        $children = [php_start(self::eventCode($ini1, $db, [$row], $options)),
            php_start(self::eventCode($ini2, $db, [$row], $options))];
        // The runs overlap: once one server reached the host, the other's whole run ends
        // while the first still holds the mailbox (it fetched nothing: it left it alone).
        $deadline = microtime(true) + 60;
        while (($holder = SqliteHost::count($db, 'SELECT pid FROM calls LIMIT 1')) === 0) {
            $this->assertLessThan($deadline, microtime(true), 'no server reached the host');
            usleep(2000);
        }
        $order = $holder === $children[0]['pid'] ? [1, 0] : [0, 1];
        $summaries = [];
        foreach ($order as $n) {
            [$exit, $out, $err] = php_wait($children[$n], 120);
            $this->assertSame(0, $exit, "server $n: $out $err");
            $summary = json_decode($out, true);
            $this->assertIsArray($summary, "server $n: $out $err");
            $this->assertSame([], array_merge(...array_column($summary['mailboxes'], 'errors')), $out);
            $summaries[$n] = $summary;
            if ($n === $order[0]) {
                $this->assertLessThan(count($ids), SqliteHost::count($db, 'SELECT COUNT(*) FROM calls'),
                    'the other server ended its run while the holder was still reading the mailbox');
            }
        }
        $this->assertSame(0, $summaries[$order[0]]['totals']['fetched'], json_encode($summaries[$order[0]]));
        // Each server's state directory holds no SQLite store: the state is in the database.
        $this->assertFileDoesNotExist("$this->dir/server1/state/pcr_email.sqlite");
        $this->assertFileDoesNotExist("$this->dir/server2/state/pcr_email.sqlite");
        // Whatever one left to the other (a message busy at the time) the next run completes.
        $again = (new PCR_Utility_EmailManager($ini2, 'test', new SqliteHost($db, [$row])))->eventCheckMail(self::DATA);
        $this->assertSame('ok', $again['status'], json_encode($again));
        $this->assertSame(self::eachOnce($ids), self::inquiryCounts($db), 'every message exactly one Inquiry');
        // One server at a time reads a mailbox (its lease in the database): one of the two
        // read it all, the other left it alone.
        $pids = array_unique(array_column(SqliteHost::rows($db, 'calls'), 'pid'));
        $this->assertCount(1, $pids, 'the mailbox was read by one server');
        $this->assertSame([], SqliteHost::rows($db, 'errors'));
    }

    /** @dataProvider protocolProvider */
    public function testAServerKilledMidRunIsCompletedByTheOther(string $protocol): void
    {
        [$ids, $raws] = self::messages(60, token('kill'));
        $ini1 = $this->server(1);
        $ini2 = $this->server(2);
        $row = $this->mailboxRow($protocol, $raws, $ini1);
        $db = "$this->dir/host.sqlite";
        // Idempotent on message_key, as the README asks of PCR-360 (see KillTest): the message
        // in the host at the moment of the kill is handed over again with attempt 2.
        SqliteHost::create($db, true);
        $options = ['idempotent' => true, 'sleep_ms' => 20];
        $first = php_start(self::eventCode($ini1, $db, [$row], $options));
        $second = php_start(self::eventCode($ini2, $db, [$row], $options));
        // The server that got the mailbox is killed after its fifth hand-over.
        $deadline = microtime(true) + 60;
        while (($pid = SqliteHost::count($db, 'SELECT pid FROM calls GROUP BY pid HAVING COUNT(*) >= 5 LIMIT 1')) === 0) {
            $this->assertLessThan($deadline, microtime(true), 'no server reached the host');
            usleep(2000);
        }
        [$victim, $other] = $pid === $first['pid'] ? [$first, $second] : [$second, $first];
        $this->assertSame($pid, $victim['pid']);
        posix_kill($victim['pid'], SIGKILL);
        [$exit] = php_wait($victim, 30);
        $this->assertSame(-SIGKILL, $exit);
        [$exit, $out, $err] = php_wait($other, 120);
        $this->assertSame(0, $exit, "$out $err");
        // The other server runs again (its next cron): what the dead one held is taken over.
        $again = (new PCR_Utility_EmailManager($other === $first ? $ini1 : $ini2, 'test', new SqliteHost($db, [$row], $options)))
            ->eventCheckMail(self::DATA);
        $this->assertSame('ok', $again['status'], json_encode($again));
        $this->assertSame(self::eachOnce($ids), self::inquiryCounts($db), 'every message exactly one Inquiry');
        $this->assertSame(0, $again['totals']['quarantined'], json_encode($again));
        $calls = SqliteHost::rows($db, 'calls');
        $this->assertCount(count($ids), array_unique(array_column($calls, 'message_key')), 'every message reached the host');
        // At most the message in the host at the kill was handed over twice: once by the dead
        // server, once again with attempt 2.
        $this->assertLessThanOrEqual(count($ids) + 1, count($calls), json_encode($calls));
        foreach (array_count_values(array_column($calls, 'message_key')) as $key => $n) {
            if ($n > 1) {
                $this->assertSame(2, $n, $key);
                $twice = array_values(array_filter($calls, fn($c) => $c['message_key'] === $key));
                $this->assertCount(1, array_filter($twice, fn($c) => (int) $c['pid'] === $victim['pid']), $key);
                $this->assertCount(1, array_filter($twice, fn($c) => (int) $c['attempt'] === 2), $key);
            }
        }
        // Handed over again only what the dead server held, each as a new attempt.
        foreach ($calls as $call) {
            if ($call['attempt'] > 1) {
                $this->assertContains($call['message_key'], array_column(array_filter($calls,
                    fn($c) => $c['pid'] === $victim['pid']), 'message_key'), json_encode($call));
            }
        }
    }

    public function testTwoServersRefreshingOneSignInAtOnceKeepTheNewestRefreshToken(): void
    {
        // Access tokens live 4 s (used for 3 s); Microsoft rotates the refresh token on every
        // use, and a refresh token used twice is refused.
        // Each refresh takes 1.5 s at the token endpoint, so the three processes' refreshes
        // overlap: without the lock in the database they would all use the same token.
        $t = cloud_tenant('microsoft', 'shared', 4, 1500);
        $ini1 = $this->server(1);
        $ini2 = $this->server(2);
        $row = cloud_row(45, $t, $t['mailbox']);
        $row['OAUTH']['SECRET_KEY'] = PCR_Utility_EmailManager::encryptPassword($t['client_secret'], $ini1, 'test');
        $host = new TestHost();
        $host->accounts = [$row];
        $m = new PCR_Utility_EmailManager($ini1, 'test', $host);
        $back = browser_sign_in($m->authorizationUrl(45, OAUTH_REDIRECT_URI));
        $m->completeAuthorization($back['state'], $back['code']);
        // The sign-in was made on server 1 and is seen by server 2 through the database.
        usleep(3_300_000);
        $send = fn(string $ini, string $subject) => php_start('$h = new TestHost(); $h->accounts = '
            . var_export([$row], true) . ';'
            . '$m = new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "test", $h);'
            . 'echo json_encode($m->send(["to" => "customer@outside.example", "subject" => '
            . var_export($subject, true) . ', "text" => "x", "kind" => "service_desk", "tenant" => 1]));');
        $subject = 'Shared ' . token('ref');
        $children = [$send($ini1, "$subject #1"), $send($ini2, "$subject #2"), $send($ini2, "$subject #3")];
        foreach ($children as $n => $child) {
            [$exit, $out, $err] = php_wait($child, 60);
            $this->assertSame(0, $exit, "$out $err");
            $this->assertSame('sent', json_decode($out, true)['status'] ?? null, "process $n: $out $err");
        }
        $stats = cloud_stats($t['client_id'], $t['mailbox']);
        $this->assertSame(1, $stats['grants']['refresh_token'], json_encode($stats));
        $this->assertSame(1, $stats['grants']['refresh_token_delayed'] ?? 0, 'the refresh was held at the endpoint');
        $this->assertSame(1, $stats['grants']['refresh_token_attempt'], 'no refresh was made with a used token');
        $this->assertSame(1, $stats['valid_refresh_tokens']);
        // After the next expiry the token kept is the newest: its refresh is accepted.
        usleep(3_300_000);
        [$exit, $out, $err] = php_wait($send($ini2, "$subject #4"), 60);
        $this->assertSame('sent', json_decode($out, true)['status'] ?? null, "$out $err");
        $stats = cloud_stats($t['client_id'], $t['mailbox']);
        $this->assertSame(2, $stats['grants']['refresh_token']);
        $this->assertSame(2, $stats['grants']['refresh_token_attempt'], 'no refresh was refused');
    }

    public function testTheDatabaseStoppedMidRunIsAnErrorAndTheNextRunCompletesWithoutDoubling(): void
    {
        [$ids, $raws] = self::messages(60, token('down'));
        $ini = $this->server(1);
        $row = $this->mailboxRow('MAILDIR', $raws, $ini);
        $maildir = $row['INCOMING_PATH'];
        $db = "$this->dir/host.sqlite";
        // Not idempotent: a message handed over twice would be two Inquiries.
        SqliteHost::create($db);
        // 100 ms in the host per message: the database stops while the run goes on.
        $child = php_start(self::eventCode($ini, $db, [$row], ['sleep_ms' => 100]));
        $deadline = microtime(true) + 60;
        while (SqliteHost::count($db, 'SELECT COUNT(*) FROM calls') < 10) {
            $this->assertLessThan($deadline, microtime(true), 'the run never reached the host');
            usleep(2000);
        }
        run_checked([test_env('PCR_MARIADB_CTL'), 'stop']);
        [$exit, $out, $err] = php_wait($child, 120);
        $this->assertSame(0, $exit, "$out $err");
        $summary = json_decode($out, true);
        $this->assertIsArray($summary, "$out $err");
        $this->assertSame('errors', $summary['status'], $out);
        $errors = implode("\n", array_merge(...array_column($summary['mailboxes'], 'errors')));
        $this->assertStringContainsString('state database', $errors, $out);
        $this->assertStringNotContainsString(test_env('PCR_MARIADB_PASS'), $out);
        $this->assertStringNotContainsString(test_env('PCR_MARIADB_PASS'), $err);
        $this->assertStringNotContainsString(test_env('PCR_MARIADB_PASS'), (string) @file_get_contents("$this->dir/server1/email.log"));
        // The message in the host when the database went away waits in the journal.
        $journal = "$this->dir/server1/state/pcr_email-unrecorded.jsonl";
        $this->assertNotSame('', trim((string) @file_get_contents($journal)), 'the journal keeps what the host took');
        fwrite(STDERR, "\nSharedStateTest: the run without its database reported: $errors\n");
        $taken = array_column(SqliteHost::rows($db, 'inquiries'), 'message_id');
        $this->assertLessThan(count($ids), count($taken), 'the run stopped part-way');
        // Marked processed (seen) only what the host took.
        foreach (maildir_files($maildir) as $f) {
            preg_match('/^Message-ID: <([^>]+)>/mi', (string) file_get_contents("$maildir/$f"), $m);
            if (preg_match('#^cur/.*:2,[A-Z]*S#', $f)) {
                $this->assertContains($m[1], $taken, "$f marked seen but not taken by the host");
            }
        }

        run_checked([test_env('PCR_MARIADB_CTL'), 'start']);
        $again = (new PCR_Utility_EmailManager($ini, 'test', new SqliteHost($db, [$row])))->eventCheckMail(self::DATA);
        $this->assertSame('ok', $again['status'], json_encode($again));
        $this->assertSame(self::eachOnce($ids), self::inquiryCounts($db), 'every message exactly one Inquiry');
        $this->assertSame('', (string) file_get_contents($journal), 'the journal was recorded and emptied');
        foreach (maildir_files($maildir) as $f) {
            $this->assertMatchesRegularExpression('#^cur/[^/]+:2,[A-Z]*S[A-Z]*$#', $f);
        }
    }
}
