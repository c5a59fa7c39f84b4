<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * MBOX incoming mailboxes as a PCR-360 administrator configures them (INCOMING_PATH names the
 * mbox file), read by eventCheckMail while Debian's procmail delivers into the same file.
 */
final class MboxTest extends TestCase
{
    private const DATA = ['host' => 'pcr360.example.edu'];

    private string $dir;
    private string $mbox;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-mbox-');
        mkdir($this->dir . '/mail', 0700);
        $this->mbox = $this->dir . '/mail/servicedesk';
    }

    public function testAnMboxBecomesInquiriesOnceEachWhileProcmailDelivers(): void
    {
        $tag = token('mbox');
        $quoted = self::message(1, $tag, [], "Hello,\nFrom the third floor: the printer is broken.\n>From a quoted reply\nThanks\n");
        $short = self::message(2, $tag, ['Content-Length' => '12'], "The Content-Length says 12 bytes,\nbut this text goes on.\nEnd of request 2.\n");
        $long = self::message(3, $tag, ['Content-Length' => '999999'], "The Content-Length says far more.\n");
        $plain = [self::message(4, $tag), self::message(5, $tag)];
        file_put_contents($this->mbox, implode('', array_map([self::class, 'entry'], [$quoted, $short, $long, ...$plain])));

        // Deliveries all along the run: procmail in the background ...
        $later = [];
        mkdir($this->dir . '/queue');
        for ($i = 10; $i < 18; $i++) {
            $later[] = self::message($i, $tag);
            file_put_contents(sprintf('%s/queue/%02d.eml', $this->dir, $i), end($later));
        }
        $rc = $this->procmailrc();
        $background = proc_open(
            ['sh', '-c', 'for f in "$1"/*.eml; do procmail -f customer@example.org -m "$2" < "$f" || exit 1; done', 'sh', $this->dir . '/queue', $rc],
            [0 => ['file', '/dev/null', 'r']],
            $pipes
        );
        // ... and one while the host creates the first Inquiry (after the listing, before the
        // processed messages are deleted): it must stay in the file for the next run.
        $during = self::message(20, $tag);
        $host = new TestHost();
        $host->onCreate = function () use (&$during, $rc) {
            if ($during !== null) {
                procmail_deliver($rc, $during);
                $during = null;
            }
        };
        $ini = $this->ini(['PROCESSED_ACTION' => 'delete']);
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);

        $box = $summary['mailboxes'][0];
        $this->assertSame('MBOX', $box['protocol'], json_encode($summary));
        $this->assertSame('master', $box['account']);
        $this->assertSame([], $box['errors']);
        $this->assertSame([], $host->errors);
        $first = self::byId($host);
        foreach ([1, 2, 3, 4, 5] as $n) {
            $this->assertSame(1, $first["req-$n-$tag@example.org"] ?? 0, "request $n: one Inquiry");
        }
        $this->assertArrayNotHasKey("req-20-$tag@example.org", $first, 'delivered during the run: next run');
        $this->assertStringContainsString("<req-20-$tag@example.org>", (string) file_get_contents($this->mbox));
        foreach ([1, 2, 3, 4, 5] as $n) {
            $this->assertStringNotContainsString("<req-$n-$tag@example.org>", (string) file_get_contents($this->mbox), 'deleted');
        }

        $mails = [];
        foreach ($host->inquiries as $mail) {
            $mails[$mail['message_id']] = $mail;
        }
        // mboxrd: one level of quoting removed; Content-Length never cuts or joins messages.
        $text = $mails["req-1-$tag@example.org"]['text'];
        $this->assertStringContainsString("\nFrom the third floor: the printer is broken.\n>From a quoted reply\nThanks", str_replace("\r\n", "\n", $text));
        $this->assertStringContainsString('End of request 2.', $mails["req-2-$tag@example.org"]['text']);
        $this->assertStringContainsString('The Content-Length says far more.', $mails["req-3-$tag@example.org"]['text']);
        $this->assertSame("Request 3 $tag", $mails["req-3-$tag@example.org"]['subject']);

        $this->assertSame(0, proc_close($background), 'procmail delivered everything');
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame([], $summary['mailboxes'][0]['errors'], json_encode($summary));
        $again = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));

        $expected = [];
        foreach ([1, 2, 3, 4, 5, 20, ...range(10, 17)] as $n) {
            $expected["req-$n-$tag@example.org"] = 1;
        }
        ksort($expected);
        $all = self::byId($host);
        ksort($all);
        $this->assertSame($expected, $all, 'every message exactly one Inquiry');
        clearstatcache();
        $this->assertSame(0, filesize($this->mbox), 'all of them deleted');
        $this->assertFileDoesNotExist($this->mbox . '.lock');
    }

    public function testATenantMboxWithSeenIsNeverWritten(): void
    {
        $tag = token('seen');
        $twice = self::entry(self::message(1, $tag));
        file_put_contents($this->mbox, $twice . self::entry(self::message(2, $tag)) . $twice);
        $before = md5_file($this->mbox);
        $host = new TestHost();
        $host->accounts = [[
            'RECID' => 61,
            'TENANTS_RECID' => 1,
            'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => 'helpdesk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/sd-out',
            'INCOMING_MAILBOX_TYPE' => 'MBOX',
            'INCOMING_PATH' => $this->mbox,
            'PROCESSED_ACTION' => 'seen',
        ]];
        $ini = $this->ini([], false);
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertCount(1, $summary['mailboxes'], json_encode($summary));
        $this->assertSame([], $summary['warnings']);
        $box = $summary['mailboxes'][0];
        $this->assertSame(61, $box['account'], json_encode($summary));
        $this->assertSame('MBOX', $box['protocol']);
        // The same delivery twice (byte for byte) is one request.
        $this->assertSame(["req-1-$tag@example.org" => 1, "req-2-$tag@example.org" => 1], self::byId($host));
        clearstatcache();
        $this->assertSame($before, md5_file($this->mbox), 'seen: the file is untouched');

        $again = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));
        $this->assertSame(0, $again['totals']['fetched']);

        procmail_deliver($this->procmailrc(), self::message(3, $tag));
        $third = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, $third['mailboxes'][0]['fetched'], json_encode($third));
        $this->assertArrayHasKey("req-3-$tag@example.org", self::byId($host));
        $this->assertCount(3, $host->inquiries);
    }

    public function testAnMboxLockedByItsDeliveryAgentIsReadByTheNextRun(): void
    {
        $tag = token('lock');
        file_put_contents($this->mbox, self::entry(self::message(1, $tag)));
        touch($this->mbox . '.lock');
        $host = new TestHost();
        $ini = $this->ini(['TIMEOUT' => 1, 'PROCESSED_ACTION' => 'delete']);
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $errors = $summary['mailboxes'][0]['errors'];
        $this->assertCount(1, $errors, json_encode($summary));
        $this->assertStringContainsString('locked by another program', $errors[0]);
        $this->assertSame([], $host->inquiries);
        $this->assertFileExists($this->mbox . '.lock', 'not ours to remove');

        unlink($this->mbox . '.lock');
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, $summary['totals']['inquiries'], json_encode($summary));
        clearstatcache();
        $this->assertSame(0, filesize($this->mbox));
    }

    // ---- helpers ---------------------------------------------------------------------------

    /** An INI whose master account reads the mbox (unless $reads is false: send only). */
    private function ini(array $email = [], bool $reads = true): string
    {
        $incoming = $reads ? ['INCOMING_MAILBOX_TYPE' => 'MBOX', 'INCOMING_PATH' => $this->mbox] : [];
        return write_ini($this->dir, $email + $incoming + [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out',
            'STATE_DIR' => $this->dir . '/state',
            'LOG_FILE' => $this->dir . '/logs/email.log',
        ]);
    }

    /** A procmail rcfile delivering into the test's mbox. */
    private function procmailrc(): string
    {
        $rc = $this->dir . '/procmailrc';
        file_put_contents($rc, "DEFAULT={$this->mbox}\nLOCKSLEEP=1\nLOGFILE={$this->dir}/procmail.log\n");
        return $rc;
    }

    /** A message as a delivery agent gets it (LF line ends). */
    private static function message(int $n, string $tag, array $headers = [], ?string $body = null): string
    {
        $head = "From: Customer <customer@example.org>\nTo: Service Desk <desk@test.local>\n"
            . "Subject: Request $n $tag\nDate: Tue, 05 Mar 2024 14:22:01 -0500\n"
            . "Message-ID: <req-$n-$tag@example.org>\n";
        foreach ($headers as $name => $value) {
            $head .= "$name: $value\n";
        }
        return $head . "\n" . ($body ?? "Hello,\nrequest $n.\n");
    }

    /** $raw as an mboxrd writer stores it. */
    private static function entry(string $raw): string
    {
        $out = "From customer@example.org Tue Mar  5 14:22:01 2024\n";
        foreach (explode("\n", rtrim($raw, "\n")) as $line) {
            $out .= (preg_match('/^>*From /', $line) ? '>' : '') . $line . "\n";
        }
        return $out . "\n";
    }

    /** How many Inquiries each Message-ID became. */
    private static function byId(TestHost $host): array
    {
        $count = [];
        foreach ($host->inquiries as $mail) {
            $count[$mail['message_id']] = ($count[$mail['message_id']] ?? 0) + 1;
        }
        return $count;
    }
}

/** Delivers $raw into the mbox of rcfile $rc with Debian's procmail (dot-lock and fcntl lock). */
function procmail_deliver(string $rc, string $raw): void
{
    $proc = proc_open(['procmail', '-f', 'customer@example.org', '-m', $rc], [0 => ['pipe', 'r']], $pipes);
    if (!is_resource($proc)) {
        throw new RuntimeException('procmail is not installed (scripts/install-deps.sh installs it)');
    }
    fwrite($pipes[0], $raw);
    fclose($pipes[0]);
    $status = proc_close($proc);
    if ($status !== 0) {
        throw new RuntimeException("procmail exited with $status");
    }
}
