<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * The System Check Email event over OFFICE365 and GMAIL mailboxes that keep their mail
 * (PROCESSED_ACTION = seen, issue 13 item 1, SPEC §8): after the first run, a run asks the
 * Graph delta link or the Gmail history it saved last time, so it costs what is new, not what
 * the mailbox holds; an expired delta link or a too-old historyId costs one full listing, and
 * every message is still exactly one Inquiry. Request counts come from the cloud emulator's
 * log (tests/servers/cloud_emulator.py), never from timings.
 */
final class CloudIncrementalTest extends TestCase
{
    private const DATA = ['host' => 'pcr360.example.edu'];

    private string $dir;
    private string $ini;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-incr-');
        $this->ini = write_ini($this->dir, [
            'EMAIL' => 'pcr@pcr.example.edu',
            'DISPLAY_NAME' => 'PCR-360',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/master-out',
            'SYSADMIN' => 'sysadmin@pcr.example.edu',
            'TIMEOUT' => 10,
        ]);
    }

    private function manager(TestHost $host): PCR_Utility_EmailManager
    {
        return new PCR_Utility_EmailManager($this->ini, 'prod', $host);
    }

    private function signIn(PCR_Utility_EmailManager $m, int $recid): void
    {
        $back = browser_sign_in($m->authorizationUrl($recid, OAUTH_REDIRECT_URI));
        $this->assertArrayHasKey('code', $back, json_encode($back));
        $m->completeAuthorization($back['state'], $back['code']);
    }

    /** A signed-in (delegated) Service Desk row, its Secret KEY encrypted. */
    private function row(int $recid, array $tenant, int $tenants): array
    {
        $row = cloud_row($recid, $tenant, $tenant['mailbox'], 'service_desk', $tenants);
        $row['OAUTH']['SECRET_KEY'] = PCR_Utility_EmailManager::encryptPassword($tenant['client_secret'], $this->ini, 'prod');
        return $row;
    }

    /**
     * A shared mailbox read with Microsoft app-only access (Graph /users/{EMAIL}): [row,
     * the app's client id].
     */
    private function appOnlyRow(int $recid, int $tenants): array
    {
        $mailbox = 'shared' . bin2hex(random_bytes(5)) . '@tenant.example';
        cloud_admin('POST', '/_admin/users', ['provider' => 'microsoft', 'email' => $mailbox]);
        $name = 'gi' . bin2hex(random_bytes(5));
        $app = cloud_admin('POST', '/_admin/clients', ['provider' => 'microsoft', 'client_id' => "app-$name",
            'client_secret' => "secret-$name-Zq9", 'app_roles' => ['Mail.ReadWrite', 'Mail.Send'],
            'mailboxes' => [$mailbox]]);
        $base = test_env('PCR_CLOUD_URL');
        return [['RECID' => $recid, 'TENANTS_RECID' => $tenants, 'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => $mailbox, 'DISPLAY_NAME' => 'Service Desk',
            'OUTGOING_TRANSPORT_TYPE' => 'OFFICE365', 'INCOMING_MAILBOX_TYPE' => 'OFFICE365', 'TIMEOUT' => 10,
            'OAUTH' => [
                'GRANT' => 'client_credentials',
                'APPLICATION_ID' => $app['client_id'],
                'SECRET_KEY' => PCR_Utility_EmailManager::encryptPassword($app['client_secret'], $this->ini, 'prod'),
                'AUTHORITY_URL' => "$base/common",
                'API_BASE_URL' => "$base/v1.0",
            ]], $app['client_id']];
    }

    private static function mail(string $subject, string $id): string
    {
        return "From: Customer <customer@outside.example>\r\nTo: desk@tenant.example\r\n"
            . "Subject: $subject\r\nMessage-ID: <$id@outside.example>\r\n"
            . "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\r\nBody of $subject\r\n";
    }

    /** Seeds $n messages (one in three already read) into $mailbox; returns their subjects. */
    private static function seedMany(string $provider, string $mailbox, string $prefix, int $n): array
    {
        $subjects = [];
        for ($i = 0; $i < $n; $i++) {
            $subject = "$prefix $i";
            cloud_seed($provider, $mailbox, self::mail($subject, token('m')), $i % 3 === 0);
            $subjects[] = $subject;
        }
        return $subjects;
    }

    /** The summary entry of one mailbox (by account RECID). */
    private static function entry(array $summary, int $recid): ?array
    {
        foreach ($summary as $v) {
            if (is_array($v)) {
                if (($v['account'] ?? null) === $recid && array_key_exists('fetched', $v)) {
                    return $v;
                }
                $found = self::entry($v, $recid);
                if ($found !== null) {
                    return $found;
                }
            }
        }
        return null;
    }

    /** The mail API requests (method, path, status) the emulator saw for a client and mailbox. */
    private static function requests(string $clientId, string $mailbox): array
    {
        $out = [];
        foreach (cloud_stats($clientId, $mailbox)['requests'] as $r) {
            if (str_starts_with($r['path'], '/v1.0/') || str_starts_with($r['path'], '/gmail/')) {
                $out[] = "{$r['method']} {$r['path']} {$r['status']}";
            }
        }
        return $out;
    }

    private static function matching(array $requests, string $pattern): array
    {
        return array_values(preg_grep($pattern, $requests));
    }

    /** The subjects of $subjectsByBox[$box] that became Inquiries, in the order they were created. */
    private static function subjectsOf(TestHost $host, array $subjectsByBox, int $box): array
    {
        return array_values(array_filter(array_map(fn ($i) => $i['subject'], $host->inquiries),
            fn ($s) => in_array($s, $subjectsByBox[$box], true)));
    }

    private function assertEachOnce(TestHost $host, int $expected): void
    {
        $ids = array_map(fn ($i) => $i['message_id'], $host->inquiries);
        $this->assertCount($expected, $ids);
        $this->assertSame(count($ids), count(array_unique($ids)), 'a message became two Inquiries');
    }

    public function testALaterRunCostsWhatIsNewNotWhatTheMailboxHolds(): void
    {
        $ms = cloud_tenant('microsoft', 'incms');
        $gm = cloud_tenant('google', 'incgm');
        [$app, $appClient] = $this->appOnlyRow(93, 3);
        $host = new TestHost();
        $host->accounts = [$this->row(71, $ms, 1), $this->row(81, $gm, 2), $app];
        $m = $this->manager($host);
        $this->signIn($m, 71);
        $this->signIn($m, 81);
        $boxes = [
            71 => ['microsoft', $ms['mailbox'], $ms['client_id']],
            81 => ['google', $gm['mailbox'], $gm['client_id']],
            93 => ['microsoft', $app['EMAIL'], $appClient],
        ];
        $tk = token('old');
        $old = [];
        foreach ($boxes as $recid => [$provider, $mailbox]) {
            $old[$recid] = self::seedMany($provider, $mailbox, "Old $recid $tk", 120);
        }

        // The first run sees every message, read or unread.
        $first = $m->eventCheckMail(self::DATA);
        foreach ($boxes as $recid => $_) {
            $this->assertSame(120, self::entry($first, $recid)['inquiries'], json_encode(self::entry($first, $recid)));
        }
        $this->assertSame([], $host->errors, json_encode($host->errors));
        // The next one reads what the first one changed (marked read) and downloads nothing.
        $quiet = $m->eventCheckMail(self::DATA);
        $this->assertSame(0, $quiet['totals']['inquiries'], json_encode($quiet));
        $this->assertSame(0, $quiet['totals']['fetched'], json_encode($quiet));

        $new = [];
        $before = [];
        foreach ($boxes as $recid => [$provider, $mailbox, $client]) {
            $new[$recid] = self::seedMany($provider, $mailbox, "New $recid $tk", 5);
            $before[$recid] = count(self::requests($client, $mailbox));
        }
        $second = $m->eventCheckMail(self::DATA);
        foreach ($boxes as $recid => [$provider, $mailbox, $client]) {
            $this->assertSame(5, self::entry($second, $recid)['inquiries'], json_encode(self::entry($second, $recid)));
            $run = array_slice(self::requests($client, $mailbox), $before[$recid]);
            if ($provider === 'microsoft') {
                // One delta request; one download and one PATCH per new message.
                $this->assertCount(1, self::matching($run, '#/messages/delta #'), json_encode($run));
                $this->assertCount(1 + 5 + 5, $run, json_encode($run));
            } else {
                // One history request; metadata, download and marking per new message.
                $this->assertCount(1, self::matching($run, '#/history #'), json_encode($run));
                $this->assertCount(0, self::matching($run, '#/messages #'), 'the label was listed again: ' . json_encode($run));
                $this->assertCount(1 + 3 * 5, $run, json_encode($run));
            }
            $before[$recid] += count($run);
        }
        foreach ($boxes as $recid => $_) {
            $this->assertSame($new[$recid], self::subjectsOf($host, $new, $recid));
        }

        // Nothing new: one request per mailbox.
        $third = $m->eventCheckMail(self::DATA);
        $this->assertSame(0, $third['totals']['inquiries'], json_encode($third));
        foreach ($boxes as $recid => [, $mailbox, $client]) {
            $run = array_slice(self::requests($client, $mailbox), $before[$recid]);
            $this->assertCount(1, $run, json_encode($run));
        }
        $this->assertEachOnce($host, 3 * 125);
        $this->assertSame([], $host->errors, json_encode($host->errors));
    }

    public function testAnExpiredDeltaLinkOrHistoryCostsOneFullListingAndStillExactlyOnce(): void
    {
        $ms = cloud_tenant('microsoft', 'rsms');
        $gm = cloud_tenant('google', 'rsgm');
        $host = new TestHost();
        $host->accounts = [$this->row(71, $ms, 1), $this->row(81, $gm, 2)];
        $m = $this->manager($host);
        $this->signIn($m, 71);
        $this->signIn($m, 81);
        $boxes = [71 => ['microsoft', $ms['mailbox'], $ms['client_id']], 81 => ['google', $gm['mailbox'], $gm['client_id']]];
        $tk = token('rs');
        foreach ($boxes as $recid => [$provider, $mailbox]) {
            self::seedMany($provider, $mailbox, "Old $recid $tk", 30);
        }
        // The application's database refuses one message of each mailbox in the first run.
        $host->onCreate = function (array $mail) use ($tk) {
            if (preg_match("/^Old \\d+ $tk 7$/", $mail['subject'])) {
                throw new RuntimeException('the database is down for message 7');
            }
        };
        $first = $m->eventCheckMail(self::DATA);
        foreach ($boxes as $recid => $_) {
            $box = self::entry($first, $recid);
            $this->assertSame(29, $box['inquiries'], json_encode($box));
            $this->assertSame(1, $box['failed'], json_encode($box));
        }
        $host->onCreate = null;

        // New mail arrives, and then the delta link expires (410 Gone, SyncStateNotFound) and
        // the historyId becomes too old (404).
        $before = [];
        foreach ($boxes as $recid => [$provider, $mailbox, $client]) {
            self::seedMany($provider, $mailbox, "New $recid $tk", 3);
            cloud_admin('POST', '/_admin/sync_state', ['provider' => $provider, 'user' => $mailbox]);
            $before[$recid] = count(self::requests($client, $mailbox));
        }
        $second = $m->eventCheckMail(self::DATA);
        foreach ($boxes as $recid => [$provider, $mailbox, $client]) {
            $box = self::entry($second, $recid);
            // The refused message of the first run, and the three new ones.
            $this->assertSame(4, $box['inquiries'], json_encode($box));
            $this->assertSame([], $box['errors'], json_encode($box));
            $run = array_slice(self::requests($client, $mailbox), $before[$recid]);
            if ($provider === 'microsoft') {
                $this->assertSame(['410', '200'], array_map(fn ($r) => substr($r, -3),
                    self::matching($run, '#/messages/delta #')), json_encode($run));
            } else {
                $this->assertSame(['404'], array_map(fn ($r) => substr($r, -3),
                    self::matching($run, '#/history #')), json_encode($run));
                $this->assertCount(1, self::matching($run, '#/profile #'), json_encode($run));
            }
        }
        $this->assertEachOnce($host, 2 * 33);

        // Incremental again: absorbs the marks of the full run, then one request per run.
        $m->eventCheckMail(self::DATA);
        foreach ($boxes as $recid => [, $mailbox, $client]) {
            $before[$recid] = count(self::requests($client, $mailbox));
        }
        $third = $m->eventCheckMail(self::DATA);
        $this->assertSame(0, $third['totals']['inquiries'], json_encode($third));
        foreach ($boxes as $recid => [, $mailbox, $client]) {
            $this->assertCount(1, array_slice(self::requests($client, $mailbox), $before[$recid]));
        }
        $this->assertEachOnce($host, 2 * 33);
    }
}
