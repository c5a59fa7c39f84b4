<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

require_once __DIR__ . '/SqliteHost.php';

/**
 * The System Check Email event (eventCheckMail) as PCR-360's event system runs it, against real
 * mailboxes: Dovecot over IMAP/IMAPS/POP3/POP3S (users mbox1..mbox5 only, emptied by each
 * test that uses them) and Maildirs of the test's own.
 */
final class CheckMailTest extends TestCase
{
    private const VHOST = 'pcr360.example.edu';
    private const DATA = ['host' => self::VHOST];

    private string $dir;

    /** @var resource|null held while this class runs: the Dovecot users are shared state */
    private static $lock = null;

    /**
     * Two runs of this suite at once (another developer's, a CI job on the same servers) would
     * empty and read each other's mailboxes: they take turns instead (bounded wait).
     */
    public static function setUpBeforeClass(): void
    {
        $path = test_env('PCR_TESTENV') . '/checkmail-tests.lock';
        self::$lock = fopen($path, 'c');
        $deadline = microtime(true) + 900;
        while (!flock(self::$lock, LOCK_EX | LOCK_NB)) {
            if (microtime(true) > $deadline) {
                throw new RuntimeException("another run of CheckMailTest holds $path");
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
        $this->dir = temp_dir('pcr-checkmail-');
    }

    // ---- 1. every mailbox type: the $mail array, PROCESSED_ACTION, mail read by someone else --

    /** A realistic message: encoded subject and names, text + HTML alternatives, a PDF. */
    private static function richMessage(string $tag, string $to, string $pdf): string
    {
        $subject = '=?utf-8?b?' . base64_encode("Drucker kaputt – Grüße $tag") . '?=';
        return "From: =?utf-8?q?Zo=C3=AB_M=C3=BCller?= <zoe@example.org>\r\n"
            . "To: Service Desk <$to>, other@example.org\r\n"
            . "Cc: Boss <boss@example.org>\r\n"
            . "Reply-To: zoe.private@example.org\r\n"
            . "Subject: $subject\r\n"
            . "Date: Tue, 05 Mar 2024 14:22:01 -0500\r\n"
            . "Message-ID: <rich-$tag@example.org>\r\n"
            . "X-Custom: yes\r\n"
            . "MIME-Version: 1.0\r\n"
            . "Content-Type: multipart/mixed; boundary=\"mix-$tag\"\r\n"
            . "\r\n"
            . "--mix-$tag\r\n"
            . "Content-Type: multipart/alternative; boundary=\"alt-$tag\"\r\n"
            . "\r\n"
            . "--alt-$tag\r\n"
            . "Content-Type: text/plain; charset=iso-8859-1\r\n"
            . "Content-Transfer-Encoding: quoted-printable\r\n"
            . "\r\n"
            . "Gr=FC=DFe, the printer on floor 3 is broken.\r\n"
            . "--alt-$tag\r\n"
            . "Content-Type: text/html; charset=utf-8\r\n"
            . "\r\n"
            . "<p>Grüße, the <b>printer</b> on floor 3 is broken.</p>\r\n"
            . "--alt-$tag--\r\n"
            . "--mix-$tag\r\n"
            . "Content-Type: application/pdf; name=\"report.pdf\"\r\n"
            . "Content-Disposition: attachment; filename=\"report.pdf\"\r\n"
            . "Content-Transfer-Encoding: base64\r\n"
            . "\r\n"
            . chunk_split(base64_encode($pdf), 76, "\r\n")
            . "--mix-$tag--\r\n";
    }

    public function mailboxProvider(): array
    {
        return [
            'IMAP STARTTLS, seen' => ['IMAP', 'mbox1', 'seen'],
            'IMAPS, move:Done' => ['IMAPS', 'mbox2', 'move:Done'],
            'IMAP STARTTLS, delete' => ['IMAP', 'mbox5', 'delete'],
            'POP3 STLS' => ['POP3', 'mbox3', 'seen'],
            'POP3S' => ['POP3S', 'mbox4', 'seen'],
            'MAILDIR, seen' => ['MAILDIR', '', 'seen'],
            'MAILDIR, move:Done' => ['MAILDIR', '', 'move:Done'],
        ];
    }

    /** @dataProvider mailboxProvider */
    public function testMessagesBecomeInquiriesWithTheMailArray(string $protocol, string $local, string $action): void
    {
        $tag = token('rich');
        $pdf = "%PDF-1.4\n" . random_bytes(3000) . "\n%%EOF\n";
        $maildir = null;
        if ($protocol === 'MAILDIR') {
            $maildir = maildir_create($this->dir);
            $row = $this->maildirRow(31, $maildir, ['PROCESSED_ACTION' => $action]);
            $email = 'helpdesk@test.local';
            maildir_put($maildir, self::richMessage($tag, $email, $pdf));
            // Someone read this one in a mail client before the check.
            maildir_put($maildir, self::message("already read $tag", ['Message-ID' => "<read-$tag@example.org>"]), true);
        } else {
            mailbox_reset($local);
            $row = $this->row(31, $protocol, $local, ['PROCESSED_ACTION' => $action]);
            $email = $row['EMAIL'];
            dovecot_deliver($local, self::richMessage($tag, $email, $pdf));
            dovecot_deliver($local, self::message("already read $tag", ['Message-ID' => "<read-$tag@example.org>"]));
            doveadm('flags', 'add', '-u', $email, '\Seen', 'mailbox', 'INBOX', 'HEADER', 'Message-ID', "read-$tag");
            $flags = array_column(mailbox_messages($local), 'flags');
            $this->assertSame([[], ['\Seen']], $flags, 'one message unread, one read before the check');
        }
        $host = new TestHost();
        $host->accounts = [$row];
        $during = [];
        $host->onCreate = function (array $mail) use (&$during) {
            foreach ($mail['attachments'] as $a) {
                $during[$a['filename']] = is_readable($a['path']) ? file_get_contents($a['path']) : null;
            }
        };
        $m = $this->manager($host);
        $summary = $m->eventCheckMail(self::DATA);

        $this->assertSame('ok', $summary['status']);
        $this->assertSame(self::VHOST, $summary['host']);
        $this->assertSame('prod', $summary['environment']);
        $box = self::box($summary, 31);
        $this->assertSame($protocol === 'MAILDIR' ? 'MAILDIR' : substr($protocol, 0, 4), $box['protocol']);
        $this->assertSame($email, $box['email']);
        $this->assertSame(2, $box['fetched'], json_encode($summary));
        $this->assertSame(2, $box['inquiries']);
        $this->assertSame([], $box['errors']);
        $this->assertSame(2, $summary['totals']['inquiries']);
        $this->assertSame([], $host->errors);
        $this->assertSame(["rich-$tag@example.org", "read-$tag@example.org"], self::inquiryIds($host));

        $mail = array_values($host->inquiries)[0];
        $this->assertSame(self::ksorted(['RECID' => 31, 'EMAIL' => $email, 'TENANTS_RECID' => 1]), self::ksorted($mail['account']));
        $this->assertSame(self::VHOST, $mail['host']);
        $this->assertSame("rich-$tag@example.org", $mail['message_id']);
        $this->assertSame(['email' => 'zoe@example.org', 'name' => 'Zoë Müller'], $mail['from']);
        $this->assertSame([['email' => $email, 'name' => 'Service Desk'], ['email' => 'other@example.org', 'name' => null]], $mail['to']);
        $this->assertSame([['email' => 'boss@example.org', 'name' => 'Boss']], $mail['cc']);
        $this->assertSame([['email' => 'zoe.private@example.org', 'name' => null]], $mail['reply_to']);
        $this->assertSame("Drucker kaputt – Grüße $tag", $mail['subject']);
        $this->assertSame('2024-03-05T14:22:01-05:00', $mail['date']);
        $this->assertStringContainsString('Grüße, the printer on floor 3 is broken.', $mail['text']);
        $this->assertStringContainsString('<b>printer</b>', $mail['html']);
        $this->assertCount(1, $mail['attachments']);
        $att = $mail['attachments'][0];
        $this->assertSame('report.pdf', $att['filename']);
        $this->assertSame('application/pdf', $att['content_type']);
        $this->assertSame(strlen($pdf), $att['size']);
        $this->assertFalse($att['inline']);
        $this->assertSame(['report.pdf' => $pdf], $during, 'the attachment file is readable during the call');
        $this->assertFileDoesNotExist($att['path'], 'and removed after it');
        $this->assertNull($mail['sd_number']);
        $this->assertNull($mail['auto']);
        $this->assertNull($mail['in_reply_to']);
        $this->assertSame([], $mail['references']);
        $this->assertSame('yes', $mail['headers']['x-custom']);
        $this->assertNotEmpty(array_values($host->inquiries)[1]['text']);

        // PROCESSED_ACTION at the server.
        $ids = ["rich-$tag@example.org", "read-$tag@example.org"];
        if ($maildir !== null) {
            $files = maildir_files($maildir);
            $this->assertCount(2, $files);
            foreach ($files as $f) {
                if ($action === 'seen') {
                    $this->assertMatchesRegularExpression('#^cur/[^/]+:2,[A-Z]*S[A-Z]*$#', $f, 'flagged seen');
                } else {
                    $this->assertStringStartsWith('.Done/cur/', $f, 'moved to the folder');
                }
            }
        } elseif (str_starts_with($protocol, 'POP3')) {
            $this->assertSame([], mailbox_messages($local), 'POP3: DELE after the host accepted them');
        } elseif ($action === 'seen') {
            $inbox = mailbox_messages($local);
            $this->assertSame($ids, array_column($inbox, 'message_id'));
            foreach ($inbox as $msg) {
                $this->assertContains('\Seen', $msg['flags']);
            }
        } elseif ($action === 'delete') {
            $this->assertSame([], mailbox_messages($local));
        } else {
            $this->assertSame([], mailbox_messages($local));
            $this->assertSame($ids, array_column(mailbox_messages($local, 'Done'), 'message_id'));
        }

        // Nothing new: a second run creates nothing.
        $again = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));
        $this->assertSame(0, $again['totals']['errors']);
        $this->assertCount(2, $host->inquiries);
    }

    // ---- 2. threading -----------------------------------------------------------------------

    public function testRepliesGoToTheirThreadOnlyWhenTheReferenceIsOurs(): void
    {
        $maildir = maildir_create($this->dir);
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(41, $maildir)];
        // Items that exist in the application.
        $host->inquiries['SR201700043'] = ['seed' => true];
        $host->inquiries['SO201700044'] = ['seed' => true];
        $m = $this->manager($host);
        $sent = $m->send(['to' => 'Customer <customer@example.org>', 'subject' => 'Your printer', 'text' => 'We are on it.',
            'kind' => 'sd_thread', 'tenant' => 1, 'sd_number' => 'SR201700043']);
        $this->assertSame('written', $sent['status']);
        $this->assertSame(41, $sent['account']);
        $ours = trim($sent['message_id'], '<>');
        $this->assertMatchesRegularExpression('/^pcr\.SR201700043\.[0-9a-f]+\.[0-9a-f]{24}@test\.local$/', $ours);
        // The same id with one character of its keyed hash changed.
        $at = strpos($ours, '@');
        $forged = substr($ours, 0, $at - 1) . ($ours[$at - 1] === '0' ? '1' : '0') . substr($ours, $at);

        $t = token('thr');
        $viaHeader = self::message("Re: Your printer $t", ['In-Reply-To' => "<$ours>", 'References' => "<$ours>"]);
        $viaForged = self::message("Re: Your printer $t forged", ['In-Reply-To' => "<$forged>", 'References' => "<$forged>"]);
        $viaSubject = self::message("Re: [SO201700044] scanner $t");
        $unknownItem = self::message("Re: [SO201799999] old item $t");
        foreach ([$viaHeader, $viaForged, $viaSubject, $unknownItem] as $raw) {
            maildir_put($maildir, $raw);
        }
        $summary = $m->eventCheckMail(self::DATA);
        $box = self::box($summary, 41);
        $this->assertSame(2, $box['threaded'], json_encode($summary));
        $this->assertSame(2, $box['inquiries']);

        $this->assertCount(1, $host->threads['SR201700043'] ?? [], 'the reply naming our Message-ID');
        $reply = $host->threads['SR201700043'][0];
        $this->assertSame(self::idOf($viaHeader), $reply['message_id']);
        $this->assertSame('SR201700043', $reply['sd_number']);
        $this->assertSame($ours, $reply['in_reply_to']);
        $this->assertCount(1, $host->threads['SO201700044'] ?? [], 'the SD number in the subject');
        $this->assertSame(self::idOf($viaSubject), $host->threads['SO201700044'][0]['message_id']);

        $new = array_values(array_filter($host->inquiries, fn($m) => !isset($m['seed'])));
        $byId = array_column($new, null, 'message_id');
        $this->assertSame([self::idOf($viaForged), self::idOf($unknownItem)], array_keys($byId));
        $this->assertNull($byId[self::idOf($viaForged)]['sd_number'], 'a forged reference is not trusted');
        // addToThread said there is no such item: a new Inquiry that still knows which item the
        // sender named (SPEC §5: "matched, or null").
        $this->assertSame('SO201799999', $byId[self::idOf($unknownItem)]['sd_number']);
    }

    // ---- 3. auto-replies, bounces, our own mail, blocked senders ----------------------------

    private static function dsn(string $subject, string $original): string
    {
        return "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n"
            . "To: desk@test.local\r\n"
            . "Subject: $subject\r\n"
            . 'Message-ID: <' . token('dsn') . "@mx.example.org>\r\n"
            . "MIME-Version: 1.0\r\n"
            . "Content-Type: multipart/report; report-type=delivery-status; boundary=\"rep\"\r\n"
            . "\r\n--rep\r\nContent-Type: text/plain\r\n\r\nThe message could not be delivered.\r\n"
            . "--rep\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
            . "Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            . "--rep\r\nContent-Type: text/rfc822-headers\r\n\r\n$original"
            . "--rep--\r\n";
    }

    public function testAutoRepliesBouncesAndOwnMailNeverCreateInquiries(): void
    {
        $maildir = maildir_create($this->dir);
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(51, $maildir)];
        $host->inquiries['SO201700043'] = ['seed' => true];
        $t = token('auto');
        $autoItem = self::message("Automatic reply: [SO201700043] printer $t", ['Auto-Submitted' => 'auto-replied']);
        $autoNoItem = self::message("Out of office $t", ['X-Autoreply' => 'yes']);
        $bounce = self::dsn("Undelivered Mail Returned to Sender $t", "Subject: hello\r\n");
        $bounceItem = self::dsn("Undelivered: [SO201700043] printer $t", "Subject: [SO201700043] printer\r\n");
        $own = self::message("Loop $t", ['From' => 'Service Desk <helpdesk@test.local>']);
        $human = self::message("Printer $t", ['Auto-Submitted' => 'no']);
        foreach ([$autoItem, $autoNoItem, $bounce, $bounceItem, $own, $human] as $raw) {
            maildir_put($maildir, $raw);
        }
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $box = self::box($summary, 51);
        $this->assertSame(6, $box['fetched'], json_encode($summary));
        $this->assertSame(1, $box['inquiries']);
        $this->assertSame(2, $box['threaded']);
        $this->assertSame(3, $box['skipped']);
        $this->assertSame(['auto-reply' => 1, 'bounce' => 1, 'own mail' => 1], self::ksorted($box['skip_reasons']));
        $this->assertSame(3, $summary['totals']['skipped']);

        $new = array_values(array_filter($host->inquiries, fn($m) => !isset($m['seed'])));
        $this->assertSame([self::idOf($human)], array_column($new, 'message_id'));
        $thread = array_column($host->threads['SO201700043'] ?? [], 'auto', 'message_id');
        $this->assertSame([self::idOf($autoItem) => 'auto-reply', self::idOf($bounceItem) => 'bounce'], $thread);

        // Skipped mail is left where it was (nothing is removed that did not reach the host),
        // and is not counted again.
        $again = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['skipped'] + $again['totals']['inquiries'] + $again['totals']['threaded'],
            json_encode($again));
        $this->assertCount(6, maildir_files($maildir));
    }

    public function testBlockedSendersGetNeitherInquiriesNorThreadEntries(): void
    {
        $maildir = maildir_create($this->dir);
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(52, $maildir)];
        $host->inquiries['SO201700043'] = ['seed' => true];
        // Each pattern alone blocks one message: the whitelist lets example.org and spam.example
        // through, the wildcard blocks spam.example, the subject regex blocks "[SPAM]".
        $host->blocked = ['*@spam.example', '/^\[SPAM\]/i', '/@(?!(example\.org|spam\.example)$)/'];
        $t = token('blk');
        $wild = self::message("hello $t", ['From' => 'x@Spam.Example']);
        $wildItem = self::message("Re: [SO201700043] $t", ['From' => 'y@spam.example']);
        $subject = self::message("[spam] buy now $t");
        $notWhitelisted = self::message("hello $t", ['From' => 'someone@gmail.example']);
        $good = self::message("printer $t");
        $goodItem = self::message("Re: [SO201700043] more $t");
        foreach ([$wild, $wildItem, $subject, $notWhitelisted, $good, $goodItem] as $raw) {
            maildir_put($maildir, $raw);
        }
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $box = self::box($summary, 52);
        $this->assertSame(['blocked' => 4], $box['skip_reasons'], json_encode($summary));
        $this->assertSame(1, $box['inquiries']);
        $this->assertSame(1, $box['threaded']);
        $new = array_values(array_filter($host->inquiries, fn($m) => !isset($m['seed'])));
        $this->assertSame([self::idOf($good)], array_column($new, 'message_id'));
        $this->assertSame([self::idOf($goodItem)], array_column($host->threads['SO201700043'], 'message_id'));
    }

    // ---- 4. nothing lost, nothing doubled ---------------------------------------------------

    public function storeProvider(): array
    {
        return ['MAILDIR' => ['MAILDIR'], 'IMAP' => ['IMAP']];
    }

    public function everyStoreProvider(): array
    {
        return $this->storeProvider() + ['POP3' => ['POP3']];
    }

    /**
     * A mailbox of $protocol (MAILDIR in this test's directory, IMAP = Dovecot mbox1, POP3 =
     * Dovecot mbox3 over STLS) holding $raws: [account row, function(): list of [message_id,
     * processed] as the store has them (seen; POP3 deletes what it processed, so it lists
     * what is left, as unprocessed)].
     */
    private function store(string $protocol, int $recid, array $raws, array $extra = []): array
    {
        if ($protocol === 'MAILDIR') {
            $maildir = maildir_create($this->dir, "Maildir-$recid");
            foreach ($raws as $raw) {
                maildir_put($maildir, $raw);
            }
            return [$this->maildirRow($recid, $maildir, $extra), function () use ($maildir) {
                $out = [];
                foreach (maildir_files($maildir) as $f) {
                    $raw = (string) file_get_contents("$maildir/$f");
                    $out[] = [self::idOf($raw), (bool) preg_match('/:2,[A-Z]*S[A-Z]*$/', $f)];
                }
                return $out;
            }];
        }
        $local = $protocol === 'POP3' ? 'mbox3' : 'mbox1';
        mailbox_reset($local);
        foreach ($raws as $raw) {
            dovecot_deliver($local, $raw);
        }
        return [$this->row($recid, $protocol, $local, $extra), function () use ($local, $protocol) {
            return array_map(fn($m) => [$m['message_id'], $protocol !== 'POP3' && in_array('\Seen', $m['flags'], true)],
                mailbox_messages($local));
        }];
    }

    /** Every message of $ids was processed at the server (seen, or gone from a POP3 maildrop). */
    private function assertAllProcessed(string $protocol, callable $listing, array $ids): void
    {
        if ($protocol === 'POP3') {
            $this->assertSame([], $listing(), 'all deleted from the maildrop after the host accepted them');
            return;
        }
        sort($ids);
        $this->assertSame($ids, self::seenIds($listing()), 'all processed at the server');
    }

    /** Sorted message ids of a store listing, and which of them are seen. */
    private static function seenIds(array $listing, bool $seen = true): array
    {
        $ids = array_map(fn($e) => $e[0], array_filter($listing, fn($e) => $e[1] === $seen));
        sort($ids);
        return array_values($ids);
    }

    /** @dataProvider everyStoreProvider */
    public function testAHostFailureLeavesTheMessageForTheNextRunAndNothingIsDoubled(string $protocol): void
    {
        $t = token('fail');
        $raws = self::numbered(5, $t);
        $ids = array_map([self::class, 'idOf'], $raws);
        [$row, $listing] = $this->store($protocol, 61, $raws);
        $host = new TestHost();
        $host->accounts = [$row];
        $host->onCreate = function (array $mail) {
            if (str_starts_with($mail['subject'], 'message #3 ')) {
                throw new RuntimeException('the database is down for message 3');
            }
        };
        $first = $this->manager($host)->eventCheckMail(self::DATA);
        $box = self::box($first, 61);
        $this->assertSame(4, $box['inquiries'], json_encode($first));
        $this->assertSame(1, $box['failed']);
        $this->assertSame([$ids[0], $ids[1], $ids[3], $ids[4]], self::inquiryIds($host));
        $this->assertStringContainsString('the database is down for message 3', json_encode($host->errors));
        $unseen = self::seenIds($listing(), false);
        $this->assertSame([$ids[2]], $unseen, 'the failed message stays in the mailbox, unprocessed');
        $this->assertCount($protocol === 'POP3' ? 1 : 5, $listing());

        $host->onCreate = null;
        $second = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($second, 61)['inquiries'], json_encode($second));
        $this->assertSame(0, self::box($second, 61)['failed']);
        $third = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $third['totals']['inquiries']);

        $this->assertSame([$ids[0], $ids[1], $ids[3], $ids[4], $ids[2]], self::inquiryIds($host), 'each exactly once');
        $this->assertAllProcessed($protocol, $listing, $ids);
    }

    /** PHP code for a child process running the event with a SqliteHost. */
    private function childCode(string $db, array $accounts, array $options, string $readyFile = '', string $goFile = ''): string
    {
        return '$h = new SqliteHost(' . var_export($db, true) . ', ' . var_export($accounts, true) . ', '
            . var_export($options, true) . ');'
            . '$m = new PCR_Utility_EmailManager(' . var_export($this->dir . '/configs/pcr360.ini', true) . ', "prod", $h);'
            . ($readyFile === '' ? '' : 'touch(' . var_export($readyFile, true) . ');'
                . '$until = microtime(true) + 30; while (!file_exists(' . var_export($goFile, true) . ') && microtime(true) < $until) usleep(2000);')
            . 'echo json_encode($m->eventCheckMail(["host" => "' . self::VHOST . '"]));';
    }

    /** Every Inquiry of the SqliteHost database, as message_id => how many. */
    private static function inquiryCounts(string $db): array
    {
        $counts = array_count_values(array_column(SqliteHost::rows($db, 'inquiries'), 'message_id'));
        ksort($counts);
        return $counts;
    }

    /** @dataProvider everyStoreProvider */
    public function testAProcessKilledWhileCreatingAnInquiryLosesAndDoublesNothing(string $protocol): void
    {
        $t = token('kill');
        $raws = self::numbered(5, $t);
        $ids = array_map([self::class, 'idOf'], $raws);
        $this->ini();
        [$row, $listing] = $this->store($protocol, 62, $raws);
        $db = $this->dir . '/pcr360.sqlite';
        SqliteHost::create($db);

        // Killed once the 2nd Inquiry is in the database and the 3rd is being created (inside
        // createInquiry's sleep, before its INSERT).
        $this->killDuringInquiry($db, $row, 3);
        $this->assertSame(2, SqliteHost::count($db, 'SELECT COUNT(*) FROM inquiries'), 'killed before the 3rd INSERT');

        $host = new SqliteHost($db, [$row]);
        $rerun = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $box = self::box($rerun, 62);
        $this->assertSame(3, $box['inquiries'], json_encode($rerun));
        $this->assertSame(2, $box['duplicates'], 'the two done before the kill are seen again, not created again');
        $this->assertSame([], $box['errors']);
        $again = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));

        $expected = array_fill_keys($ids, 1);
        ksort($expected);
        $this->assertSame($expected, self::inquiryCounts($db), 'every message exactly one Inquiry');
        $this->assertAllProcessed($protocol, $listing, $ids);
    }

    /** Starts a child running the event and kills it (SIGKILL) once createInquiry has started $n times. */
    private function killDuringInquiry(string $db, array $row, int $n): void
    {
        $child = php_start($this->childCode($db, [$row], ['sleep_ms' => 300]));
        $deadline = microtime(true) + 30;
        while (SqliteHost::count($db, 'SELECT COUNT(*) FROM started') < $n) {
            if (microtime(true) > $deadline || !proc_get_status($child['proc'])['running']) {
                [$code, $out, $err] = php_wait($child, 5);
                $this->fail("the child did not reach createInquiry #$n ($code): $out $err");
            }
            usleep(5000);
        }
        $this->assertTrue(posix_kill($child['pid'], SIGKILL));
        [$code] = php_wait($child, 10);
        $this->assertSame(-SIGKILL, $code);
    }

    /** @dataProvider everyStoreProvider */
    public function testACrashNeverMakesASkippedMessageLookProcessed(string $protocol): void
    {
        $t = token('skipcrash');
        $auto = self::message("Out of office $t", ['Auto-Submitted' => 'auto-replied']);
        $raws = [$auto, self::message("first $t"), self::message("second $t")];
        $this->ini();
        [$row, $listing] = $this->store($protocol, 65, $raws, ['PROCESSED_ACTION' => 'delete']);
        $db = $this->dir . '/pcr360.sqlite';
        SqliteHost::create($db);
        // The auto-reply is skipped, then the run dies inside the next createInquiry.
        $this->killDuringInquiry($db, $row, 1);
        $this->assertSame(0, SqliteHost::count($db, 'SELECT COUNT(*) FROM inquiries'));

        $host = new SqliteHost($db, [$row]);
        $rerun = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(2, $rerun['totals']['inquiries'], json_encode($rerun));
        $expected = [self::idOf($raws[1]) => 1, self::idOf($raws[2]) => 1];
        ksort($expected);
        $this->assertSame($expected, self::inquiryCounts($db), 'each exactly once');
        $this->assertSame([[self::idOf($auto), false]], $listing(),
            'the skipped auto-reply never reached the host: it must not be deleted');
    }

    /** @dataProvider storeProvider */
    public function testAMessageThatKillsEveryRunIsQuarantinedInsteadOfBlockingTheMailbox(string $protocol): void
    {
        $t = token('crasher');
        $crasher = self::message("crasher $t");
        $this->ini();
        [$row, $listing] = $this->store($protocol, 66, [$crasher]);
        $db = $this->dir . '/pcr360.sqlite';
        SqliteHost::create($db);
        for ($run = 1; $run <= 3; $run++) {
            $this->killDuringInquiry($db, $row, $run);
        }
        $this->assertSame(0, SqliteHost::count($db, 'SELECT COUNT(*) FROM inquiries'));
        $host = new SqliteHost($db, [$row]);
        $summary = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, $summary['totals']['quarantined'], json_encode($summary));
        $this->assertSame(3, SqliteHost::count($db, 'SELECT COUNT(*) FROM started'), 'the host was not called a 4th time');
        $this->assertSame(0, SqliteHost::count($db, 'SELECT COUNT(*) FROM inquiries'));
        $this->assertCount(1, self::emlContaining($this->dir . '/out', 'could not be processed'));
        $this->assertSame([], array_filter($listing(), fn($e) => $e[0] === self::idOf($crasher) && $e[1]),
            'not marked processed');
    }

    public function testAttachmentsOfAKilledRunDoNotStayOnDisk(): void
    {
        $t = token('leak');
        $pdf = "%PDF-1.4\n" . random_bytes(500) . "\n%%EOF\n";
        $this->ini();
        [$row] = $this->store('MAILDIR', 67, [self::richMessage($t, 'helpdesk@test.local', $pdf)]);
        $db = $this->dir . '/pcr360.sqlite';
        SqliteHost::create($db);
        $this->killDuringInquiry($db, $row, 1);
        $files = fn() => array_values(array_filter(
            iterator_to_array(new RecursiveIteratorIterator(new RecursiveDirectoryIterator($this->dir . '/state',
                FilesystemIterator::SKIP_DOTS))),
            fn($f) => $f->isFile() && $f->getFilename() === 'report.pdf'));
        $this->assertCount(1, $files(), 'the killed run left the attachment it was handing over');

        $host = new SqliteHost($db, [$row]);
        $summary = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, $summary['totals']['inquiries'], json_encode($summary));
        $this->assertSame([], $files(), "the next run removes a dead run's attachment files");
    }

    /** @dataProvider storeProvider */
    public function testTwoOverlappingRunsCreateEachInquiryOnce(string $protocol): void
    {
        $t = token('twice');
        $raws = self::numbered(10, $t);
        $ids = array_map([self::class, 'idOf'], $raws);
        $this->ini();
        [$row, $listing] = $this->store($protocol, 63, $raws);
        $db = $this->dir . '/pcr360.sqlite';
        SqliteHost::create($db);
        $go = $this->dir . '/go';
        $children = [];
        foreach (['a', 'b'] as $name) {
            $children[$name] = php_start($this->childCode($db, [$row], ['sleep_ms' => 50], $this->dir . "/ready-$name", $go));
        }
        // Both start their run at the same moment.
        $deadline = microtime(true) + 30;
        while (!file_exists($this->dir . '/ready-a') || !file_exists($this->dir . '/ready-b')) {
            $this->assertLessThan($deadline, microtime(true), 'the children did not start');
            usleep(5000);
        }
        touch($go);
        $summaries = [];
        foreach ($children as $name => $child) {
            [$code, $out, $err] = php_wait($child, 60);
            $this->assertSame(0, $code, "child $name: $err");
            $summaries[$name] = json_decode($out, true);
            $this->assertIsArray($summaries[$name], "child $name: $out $err");
            $this->assertSame([], self::box($summaries[$name], 63)['errors']);
        }
        $this->assertSame(10, $summaries['a']['totals']['inquiries'] + $summaries['b']['totals']['inquiries'],
            json_encode($summaries));
        $pids = array_unique(array_column(SqliteHost::rows($db, 'inquiries'), 'pid'));
        $this->assertCount(2, $pids, 'the runs overlapped: both created Inquiries');

        $host = new SqliteHost($db, [$row]);
        $again = (new PCR_Utility_EmailManager($this->dir . '/configs/pcr360.ini', 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));
        $expected = array_fill_keys($ids, 1);
        ksort($expected);
        $this->assertSame($expected, self::inquiryCounts($db), 'every message exactly one Inquiry');
        $this->assertAllProcessed($protocol, $listing, $ids);
        $this->assertSame(0, SqliteHost::count($db, 'SELECT COUNT(*) FROM errors'),
            json_encode(SqliteHost::rows($db, 'errors')));
    }

    // ---- 5. quarantine ----------------------------------------------------------------------

    /** @dataProvider everyStoreProvider */
    public function testAMessageTheHostAlwaysRefusesIsQuarantinedAfterThreeRuns(string $protocol): void
    {
        $t = token('poison');
        $poison = self::message("poison $t");
        $good = self::message("good $t");
        $this->ini();
        [$row, $listing] = $this->store($protocol, 64, [$poison, $good]);
        $host = new TestHost();
        $host->accounts = [$row];
        $host->onCreate = function (array $mail) {
            if (str_starts_with($mail['subject'], 'poison ')) {
                throw new RuntimeException('Inquiry rejected: column too long');
            }
        };
        $alerts = fn() => self::emlContaining($this->dir . '/out', 'could not be processed');
        for ($run = 1; $run <= 3; $run++) {
            $summary = $this->manager($host)->eventCheckMail(self::DATA);
            $box = self::box($summary, 64);
            $this->assertSame(1, $box['failed'], "run $run: " . json_encode($summary));
            $this->assertSame($run === 3 ? 1 : 0, $box['quarantined'], "run $run");
            $this->assertSame($run === 1 ? 1 : 0, $box['inquiries'], "run $run");
            $this->assertCount($run === 3 ? 1 : 0, $alerts(), "run $run: SYSADMIN alerted on the 3rd failure");
        }
        $fourth = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $fourth['totals']['failed'] + $fourth['totals']['quarantined'] + $fourth['totals']['inquiries'],
            json_encode($fourth));
        $this->assertCount(1, $alerts(), 'SYSADMIN alerted exactly once');
        $alert = (string) file_get_contents($alerts()[0]);
        $this->assertMatchesRegularExpression('/^To: admin@test\.local/mi', $alert);
        $this->assertStringContainsString(self::idOf($poison), $alert);

        $this->assertSame([self::idOf($good)], self::inquiryIds($host), 'no Inquiry for the quarantined message');
        $failed = array_filter($host->errors, fn($e) => str_contains($e['message'], 'Inquiry rejected: column too long')
            && !str_contains($e['message'], 'quarantined'));
        $this->assertCount(3, $failed, 'each failed run is in the Error Log: ' . json_encode($host->errors));
        $quarantined = array_filter($host->errors, fn($e) => str_contains($e['message'], 'quarantined'));
        $this->assertCount(1, $quarantined);

        if ($protocol === 'POP3') {
            $this->assertSame([[self::idOf($poison), false]], $listing(), 'POP3: left in the maildrop, the ledger says no');
        } elseif ($protocol === 'IMAP') {
            $this->assertSame([self::idOf($good)], array_column(mailbox_messages('mbox1'), 'message_id'));
            $this->assertSame([self::idOf($poison)], array_column(mailbox_messages('mbox1', 'PCR-Failed'), 'message_id'));
        } else {
            $files = maildir_files($row['INCOMING_PATH']);
            $this->assertCount(2, $files);
            $this->assertCount(1, array_filter($files, fn($f) => str_starts_with($f, '.PCR-Failed/')), json_encode($files));
        }
    }

    // ---- 6 and 9. one bad mailbox never stops the others; no secret anywhere -----------------

    /** A spare port nothing listens on (connection refused). */
    private static function deadPort(): int
    {
        for ($port = (int) test_env('PCR_TEST_SPARE_PORT_LAST'); $port >= (int) test_env('PCR_TEST_SPARE_PORT_FIRST'); $port--) {
            $conn = @fsockopen(test_env('PCR_TEST_HOST'), $port, $errno, $errstr, 1.0);
            if ($conn === false) {
                return $port;
            }
            fclose($conn);
        }
        throw new RuntimeException('no free spare port');
    }

    public function testOneBadMailboxNeverStopsTheOthers(): void
    {
        $secrets = ['Wr0ng-S3cret-pw', 'Dead-S3cret-pw', 'Silent-S3cret-pw', 'Row-S3cret-pw', mail_user('mbox1')['password']];
        mailbox_reset('mbox1');
        $t = token('iso');
        $raws = [self::message("good 1 $t"), self::message("good 2 $t")];
        foreach ($raws as $raw) {
            dovecot_deliver('mbox1', $raw);
        }
        $ini = $this->ini();
        $host = new TestHost();
        $host->accounts = [
            $this->row(71, 'IMAP', 'mbox1'),
            $this->row(72, 'IMAP', 'mbox2', ['INCOMING_PORT' => self::deadPort(), 'PASSWORD' => 'Dead-S3cret-pw']),
            $this->row(73, 'IMAPS', 'mbox2', ['PASSWORD' => 'Wr0ng-S3cret-pw']),
            $this->row(74, 'IMAP', 'mbox3', ['INCOMING_PORT' => (int) test_env('PCR_SILENT_PORT'), 'TIMEOUT' => 2,
                'PASSWORD' => 'Silent-S3cret-pw']),
            $this->row(75, 'POP3', 'mbox4', ['INCOMING_PORT' => 99999, 'PASSWORD' => 'Row-S3cret-pw']),
        ];
        $started = microtime(true);
        $summary = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $elapsed = microtime(true) - $started;

        $this->assertLessThan(20000, $summary['duration_ms'], 'no hang');
        $this->assertLessThan(20.0, $elapsed);
        $good = self::box($summary, 71);
        $this->assertSame(2, $good['inquiries'], json_encode($summary));
        $this->assertSame([], $good['errors']);
        $this->assertSame(array_map([self::class, 'idOf'], $raws), self::inquiryIds($host));
        foreach ([72 => 'refused', 73 => 'auth', 74 => 'time'] as $recid => $word) {
            $box = self::box($summary, $recid);
            $this->assertCount(1, $box['errors'], "$recid: " . json_encode($box));
            $this->assertStringContainsStringIgnoringCase($word, $box['errors'][0], (string) $recid);
            $logged = array_filter($host->errors, fn($e) => ($e['context']['account'] ?? null) === (string) $recid);
            $this->assertNotEmpty($logged, "$recid is in the Error Log");
        }
        $this->assertSame(4, $summary['totals']['errors']);
        // The broken row's mailbox is read by nobody: its entry and the Error Log name the account
        // and the key.
        $this->assertStringContainsString('INCOMING_PORT', self::box($summary, 75)['errors'][0]);
        $this->assertSame(0, self::box($summary, 75)['fetched']);
        $row = array_filter($host->errors, fn($e) => str_contains($e['message'], '75') && str_contains($e['message'], 'INCOMING_PORT'));
        $this->assertNotEmpty($row, json_encode($host->errors));

        $log = (string) @file_get_contents($this->dir . '/logs/email.log');
        $this->assertStringContainsString('INCOMING_PORT', $log);
        foreach ($secrets as $secret) {
            $this->assertStringNotContainsString($secret, json_encode($summary));
            $this->assertStringNotContainsString($secret, json_encode($host->errors));
            $this->assertStringNotContainsString($secret, json_encode($host->inquiries));
            $this->assertStringNotContainsString($secret, $log);
        }
    }

    public function testAWrongPasswordAlertsSysadminOncePerOutage(): void
    {
        mailbox_reset('mbox2');
        $host = new TestHost();
        $bad = $this->row(76, 'IMAPS', 'mbox2', ['PASSWORD' => $this->encrypted('Wr0ng-S3cret-pw')]);
        $good = $this->row(76, 'IMAPS', 'mbox2');
        $alerts = fn() => self::emlContaining($this->dir . '/out', 'cannot sign in');
        $run = function (array $row) use ($host) {
            $host->accounts = [$row];
            return self::box($this->manager($host)->eventCheckMail(self::DATA), 76)['errors'];
        };
        $this->assertCount(1, $run($bad));
        $this->assertCount(1, $run($bad));
        $this->assertCount(1, $alerts(), 'one alert for one outage, however many runs');
        $this->assertSame([], $run($good), 'the administrator fixed the password');
        $this->assertCount(1, $run($bad), 'it broke again later');
        $this->assertCount(2, $alerts(), 'a new outage is alerted again');
        $this->assertStringNotContainsString('Wr0ng-S3cret-pw', (string) file_get_contents($alerts()[0]));
    }

    public function testMailFromTheSysadminIsAnOrdinaryRequest(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('Please set up a phone for the new hire', ['From' => 'IT Admin <admin@test.local>']));
        maildir_put($maildir, self::message('Loop', ['From' => 'PCR-360 Master <desk@test.local>']));
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(77, $maildir)];
        // admin@test.local is the INI's SYSADMIN: a person who receives alerts, not a sending address.
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $box = self::box($summary, 77);
        $this->assertSame(1, $box['inquiries'], json_encode($summary));
        $this->assertSame(['own mail' => 1], $box['skip_reasons'], 'mail from the master account is our own');
        $this->assertSame('admin@test.local', array_values($host->inquiries)[0]['from']['email']);
    }

    public function testNoSecretInExceptions(): void
    {
        $ini = $this->ini(['INCOMING_MAILBOX_TYPE' => 'IMAP', 'INCOMING_HOST' => 'localhost', 'INCOMING_PORT' => 99999,
            'LOGIN' => 'desk@test.local', 'PASSWORD' => 'Ini-S3cret-pw']);
        // A bad INI master is an account that fails: the run reports it, each use throws it.
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $summary = $m->eventCheckMail(self::DATA);
        $this->assertStringContainsString('INCOMING_PORT', self::box($summary, 'master')['errors'][0]);
        $this->assertStringNotContainsString('Ini-S3cret-pw', json_encode($summary) . json_encode($host->errors));
        try {
            $m->checkAccount('master');
            $this->fail('a bad INI master is an exception where it is used');
        } catch (PCR_Utility_EmailConfigException $e) {
            $this->assertStringContainsString('INCOMING_PORT', $e->getMessage());
            $this->assertStringNotContainsString('Ini-S3cret-pw', (string) $e);
        }
        // A master mailbox with a wrong password: an error in the summary, not an exception.
        $ini = $this->ini(['INCOMING_MAILBOX_TYPE' => 'POP3', 'INCOMING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'INCOMING_PORT' => (int) test_env('PCR_POP3S_PORT'), 'INCOMING_SSL' => 'SSL', 'CA_FILE' => test_env('PCR_TEST_CA'),
            'LOGIN' => 'mbox4@test.local', 'PASSWORD' => 'Ini-S3cret-pw']);
        $host = new TestHost();
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $box = self::box($summary, 'master');
        $this->assertCount(1, $box['errors'], json_encode($summary));
        $this->assertStringNotContainsString('Ini-S3cret-pw', json_encode($summary) . json_encode($host->errors));
    }

    // ---- 7. limits --------------------------------------------------------------------------

    public function testMaxMessagesLeavesTheRestForTheNextRun(): void
    {
        mailbox_reset('mbox1');
        $t = token('max');
        $raws = self::numbered(5, $t);
        foreach ($raws as $raw) {
            dovecot_deliver('mbox1', $raw);
        }
        $ids = array_map([self::class, 'idOf'], $raws);
        $host = new TestHost();
        $host->accounts = [$this->row(81, 'IMAP', 'mbox1', ['MAX_MESSAGES' => 3])];
        $first = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(3, self::box($first, 81)['inquiries'], json_encode($first));
        $this->assertSame(2, self::box($first, 81)['deferred']);
        $this->assertSame(array_slice($ids, 0, 3), self::inquiryIds($host), 'oldest first');
        $this->assertSame([[], []], array_column(array_slice(mailbox_messages('mbox1'), 3), 'flags'), 'the rest untouched');
        $second = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(2, self::box($second, 81)['inquiries'], json_encode($second));
        $this->assertSame(0, self::box($second, 81)['deferred']);
        $third = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $third['totals']['inquiries']);
        $this->assertSame($ids, self::inquiryIds($host));
    }

    public function testOversizedMessagesAreSkippedNotDownloadedAndReportedOnce(): void
    {
        mailbox_reset('mbox1');
        $t = token('big');
        $small1 = self::message("small 1 $t");
        $big = self::message("big $t", [], str_repeat(str_repeat('x', 76) . "\r\n", 1400));
        $small2 = self::message("small 2 $t");
        foreach ([$small1, $big, $small2] as $raw) {
            dovecot_deliver('mbox1', $raw);
        }
        $host = new TestHost();
        $host->accounts = [$this->row(82, 'IMAP', 'mbox1', ['MAX_MESSAGE_BYTES' => '64K'])];
        $alerts = fn() => self::emlContaining($this->dir . '/out', 'too large');
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $box = self::box($summary, 82);
        $this->assertSame(2, $box['fetched'], 'the big one is not downloaded: ' . json_encode($summary));
        $this->assertSame(2, $box['inquiries']);
        $this->assertSame(['oversized' => 1], $box['skip_reasons']);
        $this->assertSame([self::idOf($small1), self::idOf($small2)], self::inquiryIds($host));
        $inbox = array_column(mailbox_messages('mbox1'), 'flags', 'message_id');
        $this->assertSame([], $inbox[self::idOf($big)], 'it stays in the mailbox, untouched');
        $this->assertCount(1, $alerts());
        $this->assertNotEmpty(array_filter($host->errors, fn($e) => str_contains($e['message'], 'MAX_MESSAGE_BYTES')));

        $again = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'] + $again['totals']['fetched'], json_encode($again));
        $this->assertSame(['oversized' => 1], self::box($again, 82)['skip_reasons'], 'counted while it waits');
        $this->assertCount(1, $alerts(), 'SYSADMIN alerted once');
        $logged = fn() => count(array_filter($host->errors, fn($e) => str_contains($e['message'], 'MAX_MESSAGE_BYTES')));
        $this->assertSame(1, $logged(), 'logged once');
        $this->assertCount(3, mailbox_messages('mbox1'));

        // The administrator raises the limit: the waiting message is an ordinary one again.
        $host->accounts = [$this->row(82, 'IMAP', 'mbox1', ['MAX_MESSAGE_BYTES' => '1M'])];
        $raised = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($raised, 82)['inquiries'], json_encode($raised));
        $this->assertSame(0, self::box($raised, 82)['skipped']);
        $this->assertSame(self::idOf($big), end($host->inquiries)['message_id']);
        $this->assertSame(1, $logged());
    }

    public function testAnOversizedMaildirMessageWaitsAndIsTakenOnceTheLimitAllowsIt(): void
    {
        $maildir = maildir_create($this->dir);
        $big = self::message('big maildir', [], str_repeat(str_repeat('y', 76) . "\r\n", 1400));
        maildir_put($maildir, $big);
        $host = new TestHost();
        foreach ([1, 2] as $run) {
            $host->accounts = [$this->maildirRow(83, $maildir, ['MAX_MESSAGE_BYTES' => '64K'])];
            $summary = $this->manager($host)->eventCheckMail(self::DATA);
            $this->assertSame(['oversized' => 1], self::box($summary, 83)['skip_reasons'], "run $run: " . json_encode($summary));
        }
        $host->accounts = [$this->maildirRow(83, $maildir)];
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($summary, 83)['inquiries'], json_encode($summary));
        $this->assertSame(self::idOf($big), end($host->inquiries)['message_id']);
    }

    // ---- 8. the event's Data, the no-argument constructor, the switches ---------------------

    public function testTheEventDataMayBeAJsonStringAnArrayOrAnObject(): void
    {
        $maildir = maildir_create($this->dir);
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(91, $maildir)];
        $m = $this->manager($host);
        $forms = [
            'json' => ['{"host":"a.example.edu"}', 'a.example.edu'],
            'array' => [['host' => 'b.example.edu'], 'b.example.edu'],
            'object' => [(object) ['host' => 'c.example.edu'], 'c.example.edu'],
        ];
        foreach ($forms as $what => [$data, $vhost]) {
            maildir_put($maildir, self::message("form $what"));
            $summary = $m->eventCheckMail($data);
            $this->assertSame($vhost, $summary['host'], $what);
            $this->assertSame(1, $summary['totals']['inquiries'], $what);
            $this->assertSame($vhost, end($host->inquiries)['host'], $what);
        }
        maildir_put($maildir, self::message('no host'));
        foreach (['missing' => [], 'null' => null, 'empty JSON' => '{}', 'other key' => '{"hostname":"x.example.edu"}',
            'not JSON' => '{host:', 'no argument' => 'none'] as $what => $data) {
            try {
                $data === 'none' ? $m->eventCheckMail() : $m->eventCheckMail($data);
                $this->fail("$what: no exception");
            } catch (PCR_Utility_EmailException $e) {
                $this->assertStringContainsString('host', $e->getMessage(), $what);
            }
        }
        $this->assertCount(3, $host->inquiries, 'nothing read without a host');
    }

    public function testTheEventSystemsNoArgumentConstructorWithADefaultHost(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('via the event system'));
        $ini = $this->ini();
        $row = $this->maildirRow(92, $maildir);
        [$code, $out, $err] = run_php(
            '$h = new TestHost(); $h->accounts = [' . var_export($row, true) . '];'
            . 'PCR_Utility_EmailManager::setDefaultHost($h);'
            . '$r = (new PCR_Utility_EmailManager())->eventCheckMail(\'{"host":"' . self::VHOST . '"}\');'
            . 'echo json_encode(["summary" => $r, "inquiries" => array_values($h->inquiries)]);',
            ['pcr_email.config' => $ini, 'pcr_email.environment' => 'prod']
        );
        $this->assertSame(0, $code, $err);
        $r = json_decode($out, true);
        $this->assertSame(1, $r['summary']['totals']['inquiries'], $out);
        $this->assertSame('via the event system', $r['inquiries'][0]['subject']);
        $this->assertSame(self::VHOST, $r['inquiries'][0]['host']);

        // Without any host: a clear exception, nothing read.
        maildir_put($maildir, self::message('no host object'));
        [$code, $out, $err] = run_php(
            'try { (new PCR_Utility_EmailManager())->eventCheckMail(["host" => "x.example.edu"]); echo "no exception"; }'
            . ' catch (PCR_Utility_EmailException $e) { echo get_class($e), ": ", $e->getMessage(); }',
            ['pcr_email.config' => $ini, 'pcr_email.environment' => 'prod']
        );
        $this->assertSame(0, $code, $err);
        $this->assertStringContainsString('PCR_Utility_EmailHost', $out);
        $this->assertCount(1, array_filter(maildir_files($maildir), fn($f) => str_starts_with($f, 'new/')));
    }

    public function spellingProvider(): array
    {
        return [
            'the same path' => ['same'],
            'relative to the INI, with ..' => ['relative'],
            'through a symlink' => ['symlink'],
            'with /x/../' => ['dotdot'],
        ];
    }

    /** @dataProvider spellingProvider */
    public function testAMailboxConfiguredTwiceIsReadOnce(string $spelling): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('only once'));
        maildir_put($maildir, self::message('only once too'));
        @symlink($maildir, $this->dir . '/link-to-maildir');
        // The INI master names the directory one way (as the demo's INI does: "../Maildir")...
        $iniPath = [
            'same' => $maildir,
            'relative' => '../Maildir',
            'symlink' => $this->dir . '/link-to-maildir',
            'dotdot' => $this->dir . '/configs/../Maildir',
        ][$spelling];
        $ini = $this->ini(['INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $iniPath]);
        // ... and a tenant Service Desk row by its absolute path.
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(94, $maildir)];
        $summary = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $this->assertCount(1, $summary['mailboxes'], json_encode($summary));
        $this->assertSame(94, $summary['mailboxes'][0]['account'], 'the tenant account wins');
        $this->assertCount(2, $host->inquiries, 'each email once');
        $this->assertCount(1, $summary['warnings'], json_encode($summary));
        $this->assertStringContainsString('account master', $summary['warnings'][0]);
        $this->assertStringContainsString('account 94', $summary['warnings'][0]);
        $again = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $this->assertSame(0, $again['totals']['inquiries'], json_encode($again));
        $this->assertCount(2, $host->inquiries);
    }

    /**
     * The master reads its Maildir ("../Maildir", processed mail kept: seen); later a tenant
     * Service Desk row names the same directory by its absolute path. The tenant's reads
     * continue where the master's ended: none of the old mail becomes an Inquiry again.
     */
    public function testAMailboxReadUnderAnotherSpellingLaterIsNotReadAgain(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('old one'));
        maildir_put($maildir, self::message('old two'));
        $ini = $this->ini(['INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => '../Maildir',
            'PROCESSED_ACTION' => 'seen']);
        $host = new TestHost();
        $first = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $this->assertSame('master', $first['mailboxes'][0]['account'], json_encode($first));
        $this->assertCount(2, $host->inquiries);
        maildir_put($maildir, self::message('new one'));
        $host->accounts = [$this->maildirRow(95, $maildir, ['PROCESSED_ACTION' => 'seen'])];
        $later = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $this->assertSame(95, self::box($later, 95)['account'], json_encode($later));
        $this->assertCount(3, $host->inquiries, 'only the new email: ' . json_encode($later));
        $this->assertStringStartsWith('new one', end($host->inquiries)['subject']);
    }

    // ---- 9. what an ordinary host, a hostile sender or a clumsy setup can do -----------------

    /**
     * A tenant Service Desk row with a tampered password, naming the same Maildir as the INI
     * master: its mailbox is read by nobody (never as the master's mail), and the summary says why.
     */
    public function testABrokenServiceDeskRowsMailboxIsNotReadThroughTheMaster(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('for tenant 1'));
        $ini = $this->ini(['INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $maildir]);
        $tampered = substr($this->encrypted('S3cret-pw'), 0, -6) . 'AAAAA=';
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(97, $maildir, ['PASSWORD' => $tampered])];
        $summary = $this->manager($host, $ini)->eventCheckMail(self::DATA);
        $this->assertSame([], $host->inquiries, 'not read as the master: ' . json_encode($summary));
        $this->assertSame('errors', $summary['status']);
        $box = self::box($summary, 97);
        $this->assertSame(0, $box['fetched']);
        $this->assertStringContainsString('PASSWORD', $box['errors'][0]);
        $this->assertStringNotContainsString($tampered, json_encode($summary));
        $this->assertCount(1, maildir_files($maildir), 'left where it is');
    }

    /**
     * Outlook names inline images image001.png in nearly every email: two messages of one run
     * with an attachment of the same name never share a path, so a host that stores it with the
     * usual fread($fh, filesize($path)) idiom (PHP's stat cache keeps a path's size) stores it whole.
     */
    public function testAttachmentsOfTwoMessagesNeverShareAPath(): void
    {
        $maildir = maildir_create($this->dir);
        $contents = ['12345', str_repeat('0123456789', 30)];
        foreach ($contents as $i => $content) {
            maildir_put($maildir, self::message("report $i", ['Content-Type' => 'multipart/mixed; boundary="b"'],
                "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                . "--b\r\nContent-Type: text/plain; name=\"report.txt\"\r\n"
                . "Content-Disposition: attachment; filename=\"report.txt\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                . chunk_split(base64_encode($content)) . "--b--\r\n"));
        }
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(95, $maildir)];
        $stored = [];
        $host->onCreate = function (array $mail) use (&$stored) {
            foreach ($mail['attachments'] as $a) {
                $fh = fopen($a['path'], 'rb');
                $stored[] = ['path' => $a['path'], 'data' => fread($fh, filesize($a['path']))];
                fclose($fh);
            }
        };
        $summary = $this->manager($host)->eventCheckMail(self::DATA);
        $this->assertSame(2, $summary['totals']['inquiries'], json_encode($summary));
        $this->assertSame($contents, array_column($stored, 'data'), 'each attachment stored whole');
        $this->assertNotSame($stored[0]['path'], $stored[1]['path']);
        $this->assertSame('report.txt', basename($stored[1]['path']), 'the name is kept');
        foreach ($stored as $s) {
            $this->assertFileDoesNotExist($s['path'], 'removed once the host returned');
        }
    }

    /**
     * 30 tenant mailboxes under a process limit that allows only a few threads (RLIMIT_NPROC of
     * an unprivileged user): a bounded pool reads them all; with no thread to be had at all, every
     * mailbox says why in the summary and nothing is lost.
     */
    public function testAnyNumberOfMailboxesIsReadByABoundedPoolOfThreads(): void
    {
        $base = temp_dir('pcr-pool-');
        $rows = [];
        for ($i = 1; $i <= 30; $i++) {
            $maildir = maildir_create($base, "Maildir$i");
            maildir_put($maildir, self::message("pool $i"));
            $rows[] = ['RECID' => 300 + $i, 'TENANTS_RECID' => $i, 'ACCOUNT_TYPE' => 'service_desk',
                'EMAIL' => "desk$i@test.local", 'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => "$base/sd-out",
                'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $maildir];
        }
        $ini = write_ini($base, ['EMAIL' => 'desk@test.local', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$base/out", 'STATE_DIR' => "$base/state"]);
        run_checked(['chown', '-R', 'nobody:nogroup', $base]);
        chmod($base, 0755);
        $run = function (int $threads) use ($ini, $rows): array {
            [$exit, $out, $err] = run_php(
                '$nobody = posix_getpwnam("nobody"); posix_setgid($nobody["gid"]); posix_setuid($nobody["uid"]);'
                . 'if (posix_geteuid() === 0) { exit(3); }'
                . "posix_setrlimit(POSIX_RLIMIT_NPROC, $threads, $threads) || exit(4);"
                . '$h = new TestHost(); $h->accounts = ' . var_export($rows, true) . ';'
                . '$r = (new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod", $h))->eventCheckMail(["host" => "x.example.edu"]);'
                . 'echo json_encode($r);'
            );
            $this->assertSame(0, $exit, $err);
            return json_decode($out, true);
        };
        // The process alone, no thread to be had: every mailbox waits for the next run.
        $none = $run(1);
        $this->assertSame(30, $none['totals']['mailboxes'], json_encode($none));
        $this->assertSame(0, $none['totals']['fetched']);
        $this->assertSame(30, $none['totals']['errors']);
        $this->assertStringContainsString('no thread could be started', $none['mailboxes'][0]['errors'][0]);
        // Room for the process and three threads (MAILBOX_THREADS is 8 by default): all read.
        $few = $run(4);
        $this->assertSame(30, $few['totals']['inquiries'], json_encode($few['mailboxes'][0]));
        $this->assertSame(0, $few['totals']['errors']);
    }

    /** A host that returns '' from createInquiry has stored the email: it is never handed over again. */
    public function testAnEmptySdNumberFromTheHostIsLoggedAndNeverCreatesASecondInquiry(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('no number'));
        $host = new TestHost();
        $host->returnSd = '';
        $host->accounts = [$this->maildirRow(96, $maildir, ['PROCESSED_ACTION' => 'delete'])];
        foreach ([1, 2, 3] as $run) {
            $summary = $this->manager($host)->eventCheckMail(self::DATA);
            $this->assertSame(0, $summary['totals']['failed'], "run $run: " . json_encode($summary));
        }
        $this->assertCount(1, $host->inquiries, 'one Inquiry, not one per run');
        $this->assertSame([], maildir_files($maildir), 'processed: deleted as configured');
        $violations = array_filter($host->errors, fn($e) => str_contains($e['message'], 'returned no SD number'));
        $this->assertCount(1, $violations, json_encode($host->errors));
    }

    /**
     * Files of the Maildir that the PHP user cannot read (root's, mode 0600) are failed messages:
     * the readable mail behind them is processed, and they are quarantined after three runs
     * with one SYSADMIN alert. The event runs as an unprivileged user (nobody).
     */
    public function testUnreadableMaildirFilesNeverHoldBackTheOthers(): void
    {
        $base = temp_dir('pcr-unreadable-');
        $maildir = maildir_create($base);
        $bad = [];
        for ($i = 1; $i <= 3; $i++) {
            $bad[] = maildir_put($maildir, self::message("unreadable $i"));
        }
        $good = [maildir_put($maildir, self::message('readable 1')), maildir_put($maildir, self::message('readable 2'))];
        // Oldest first: the unreadable ones are listed before the readable ones.
        foreach ($bad as $i => $path) {
            touch($path, time() - 100 + $i);
        }
        $ini = write_ini($base, [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$base/out",
            'SYSADMIN' => 'admin@test.local',
            'STATE_DIR' => "$base/state",
            'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
            'INCOMING_PATH' => $maildir,
        ]);
        run_checked(['chown', '-R', 'nobody:nogroup', $base]);
        chmod($base, 0755);
        foreach ($bad as $path) {
            chown($path, 'root');
            chmod($path, 0600);
        }
        $code = '$nobody = posix_getpwnam("nobody"); posix_setgid($nobody["gid"]); posix_setuid($nobody["uid"]);'
            . 'if (posix_geteuid() === 0) { exit(3); }'
            . '$h = new TestHost();'
            . '$r = (new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod", $h))->eventCheckMail(["host" => "x.example.edu"]);'
            . 'echo json_encode(["summary" => $r, "subjects" => array_values(array_column($h->inquiries, "subject")), "errors" => $h->errors]);';
        $runs = [];
        foreach ([1, 2, 3, 4] as $run) {
            [$exit, $out, $err] = run_php($code);
            $this->assertSame(0, $exit, $err);
            $runs[$run] = json_decode($out, true);
        }
        $first = $runs[1]['summary']['totals'];
        $this->assertSame(['readable 1', 'readable 2'], $runs[1]['subjects'], json_encode($runs[1]));
        $this->assertSame(3, $first['failed']);
        $this->assertStringContainsString('Permission denied', json_encode($runs[1]['errors']));
        $this->assertSame(3, $runs[2]['summary']['totals']['failed']);
        $this->assertSame([], $runs[2]['subjects']);
        $this->assertSame(3, $runs[3]['summary']['totals']['quarantined'], json_encode($runs[3]));
        $this->assertSame(0, $runs[4]['summary']['totals']['failed'] + $runs[4]['summary']['totals']['quarantined'],
            'quarantined: out of the way');
        $files = maildir_files($maildir);
        $this->assertCount(3, array_filter($files, fn($f) => str_starts_with($f, '.PCR-Failed/')), json_encode($files));
        $this->assertCount(3, glob("$base/out/*.eml") ?: [], 'SYSADMIN alerted once per message, not once per run');
    }

    public function switchProvider(): array
    {
        return [
            'DISABLE_EMAIL' => [['DISABLE_EMAIL' => true], 'disabled'],
            'SEND_EMAIL false' => [['SEND_EMAIL' => false], 'send_email_off'],
        ];
    }

    /** @dataProvider switchProvider */
    public function testNoMailboxIsReadWhenEmailIsSwitchedOff(array $constants, string $status): void
    {
        $maildir = maildir_create($this->dir);
        $file = maildir_put($maildir, self::message('switched off'));
        $host = new TestHost();
        $host->accounts = [$this->maildirRow(93, $maildir)];
        $summary = $this->manager($host, $this->ini([], $constants))->eventCheckMail(self::DATA);
        $this->assertSame($status, $summary['status']);
        $this->assertSame([], $summary['mailboxes']);
        $this->assertSame(0, $summary['totals']['inquiries']);
        $this->assertSame([], $host->inquiries);
        $this->assertFileExists($file, 'the message is untouched');
    }

    // ---- helpers ----------------------------------------------------------------------------

    /** The INI: a FILE-transport master (writes SYSADMIN alerts into out/) with its own state. */
    private function ini(array $email = [], array $constants = []): string
    {
        return write_ini($this->dir, $email + [
            'EMAIL' => 'desk@test.local',
            'DISPLAY_NAME' => 'PCR-360 Master',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out',
            'SYSADMIN' => 'admin@test.local',
            'STATE_DIR' => $this->dir . '/state',
            'LOG_FILE' => $this->dir . '/logs/email.log',
        ], $constants);
    }

    /**
     * A tenant Service Desk account row reading Dovecot user $local over $protocol (IMAP = STARTTLS,
     * IMAPS, POP3 = STLS, POP3S); it sends with FILE into sd-out/.
     */
    private function row(int $recid, string $protocol, string $local, array $extra = []): array
    {
        $user = mail_user($local);
        [$type, $ssl, $port] = [
            'IMAP' => ['IMAP', 'TLS', 'PCR_IMAP_PORT'],
            'IMAPS' => ['IMAP', 'SSL', 'PCR_IMAPS_PORT'],
            'POP3' => ['POP3', 'TLS', 'PCR_POP3_PORT'],
            'POP3S' => ['POP3', 'SSL', 'PCR_POP3S_PORT'],
        ][$protocol];
        return $extra + [
            'RECID' => $recid,
            'TENANTS_RECID' => 1,
            'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => $user['email'],
            'DISPLAY_NAME' => 'Service Desk',
            'LOGIN' => $user['email'],
            'PASSWORD' => $this->encrypted($user['password']),
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/sd-out',
            'INCOMING_MAILBOX_TYPE' => $type,
            'INCOMING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'INCOMING_PORT' => (int) test_env($port),
            'INCOMING_SSL' => $ssl,
            'CA_FILE' => test_env('PCR_TEST_CA'),
            'TIMEOUT' => 10,
        ];
    }

    /** A password as an administrator stores it (encryptPassword, with this test's key). */
    private function encrypted(string $plain): string
    {
        $ini = $this->dir . '/configs/pcr360.ini';
        if (!is_file($ini)) {
            $this->ini();
        }
        return PCR_Utility_EmailManager::encryptPassword($plain, $ini, 'prod');
    }

    /** A tenant Service Desk account row reading a Maildir of this test. */
    private function maildirRow(int $recid, string $maildir, array $extra = []): array
    {
        return $extra + [
            'RECID' => $recid,
            'TENANTS_RECID' => 1,
            'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => 'helpdesk@test.local',
            'DISPLAY_NAME' => 'Service Desk',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/sd-out',
            'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
            'INCOMING_PATH' => $maildir,
        ];
    }

    /**
     * A raw message (CRLF). $headers override the defaults (a null value drops a header); every
     * message gets a unique Message-ID unless one is given.
     */
    private static function message(string $subject, array $headers = [], string $body = "Hello,\r\nthe printer is broken.\r\n"): string
    {
        $all = $headers + [
            'From' => 'Customer <customer@example.org>',
            'To' => 'Service Desk <desk@test.local>',
            'Subject' => $subject,
            'Date' => 'Tue, 05 Mar 2024 14:22:01 -0500',
            'Message-ID' => '<' . token('msg') . '@example.org>',
            'MIME-Version' => '1.0',
            'Content-Type' => 'text/plain; charset=utf-8',
        ];
        $head = '';
        foreach ($all as $name => $value) {
            if ($value !== null) {
                $head .= "$name: $value\r\n";
            }
        }
        return $head . "\r\n" . $body;
    }

    /** The Message-ID of a raw message, without brackets. */
    /** Messages "message #1 $tag" .. "message #$n $tag", in that order. */
    private static function numbered(int $n, string $tag): array
    {
        return array_map(fn (int $i) => self::message("message #$i $tag"), range(1, $n));
    }

    private static function idOf(string $raw): string
    {
        if (!preg_match('/^Message-ID:\s*<([^>]+)>/mi', $raw, $m)) {
            throw new RuntimeException('no Message-ID');
        }
        return $m[1];
    }

    /** The summary entry of one mailbox (by account RECID). */
    private static function box(array $summary, $recid): array
    {
        foreach ($summary['mailboxes'] as $box) {
            if ($box['account'] === $recid) {
                return $box;
            }
        }
        throw new RuntimeException("no mailbox $recid in the summary: " . json_encode($summary));
    }

    /** The FILE-transport .eml files in $dir whose text contains $needle. */
    private static function emlContaining(string $dir, string $needle): array
    {
        $found = [];
        foreach (glob("$dir/*.eml") ?: [] as $eml) {
            if (strpos((string) file_get_contents($eml), $needle) !== false) {
                $found[] = $eml;
            }
        }
        return $found;
    }

    /** Message-IDs of the Inquiries a TestHost received, in order. */
    private static function inquiryIds(TestHost $host): array
    {
        return array_values(array_map(fn($m) => $m['message_id'], $host->inquiries));
    }

    /** An array with its keys sorted (PHP arrays from JSON objects keep no particular order). */
    private static function ksorted(array $a): array
    {
        ksort($a);
        return $a;
    }

    private function manager(TestHost $host, ?string $ini = null): PCR_Utility_EmailManager
    {
        return new PCR_Utility_EmailManager($ini ?? $this->ini(), 'prod', $host);
    }
}
