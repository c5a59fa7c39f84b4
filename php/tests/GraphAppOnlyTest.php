<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * OFFICE365 tenant accounts with Microsoft app-only access (OAUTH GRANT client_credentials,
 * SPEC §3a) as PCR-360 drives them: a shared mailbox named by EMAIL, read and sent through
 * Microsoft Graph `/users/{EMAIL}` with the application's client secret, no sign-in; a mailbox
 * outside the app's Exchange grant is an Auth error for its account alone. Against the local
 * cloud emulator (tests/servers/cloud_emulator.py).
 */
final class GraphAppOnlyTest extends TestCase
{
    private const DATA = ['host' => 'pcr360.example.edu'];

    private string $dir;
    private string $ini;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-graphapp-');
        $this->ini = write_ini($this->dir, [
            'EMAIL' => 'pcr@pcr.example.edu',
            'DISPLAY_NAME' => 'PCR-360',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/master-out',
            'SYSADMIN' => 'sysadmin@pcr.example.edu',
            'TIMEOUT' => 10,
        ]);
    }

    /** A mailbox of the emulated Microsoft 365 tenant (e.g. a shared mailbox). */
    private static function mailbox(string $tag): string
    {
        $mailbox = $tag . bin2hex(random_bytes(5)) . '@tenant.example';
        cloud_admin('POST', '/_admin/users', ['provider' => 'microsoft', 'email' => $mailbox,
            'display_name' => "Shared $tag"]);
        return $mailbox;
    }

    /** An Entra ID app with the Graph application permissions, granted $mailboxes by Exchange. */
    private static function app(array $mailboxes): array
    {
        $name = 'ga' . bin2hex(random_bytes(5));
        return cloud_admin('POST', '/_admin/clients', ['provider' => 'microsoft', 'client_id' => "app-$name",
            'client_secret' => "secret-$name-Zq9", 'app_roles' => ['Mail.ReadWrite', 'Mail.Send'],
            'mailboxes' => $mailboxes]);
    }

    /** A Service Desk row reading and sending as $mailbox with app-only access, the Secret KEY encrypted. */
    private function row(int $recid, int $tenant, array $app, string $mailbox): array
    {
        $base = test_env('PCR_CLOUD_URL');
        return ['RECID' => $recid, 'TENANTS_RECID' => $tenant, 'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => $mailbox, 'DISPLAY_NAME' => 'Service Desk',
            'OUTGOING_TRANSPORT_TYPE' => 'OFFICE365', 'INCOMING_MAILBOX_TYPE' => 'OFFICE365', 'TIMEOUT' => 10,
            'OAUTH' => [
                'GRANT' => 'client_credentials',
                'APPLICATION_ID' => $app['client_id'],
                'SECRET_KEY' => PCR_Utility_EmailManager::encryptPassword($app['client_secret'], $this->ini, 'prod'),
                'AUTHORITY_URL' => "$base/common",
                'API_BASE_URL' => "$base/v1.0",
            ]];
    }

    private static function header(string $raw, string $name): ?string
    {
        [$head] = explode("\n\n", str_replace("\r\n", "\n", $raw), 2);
        $head = preg_replace("/\n[ \t]+/", ' ', $head);
        return preg_match('/^' . preg_quote($name, '/') . ':\s*(.*)$/mi', $head, $m) ? $m[1] : null;
    }

    /** The summary entry of one mailbox (by account RECID), wherever the summary lists them. */
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

    private static function incoming(string $subject, string $id): string
    {
        return "From: Customer <customer@outside.example>\r\nTo: desk@tenant.example\r\n"
            . "Subject: $subject\r\nMessage-ID: <$id@outside.example>\r\n"
            . "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\r\nBody of $subject\r\n";
    }

    public function testASharedMailboxIsReadAndSentAsWithAppOnlyAccessAndAnUngrantedOneFailsAlone(): void
    {
        $shared = self::mailbox('helpdesk');
        $outside = self::mailbox('facilities');
        $app = self::app([$shared]);
        $host = new TestHost();
        $host->accounts = [$this->row(61, 1, $app, $shared), $this->row(62, 2, $app, $outside)];
        $m = new PCR_Utility_EmailManager($this->ini, 'prod', $host);

        // Nothing to sign in.
        try {
            $m->authorizationUrl(61, OAUTH_REDIRECT_URI);
            $this->fail('an app-only account got a sign-in URL');
        } catch (PCR_Utility_EmailAuthException $e) {
            $this->assertStringContainsString('nothing to sign in', $e->getMessage());
            $this->assertStringContainsString('client_credentials', $e->getMessage());
        }

        // send(): out as the shared mailbox (the From is replaced), its copy in its Sent Items.
        $tk = token('ga');
        $r = $m->send(['to' => 'Customer <customer@outside.example>', 'subject' => "Ticket $tk",
            'text' => "Hello from the desk\n", 'kind' => 'service_desk', 'tenant' => 1]);
        $this->assertSame('sent', $r['status'], json_encode($r));
        $this->assertSame(61, $r['account']);
        $this->assertSame('OFFICE365', $r['transport']);
        $this->assertSame("Service Desk <$shared>", $r['from']);
        $sent = cloud_sent($shared);
        $this->assertCount(1, $sent);
        $this->assertSame('mime', $sent[0]['format']);
        $this->assertMatchesRegularExpression('/^"?Service Desk"? <' . preg_quote($shared, '/') . '>$/',
            (string) self::header($sent[0]['raw'], 'From'));
        $this->assertSame($r['message_id'], self::header($sent[0]['raw'], 'Message-ID'));
        $box = cloud_admin('GET', '/_admin/mailbox?provider=microsoft&user=' . rawurlencode($shared));
        $copies = array_values(array_filter($box['messages'], fn ($x) => $x['folder'] === 'Sent Items'));
        $this->assertCount(1, $copies, json_encode($box));
        $this->assertSame($r['message_id'], $copies[0]['message_id']);
        $this->assertSame("Ticket $tk", $copies[0]['subject']);

        // No refresh token was needed or stored.
        $db = $this->dir . '/email-state/pcr_email.sqlite';
        $this->assertSame([], state_query($db, "SELECT kind FROM tokens WHERE kind='oauth_refresh'")['rows']);

        // checkAccount(): app-only, the mailbox is EMAIL, the grant is checked; nothing sent.
        $c = $m->checkAccount(61);
        $this->assertTrue($c['ok'], json_encode($c));
        $this->assertSame('client_credentials', $c['oauth']['grant']);
        $this->assertTrue($c['oauth']['authorized']);
        $this->assertSame($shared, $c['oauth']['mailbox']);
        $this->assertTrue($c['oauth']['api']['ok']);
        $bad = $m->checkAccount(62);
        $this->assertFalse($bad['ok']);
        $this->assertStringContainsString('must be granted', $bad['oauth']['error']);
        $this->assertStringContainsString('New-ApplicationAccessPolicy', $bad['oauth']['error']);
        $this->assertCount(1, cloud_sent($shared), 'checkAccount sent nothing');

        // Sending from the ungranted mailbox: an Auth error for its account.
        try {
            $m->send(['to' => 'customer@outside.example', 'subject' => "Nope $tk", 'text' => 'x',
                'kind' => 'service_desk', 'tenant' => 2]);
            $this->fail('the ungranted mailbox sent');
        } catch (PCR_Utility_EmailAuthException $e) {
            $this->assertStringContainsString($outside, $e->getMessage());
            $this->assertStringContainsString('must be granted', $e->getMessage());
        }
        $this->assertSame([], cloud_sent($outside));

        // eventCheckMail: the shared mailbox's mail becomes Inquiries and is marked read; the
        // ungranted mailbox is an Auth error in the summary, and its mail waits.
        cloud_seed('microsoft', $shared, self::incoming("Printer down $tk", "s1-$tk"));
        cloud_seed('microsoft', $shared, self::incoming("VPN broken $tk", "s2-$tk"), true);
        cloud_seed('microsoft', $outside, self::incoming("Leaking roof $tk", "o1-$tk"));
        $summary = $m->eventCheckMail(self::DATA);
        $a = self::entry($summary, 61);
        $b = self::entry($summary, 62);
        $this->assertNotNull($a, json_encode($summary));
        $this->assertNotNull($b, json_encode($summary));
        $this->assertSame(2, $a['fetched'], json_encode($a));
        $this->assertSame(2, $a['inquiries']);
        $this->assertSame([], $a['errors']);
        $this->assertSame(0, $b['inquiries']);
        $this->assertNotEmpty($b['errors'], json_encode($b));
        $this->assertStringContainsString('must be granted', json_encode($b['errors']));
        $subjects = array_map(fn ($i) => $i['subject'], $host->inquiries);
        sort($subjects);
        $this->assertSame(["Printer down $tk", "VPN broken $tk"], $subjects);
        foreach ($host->inquiries as $inq) {
            $this->assertEquals(['RECID' => 61, 'EMAIL' => $shared, 'TENANTS_RECID' => 1],
                array_intersect_key($inq['account'], ['RECID' => 0, 'EMAIL' => 0, 'TENANTS_RECID' => 0]));
            $this->assertSame('pcr360.example.edu', $inq['host']);
        }
        $box = cloud_admin('GET', '/_admin/mailbox?provider=microsoft&user=' . rawurlencode($shared));
        foreach ($box['messages'] as $msg) {
            if ($msg['folder'] === 'Inbox') {
                $this->assertTrue($msg['is_read'], json_encode($msg));
            }
        }
        $waiting = cloud_admin('GET', '/_admin/mailbox?provider=microsoft&user=' . rawurlencode($outside));
        $this->assertCount(1, $waiting['messages']);
        $this->assertFalse($waiting['messages'][0]['is_read']);
        $this->assertStringContainsString('must be granted', json_encode($host->errors));
        $this->assertStringNotContainsString($app['client_secret'], json_encode([$summary, $host->errors, $c, $bad]));

        // A second run finds nothing new in the shared mailbox.
        $again = $m->eventCheckMail(self::DATA);
        $this->assertSame(0, self::entry($again, 61)['inquiries']);
        $this->assertCount(2, $host->inquiries);

        // The Exchange administrator grants the app the second mailbox: its mail arrives.
        cloud_admin('POST', '/_admin/app_access', ['client_id' => $app['client_id'], 'mailboxes' => [$shared, $outside]]);
        $summary = $m->eventCheckMail(self::DATA);
        $this->assertSame(1, self::entry($summary, 62)['inquiries'], json_encode($summary));
        $this->assertSame([], self::entry($summary, 62)['errors']);
        $this->assertContains("Leaking roof $tk", array_map(fn ($i) => $i['subject'], $host->inquiries));
    }
}
