<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * OFFICE365 and GMAIL tenant accounts driven as PCR-360 drives them: "Click to Authenticate"
 * (authorizationUrl), the browser's return to /core/oauth2/validated (completeAuthorization),
 * send(), checkAccount(), token renewal and rotation, a revoked sign-in, and the System Check
 * Email event, against the local cloud emulator (Microsoft identity platform + Graph, Google
 * OAuth + Gmail API; tests/servers/cloud_emulator.py).
 */
final class OAuthTest extends TestCase
{
    private string $dir;
    private string $ini;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-oauth-');
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

    /** The whole sign-in as the administrator does it; returns completeAuthorization()'s array. */
    private function signIn(PCR_Utility_EmailManager $m, int $recid, ?string $asUser = null): array
    {
        $back = browser_sign_in($m->authorizationUrl($recid, OAUTH_REDIRECT_URI), $asUser);
        $this->assertArrayHasKey('code', $back, json_encode($back));
        return $m->completeAuthorization($back['state'], $back['code']);
    }

    /** SQL on the state database (in a child process: see state_query()). */
    private function state(string $sql): array
    {
        // STATE_DIR defaults to email-state/ beside the INI file's directory.
        $path = $this->dir . '/email-state/pcr_email.sqlite';
        $this->assertFileExists($path);
        return state_query($path, $sql);
    }

    private function refreshTokenVersion(string $recid): int
    {
        $rows = $this->state("SELECT version FROM tokens WHERE account='$recid' AND kind='oauth_refresh'")['rows'];
        $this->assertCount(1, $rows);
        return (int) $rows[0]['version'];
    }

    /** A tenant row for the emulator with its Secret KEY stored encrypted, as PCR-360 keeps it. */
    private function row(int $recid, array $tenant, string $email, int $tenants = 1, array $extra = []): array
    {
        $row = cloud_row($recid, $tenant, $email, 'service_desk', $tenants, $extra);
        $row['OAUTH']['SECRET_KEY'] = PCR_Utility_EmailManager::encryptPassword($tenant['client_secret'], $this->ini, 'prod');
        return $row;
    }

    /** The From header names the mailbox with the account's display name. */
    private function assertFromMailbox(string $mailbox, ?string $from): void
    {
        $this->assertMatchesRegularExpression('/^"?Service Desk"? <' . preg_quote($mailbox, '/') . '>$/', (string) $from);
    }

    private static function header(string $raw, string $name): ?string
    {
        [$head] = explode("\n\n", str_replace("\r\n", "\n", $raw), 2);
        $head = preg_replace("/\n[ \t]+/", ' ', $head);
        return preg_match('/^' . preg_quote($name, '/') . ':\s*(.*)$/mi', $head, $m) ? $m[1] : null;
    }

    private function sendSd(PCR_Utility_EmailManager $m, int $tenant, string $subject): array
    {
        return $m->send(['to' => 'Customer <customer@outside.example>', 'subject' => $subject,
            'text' => "Hello from the desk\n", 'kind' => 'service_desk', 'tenant' => $tenant]);
    }

    public function testOffice365SignInSendsAsTheSignedInMailboxAndChecksWithoutSending(): void
    {
        $t = cloud_tenant('microsoft', 'ms');
        $host = new TestHost();
        $host->accounts = [$this->row(41, $t, 'servicedesk@pcr.example.edu')];
        $m = $this->manager($host);

        $url = $m->authorizationUrl(41, OAUTH_REDIRECT_URI);
        $this->assertStringStartsWith(test_env('PCR_CLOUD_URL') . '/common/oauth2/v2.0/authorize?', $url);
        parse_str((string) parse_url($url, PHP_URL_QUERY), $q);
        $this->assertSame($t['client_id'], $q['client_id']);
        $this->assertSame('code', $q['response_type']);
        $this->assertSame(OAUTH_REDIRECT_URI, $q['redirect_uri']);
        $this->assertSame('S256', $q['code_challenge_method']);
        $this->assertMatchesRegularExpression('/^[A-Za-z0-9_-]{43}$/', $q['code_challenge']);
        $this->assertContains('offline_access', explode(' ', $q['scope']));
        $this->assertGreaterThanOrEqual(32, strlen($q['state']));
        $this->assertStringNotContainsString($t['client_secret'], $url);
        parse_str((string) parse_url($m->authorizationUrl(41, OAUTH_REDIRECT_URI), PHP_URL_QUERY), $q2);
        $this->assertNotSame($q['state'], $q2['state'], 'every click gets its own state');

        // The administrator signs in as the mailbox, which is not the account's EMAIL.
        $back = browser_sign_in($url, $t['mailbox']);
        $this->assertSame($q['state'], $back['state']);
        $done = $m->completeAuthorization($back['state'], $back['code']);
        $this->assertSame(41, $done['recid']);
        $this->assertSame('OFFICE365', $done['provider']);
        $this->assertSame($t['mailbox'], $done['mailbox']);
        $this->assertSame('servicedesk@pcr.example.edu', $done['email']);
        $this->assertTrue($done['differs_from_email']);

        // The refresh token is kept, encrypted.
        $stored = (string) $this->state("SELECT value FROM tokens WHERE account='41' AND kind='oauth_refresh'")['rows'][0]['value'];
        $this->assertStringStartsWith('ENC:v1:', $stored);
        $this->assertStringNotContainsString('M.C5_', $stored, 'the emulator\'s refresh token is not stored in clear');
        $this->assertSame(1, cloud_stats($t['client_id'], $t['mailbox'])['valid_refresh_tokens']);

        // A reloaded redirect page: the same state and code again.
        try {
            $m->completeAuthorization($back['state'], $back['code']);
            $this->fail('a reused state was accepted');
        } catch (PCR_Utility_EmailAuthException $e) {
            $this->assertStringContainsString('already used', $e->getMessage());
        }
        $this->assertCount(1, $host->errors);
        $this->assertStringContainsString('already used', $host->errors[0]['message']);
        $this->assertSame(1, cloud_stats($t['client_id'])['grants']['authorization_code'], 'the code was redeemed once');

        // send(): Service Desk mail goes through Graph, as the signed-in mailbox.
        $subject = 'Ticket ' . token('ms');
        $r = $this->sendSd($m, 1, $subject);
        $this->assertSame('sent', $r['status']);
        $this->assertSame(41, $r['account']);
        $this->assertSame('OFFICE365', $r['transport']);
        $this->assertSame('Service Desk <' . $t['mailbox'] . '>', $r['from']);
        $sent = cloud_sent($t['mailbox']);
        $this->assertCount(1, $sent);
        $this->assertSame('graph', $sent[0]['via']);
        $this->assertSame('mime', $sent[0]['format']);
        $raw = $sent[0]['raw'];
        $this->assertFromMailbox($t['mailbox'], self::header($raw, 'From'));
        $this->assertSame($subject, self::header($raw, 'Subject'));
        $this->assertSame($r['message_id'], self::header($raw, 'Message-ID'));
        $this->assertSame('Customer <customer@outside.example>', self::header($raw, 'To'));
        $this->assertStringContainsString('Hello from the desk', $raw);

        // checkAccount(): signed in, whose mailbox, a live API check; nothing sent.
        $c = $m->checkAccount(41);
        $this->assertTrue($c['ok'], json_encode($c));
        $this->assertSame('OFFICE365', $c['OUTGOING_TRANSPORT_TYPE']);
        $this->assertTrue($c['outgoing']['ok']);
        $o = $c['oauth'];
        $this->assertSame('OFFICE365', $o['provider']);
        $this->assertTrue($o['authorized']);
        $this->assertTrue($o['access_token_valid']);
        $this->assertGreaterThan(time(), $o['access_token_valid_until']);
        $this->assertSame($t['mailbox'], $o['mailbox']);
        $this->assertNull($o['last_error']);
        $this->assertTrue($o['api']['ok']);
        $this->assertSame($t['mailbox'], $o['api']['mailbox']);
        $this->assertStringNotContainsString($t['client_secret'], json_encode($c));
        $this->assertCount(1, cloud_sent($t['mailbox']), 'checkAccount sent nothing');
        $this->assertCount(1, $host->errors, 'nothing new in the Error Log');
    }

    public function testGmailSignInSendsThroughTheGmailApi(): void
    {
        $t = cloud_tenant('google', 'gm');
        $host = new TestHost();
        $host->accounts = [$this->row(42, $t, $t['mailbox'], 3)];
        $m = $this->manager($host);

        $url = $m->authorizationUrl(42, OAUTH_REDIRECT_URI);
        $this->assertStringStartsWith(test_env('PCR_CLOUD_URL') . '/o/oauth2/v2/auth?', $url);
        parse_str((string) parse_url($url, PHP_URL_QUERY), $q);
        $this->assertSame('offline', $q['access_type']);
        $this->assertSame('consent', $q['prompt']);
        $this->assertSame($t['mailbox'], $q['login_hint']);
        $this->assertSame('S256', $q['code_challenge_method']);

        // The emulator signs in the login_hint user, as Google would with its account chooser.
        $back = browser_sign_in($url);
        $done = $m->completeAuthorization($back['state'], $back['code']);
        $this->assertSame(42, $done['recid']);
        $this->assertSame('GMAIL', $done['provider']);
        $this->assertSame($t['mailbox'], $done['mailbox']);
        $this->assertFalse($done['differs_from_email']);

        $subject = 'Gmail ticket ' . token('gm');
        $r = $this->sendSd($m, 3, $subject);
        $this->assertSame('sent', $r['status']);
        $this->assertSame(42, $r['account']);
        $this->assertSame('GMAIL', $r['transport']);
        $this->assertSame('Service Desk <' . $t['mailbox'] . '>', $r['from']);
        $sent = cloud_sent($t['mailbox']);
        $this->assertCount(1, $sent);
        $this->assertSame('gmail', $sent[0]['via']);
        $this->assertFromMailbox($t['mailbox'], self::header($sent[0]['raw'], 'From'));
        $this->assertSame($subject, self::header($sent[0]['raw'], 'Subject'));
        $this->assertSame($r['message_id'], self::header($sent[0]['raw'], 'Message-ID'));

        $c = $m->checkAccount('42');
        $this->assertTrue($c['ok'], json_encode($c));
        $this->assertSame('GMAIL', $c['oauth']['provider']);
        $this->assertTrue($c['oauth']['authorized']);
        $this->assertFalse($c['oauth']['service_account']);
        $this->assertSame($t['mailbox'], $c['oauth']['api']['mailbox']);
        $this->assertCount(1, cloud_sent($t['mailbox']));
        $this->assertSame([], $host->errors);
    }

    public function testUnknownExpiredAndRefusedSignInsAreAuthExceptions(): void
    {
        $t = cloud_tenant('microsoft', 'msbad');
        $host = new TestHost();
        $host->accounts = [
            $this->row(43, $t, $t['mailbox']),
            ['RECID' => 44, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'file@pcr.example.edu',
             'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t1'],
        ];
        $m = $this->manager($host);
        $expectAuth = function (callable $f, string $needle) {
            try {
                $f();
                $this->fail("no exception (expected: $needle)");
            } catch (PCR_Utility_EmailAuthException $e) {
                $this->assertStringContainsString($needle, $e->getMessage());
                $this->assertStringContainsString('Click to Authenticate', $e->getMessage());
                return $e;
            }
        };

        // A state this server never issued (forged, or from another server).
        $expectAuth(fn () => $m->completeAuthorization(str_repeat('A', 43), 'M.code'), 'unknown');

        // The administrator took longer than ten minutes on the sign-in page.
        $url = $m->authorizationUrl(43, OAUTH_REDIRECT_URI);
        $this->assertSame(1, $this->state('UPDATE pending_auth SET expires_at = expires_at - 700')['changes']);
        $back = browser_sign_in($url);
        $expectAuth(fn () => $m->completeAuthorization($back['state'], $back['code']), 'expired');
        $this->assertSame(0, cloud_stats($t['client_id'])['grants']['authorization_code'] ?? 0,
            'an expired sign-in never redeems its code');

        // The mailbox owner refused consent: the redirect has an error and no code.
        $back = browser_sign_in($m->authorizationUrl(43, OAUTH_REDIRECT_URI) . '&_deny=1');
        $this->assertSame('access_denied', $back['error']);
        $expectAuth(fn () => $m->completeAuthorization($back['state'], $back['code'] ?? ''), 'no authorization code');

        // None of it signed the account in.
        $c = $m->checkAccount(43);
        $this->assertFalse($c['ok']);
        $this->assertFalse($c['oauth']['authorized']);
        $this->assertStringContainsString('Click to Authenticate', $c['oauth']['error']);
        $this->assertCount(3, $host->errors, 'every failed sign-in is in the Error Log');
        $this->assertStringNotContainsString($t['client_secret'], json_encode($host->errors));

        // Accounts that do not sign in with OAuth2, and wrong arguments.
        try {
            $m->authorizationUrl(44, OAUTH_REDIRECT_URI);
            $this->fail('a FILE account got a sign-in URL');
        } catch (PCR_Utility_EmailConfigException $e) {
            $this->assertStringContainsString('OUTGOING_TRANSPORT_TYPE', $e->getMessage());
        }
        try {
            $m->authorizationUrl(99, OAUTH_REDIRECT_URI);
            $this->fail('an unknown RECID got a sign-in URL');
        } catch (PCR_Utility_EmailException $e) {
            $this->assertStringContainsString('RECID 99', $e->getMessage());
        }
        try {
            $m->authorizationUrl(43, '/core/oauth2/validated');
            $this->fail('a relative redirect URI was accepted');
        } catch (PCR_Utility_EmailException $e) {
            $this->assertStringContainsString('redirect URI', $e->getMessage());
        }
        // The tenant accounts come from the host: without one there is nothing to sign in.
        [$code, $out, $err] = run_php(
            '$m = new PCR_Utility_EmailManager(' . var_export($this->ini, true) . ', "prod");'
            . 'try { $m->authorizationUrl(43, "https://pcr360.example.edu/core/oauth2/validated"); }'
            . 'catch (PCR_Utility_EmailException $e) { echo get_class($e), ": ", $e->getMessage(); }'
        );
        $this->assertSame(0, $code, $err);
        $this->assertStringStartsWith('PCR_Utility_EmailException: authorizationUrl needs a PCR_Utility_EmailHost', $out);
    }

    public function testAccessTokensAreRenewedAndEveryRotatedRefreshTokenIsKept(): void
    {
        // Access tokens live 4 s (used for 3 s); Microsoft rotates the refresh token on every use.
        $t = cloud_tenant('microsoft', 'msrot', 4);
        $host = new TestHost();
        $host->accounts = [$this->row(45, $t, $t['mailbox'])];
        $m = $this->manager($host);
        $this->signIn($m, 45);
        $v0 = $this->refreshTokenVersion('45');
        $subject = 'Rotation ' . token('rot');

        $this->assertSame('sent', $this->sendSd($m, 1, "$subject #1")['status']);
        $this->assertSame(0, cloud_stats($t['client_id'])['grants']['refresh_token'] ?? 0,
            'the token from the sign-in is used while it is fresh');

        usleep(3_300_000);
        $this->assertSame('sent', $this->sendSd($m, 1, "$subject #2")['status']);
        $stats = cloud_stats($t['client_id'], $t['mailbox']);
        $this->assertSame(1, $stats['grants']['refresh_token']);
        $this->assertSame(1, $stats['valid_refresh_tokens'], 'the used refresh token was rotated out');
        $v1 = $this->refreshTokenVersion('45');
        $this->assertGreaterThan($v0, $v1, 'the rotated refresh token was saved');

        // Another PHP process (a new request) uses the newest tokens: no new refresh needed.
        $rows = var_export($host->accounts, true);
        [$code, $out, $err] = run_php(
            '$h = new TestHost(); $h->accounts = ' . $rows . ';'
            . '$m = new PCR_Utility_EmailManager(' . var_export($this->ini, true) . ', "prod", $h);'
            . 'echo json_encode($m->send(["to" => "customer@outside.example", "subject" => '
            . var_export("$subject #3", true) . ', "text" => "x", "kind" => "service_desk", "tenant" => 1]));'
        );
        $this->assertSame(0, $code, $err);
        $this->assertSame('sent', json_decode($out, true)['status'], $out);
        $this->assertSame(1, cloud_stats($t['client_id'])['grants']['refresh_token']);

        // Once more after expiry: only the newest refresh token works now, and it is the one kept.
        usleep(3_300_000);
        $this->assertSame('sent', $this->sendSd($m, 1, "$subject #4")['status']);
        $stats = cloud_stats($t['client_id'], $t['mailbox']);
        $this->assertSame(2, $stats['grants']['refresh_token']);
        $this->assertSame(2, $stats['grants']['refresh_token_attempt'], 'no refresh was refused');
        $this->assertSame(1, $stats['valid_refresh_tokens']);
        $this->assertGreaterThan($v1, $this->refreshTokenVersion('45'));

        $subjects = array_map(fn ($s) => self::header($s['raw'], 'Subject'), cloud_sent($t['mailbox']));
        $this->assertSame(["$subject #1", "$subject #2", "$subject #3", "$subject #4"], $subjects);
        $this->assertSame([], $host->errors);
    }

    public function testARevokedSignInAsksToReAuthenticateAndOtherMailboxesKeepSending(): void
    {
        $ms = cloud_tenant('microsoft', 'msrev');
        $gm = cloud_tenant('google', 'gmok');
        $host = new TestHost();
        $host->accounts = [
            $this->row(51, $ms, $ms['mailbox'], 1, ['SYSADMIN' => 'it@pcr.example.edu']),
            $this->row(61, $gm, $gm['mailbox'], 2),
        ];
        $m = $this->manager($host);
        $this->signIn($m, 51);
        $this->signIn($m, 61);
        $tk = token('rev');
        $this->assertSame('sent', $this->sendSd($m, 1, "$tk before")['status']);

        // The mailbox's sign-ins are revoked (password reset, "revoke sessions"): the refresh
        // token and the access tokens stop working.
        $this->assertSame(1, cloud_admin('POST', '/_admin/revoke', ['user' => $ms['mailbox']])['revoked']);
        cloud_admin('POST', '/_admin/expire_access_tokens', ['user' => $ms['mailbox']]);

        try {
            $this->sendSd($m, 1, "$tk after");
            $this->fail('sent with a revoked sign-in');
        } catch (PCR_Utility_EmailAuthException $e) {
            $this->assertSame('51', $e->account);
            $this->assertStringContainsString('revoked or has expired', $e->getMessage());
            $this->assertStringContainsString('Click to RE Authenticate', $e->getMessage());
            $this->assertStringNotContainsString($ms['client_secret'], (string) $e);
        }
        $this->assertCount(1, $host->errors, 'logged once');
        $this->assertStringContainsString('Click to RE Authenticate', $host->errors[0]['message']);
        $this->assertSame('51', $host->errors[0]['context']['account']);
        $this->assertStringNotContainsString($ms['client_secret'], json_encode($host->errors));

        // The other tenant's mailbox is not affected.
        $this->assertSame('sent', $this->sendSd($m, 2, "$tk other")['status']);
        $batch = $m->sendBatch([
            ['to' => 'a@outside.example', 'subject' => "$tk batch 1", 'text' => 'x', 'kind' => 'service_desk', 'tenant' => 1],
            ['to' => 'b@outside.example', 'subject' => "$tk batch 2", 'text' => 'x', 'kind' => 'service_desk', 'tenant' => 2],
        ]);
        $this->assertSame('failed', $batch[0]['status']);
        $this->assertSame('PCR_Utility_EmailAuthException', $batch[0]['exception']);
        $this->assertSame('sent', $batch[1]['status']);
        $this->assertCount(1, cloud_sent($ms['mailbox']), 'nothing went out after the revocation');
        $this->assertCount(2, cloud_sent($gm['mailbox']));

        // Check Account says what is wrong.
        $c = $m->checkAccount(51);
        $this->assertFalse($c['ok']);
        $this->assertTrue($c['oauth']['authorized'], 'a refresh token is stored, but it is dead');
        $this->assertFalse($c['oauth']['api']['ok']);
        $this->assertStringContainsString('Click to RE Authenticate', $c['oauth']['last_error']);
        $this->assertStringNotContainsString($ms['client_secret'], json_encode($c));
        $this->assertTrue($m->checkAccount(61)['ok']);

        // "Click to RE Authenticate": everything works again and the error is cleared.
        $this->assertSame($ms['mailbox'], $this->signIn($m, 51)['mailbox']);
        $this->assertSame('sent', $this->sendSd($m, 1, "$tk again")['status']);
        $c = $m->checkAccount(51);
        $this->assertTrue($c['ok'], json_encode($c));
        $this->assertNull($c['oauth']['last_error']);
        $this->assertCount(2, cloud_sent($ms['mailbox']));
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

    /** Alert messages the master account (FILE) wrote to SYSADMIN addresses. */
    private function alerts(string $to): array
    {
        $found = [];
        foreach (glob($this->dir . '/master-out/*.eml') ?: [] as $eml) {
            $raw = (string) file_get_contents($eml);
            if (stripos((string) self::header($raw, 'To'), $to) !== false) {
                $found[] = $raw;
            }
        }
        return $found;
    }

    public function testCheckMailReadsCloudMailboxesAndARevokedOneNeverStopsTheOthers(): void
    {
        $ms = cloud_tenant('microsoft', 'msin');
        $gm = cloud_tenant('google', 'gmin');
        $host = new TestHost();
        $host->accounts = [
            $this->row(71, $ms, $ms['mailbox'], 1, ['SYSADMIN' => 'it71@pcr.example.edu']),
            $this->row(81, $gm, $gm['mailbox'], 2, ['SYSADMIN' => 'it81@pcr.example.edu']),
        ];
        $m = $this->manager($host);
        $this->signIn($m, 71);
        $this->signIn($m, 81);
        $tk = token('in');
        $mail = fn (string $subject, string $id) => "From: Customer <customer@outside.example>\r\n"
            . "To: desk@tenant.example\r\nSubject: $subject\r\nMessage-ID: <$id@outside.example>\r\n"
            . "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\r\nBody of $subject\r\n";
        cloud_seed('microsoft', $ms['mailbox'], $mail("Printer down $tk", "ms1-$tk"));
        // Read in Outlook before the check: still new to PCR-360.
        cloud_seed('microsoft', $ms['mailbox'], $mail("VPN broken $tk", "ms2-$tk"), true);
        cloud_seed('google', $gm['mailbox'], $mail("Laptop request $tk", "gm1-$tk"));

        $summary = $m->eventCheckMail(['host' => 'pcr360.example.edu']);
        $a = self::entry($summary, 71);
        $b = self::entry($summary, 81);
        $this->assertNotNull($a, json_encode($summary));
        $this->assertNotNull($b, json_encode($summary));
        $this->assertSame(2, $a['fetched'], json_encode($a));
        $this->assertSame(2, $a['inquiries']);
        $this->assertSame(1, $b['fetched'], json_encode($b));
        $this->assertSame(1, $b['inquiries']);
        $subjects = array_map(fn ($i) => $i['subject'], $host->inquiries);
        sort($subjects);
        $this->assertSame(["Laptop request $tk", "Printer down $tk", "VPN broken $tk"], $subjects);
        foreach ($host->inquiries as $inq) {
            $this->assertSame('pcr360.example.edu', $inq['host']);
            $this->assertSame('customer@outside.example', $inq['from']['email']);
        }
        $this->assertSame([], $host->errors, json_encode($host->errors));

        // A second run finds nothing new.
        $again = $m->eventCheckMail('{"host":"pcr360.example.edu"}');
        $this->assertSame(0, self::entry($again, 71)['inquiries']);
        $this->assertSame(0, self::entry($again, 81)['inquiries']);
        $this->assertCount(3, $host->inquiries);

        // The Microsoft mailbox's sign-in is revoked; new mail arrives in both mailboxes.
        cloud_admin('POST', '/_admin/revoke', ['user' => $ms['mailbox']]);
        cloud_admin('POST', '/_admin/expire_access_tokens', ['user' => $ms['mailbox']]);
        cloud_seed('microsoft', $ms['mailbox'], $mail("Stuck in the revoked box $tk", "ms3-$tk"));
        cloud_seed('google', $gm['mailbox'], $mail("Monitor flicker $tk", "gm2-$tk"));

        for ($run = 1; $run <= 2; $run++) {
            $summary = $m->eventCheckMail(['host' => 'pcr360.example.edu']);
            $a = self::entry($summary, 71);
            $b = self::entry($summary, 81);
            $this->assertNotEmpty($a['errors'], json_encode($a));
            $this->assertStringContainsString('Click to RE Authenticate', json_encode($a['errors']));
            $this->assertSame(0, $a['inquiries']);
            if ($run === 1) {
                $this->assertSame(1, $b['inquiries'], 'the other mailbox still works: ' . json_encode($b));
            }
        }
        $subjects = array_map(fn ($i) => $i['subject'], $host->inquiries);
        $this->assertContains("Monitor flicker $tk", $subjects);
        $this->assertNotContains("Stuck in the revoked box $tk", $subjects);
        $this->assertCount(4, $host->inquiries);
        $this->assertNotEmpty($host->errors);
        $this->assertStringContainsString('Click to RE Authenticate', json_encode($host->errors));
        $this->assertStringNotContainsString($ms['client_secret'], json_encode([$summary, $host->errors]));
        // The message waits in the mailbox for the re-authentication.
        $box = cloud_admin('GET', '/_admin/mailbox?provider=microsoft&user=' . rawurlencode($ms['mailbox']));
        $this->assertStringContainsString("Stuck in the revoked box $tk", json_encode($box));

        // SYSADMIN was alerted once over two failing runs.
        $this->assertCount(1, $this->alerts('it71@pcr.example.edu'));
        $this->assertCount(0, $this->alerts('it81@pcr.example.edu'));

        // After "Click to RE Authenticate" the waiting message becomes an Inquiry.
        $this->signIn($m, 71);
        $summary = $m->eventCheckMail(['host' => 'pcr360.example.edu']);
        $this->assertSame(1, self::entry($summary, 71)['inquiries'], json_encode($summary));
        $this->assertSame([], self::entry($summary, 71)['errors']);
        $subjects = array_map(fn ($i) => $i['subject'], $host->inquiries);
        $this->assertContains("Stuck in the revoked box $tk", $subjects);
        $this->assertCount(5, $host->inquiries);
    }
}
