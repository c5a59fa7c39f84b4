<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * IMAP, POP3 and SMTP accounts that sign in with OAuth 2.0 (AUTH_TYPE = XOAUTH2, SPEC §3a), as
 * PCR-360 drives them: Microsoft 365 app-only access (client_credentials) to a shared mailbox,
 * against the real Dovecot and SMTP test servers, which check each token with the emulated
 * Microsoft identity platform.
 */
final class XOAuth2Test extends TestCase
{
    private const DATA = ['host' => 'pcr360.example.edu'];

    private string $dir;

    /** @var resource|null the Dovecot mailbox "shared" is shared state: one test class at a time */
    private static $lock = null;

    public static function setUpBeforeClass(): void
    {
        self::$lock = fopen(test_env('PCR_TESTENV') . '/xoauth2-tests.lock', 'c');
        flock(self::$lock, LOCK_EX);
    }

    public static function tearDownAfterClass(): void
    {
        flock(self::$lock, LOCK_UN);
        fclose(self::$lock);
    }

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-xoauth2-');
    }

    /** An Entra ID app registration with application permissions, granted $mailboxes. */
    private static function app(array $mailboxes, array $roles = ['IMAP.AccessAsApp', 'POP.AccessAsApp', 'SMTP.SendAsApp']): array
    {
        $name = 'xo' . bin2hex(random_bytes(5));
        return cloud_admin('POST', '/_admin/clients', ['provider' => 'microsoft', 'client_id' => "app-$name",
            'client_secret' => "secret-$name-Zq9", 'app_roles' => $roles, 'mailboxes' => $mailboxes]);
    }

    /** The OAuth settings of an app-only account, as the administrator fills them in. */
    private static function oauth(array $app): array
    {
        return ['GRANT' => 'client_credentials', 'APPLICATION_ID' => $app['client_id'],
            'SECRET_KEY' => $app['client_secret'], 'AUTHORITY_URL' => test_env('PCR_CLOUD_URL') . '/common'];
    }

    /** A tenant Service Desk row: SMTP (STARTTLS) out, $incoming in, both with XOAUTH2. */
    private function row(int $recid, array $app, string $mailbox, string $incoming = 'IMAPS', array $extra = []): array
    {
        return $extra + $this->baseRow($recid, $mailbox, $incoming) + ['OAUTH' => $app ? self::oauth($app) : []];
    }

    private function baseRow(int $recid, string $mailbox, string $incoming): array
    {
        [$type, $ssl, $port] = [
            'IMAP' => ['IMAP', 'TLS', 'PCR_OAUTH_IMAP_PORT'],
            'IMAPS' => ['IMAP', 'SSL', 'PCR_OAUTH_IMAPS_PORT'],
            'POP3' => ['POP3', 'TLS', 'PCR_OAUTH_POP3_PORT'],
            'POP3S' => ['POP3', 'SSL', 'PCR_OAUTH_POP3S_PORT'],
        ][$incoming];
        return [
            'RECID' => $recid, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => $mailbox, 'DISPLAY_NAME' => 'Service Desk', 'LOGIN' => $mailbox, 'AUTH_TYPE' => 'XOAUTH2',
            'OUTGOING_TRANSPORT_TYPE' => 'SMTP', 'OUTGOING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'OUTGOING_PORT' => (int) test_env('PCR_SMTP_XOAUTH2_STARTTLS_PORT'), 'OUTGOING_SSL' => 'TLS',
            'INCOMING_MAILBOX_TYPE' => $type, 'INCOMING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'INCOMING_PORT' => (int) test_env($port), 'INCOMING_SSL' => $ssl,
            'CA_FILE' => test_env('PCR_TEST_CA'), 'TIMEOUT' => 10,
        ];
    }

    /** The INI: a FILE-transport master that alerts SYSADMIN into out/. */
    private function ini(array $email = []): string
    {
        return write_ini($this->dir, $email + [
            'EMAIL' => 'desk@test.local', 'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/out',
            'SYSADMIN' => 'admin@test.local', 'STATE_DIR' => $this->dir . '/state',
        ]);
    }

    private static function message(string $subject): string
    {
        return "From: Customer <customer@example.org>\r\nTo: shared@test.local\r\nSubject: $subject\r\n"
            . 'Message-ID: <' . token('xo') . "@example.org>\r\nDate: Tue, 05 Mar 2024 14:22:01 -0500\r\n\r\nHello.\r\n";
    }

    private static function box(array $summary, $recid): array
    {
        foreach ($summary['mailboxes'] as $box) {
            if ($box['account'] === $recid) {
                return $box;
            }
        }
        throw new RuntimeException("no mailbox $recid: " . json_encode($summary));
    }

    public function testAnImapAndSmtpServiceDeskAccountWorksWithAppOnlyTokens(): void
    {
        mailbox_reset('shared');
        $app = self::app(['shared@test.local']);
        $t = token('imap');
        dovecot_deliver('shared', self::message("first $t"));
        dovecot_deliver('shared', self::message("second $t"));
        $ini = $this->ini();
        $host = new TestHost();
        $host->accounts = [$this->row(61, $app, 'shared@test.local')];

        // Sending as the shared mailbox over SMTP XOAUTH2, no password anywhere.
        $r = (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(['to' => 'someone@example.org',
            'subject' => "notice $t", 'text' => 'Your request was received.', 'kind' => 'service_desk', 'tenant' => 1]);
        $this->assertSame('sent', $r['status'], json_encode($r));
        $this->assertSame(61, $r['account']);
        $got = smtp_received((int) test_env('PCR_SMTP_XOAUTH2_STARTTLS_PORT'), "notice $t");
        $this->assertCount(1, $got);
        $this->assertSame('shared@test.local', $got[0]['meta']['auth_user']);
        $this->assertSame('XOAUTH2', $got[0]['meta']['auth_mechanism']);

        // Reading it over IMAP with the same (cached) token.
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(2, self::box($summary, 61)['inquiries'], json_encode($summary));
        $this->assertSame(['first', 'second'], array_map(fn($m) => strtok($m['subject'], ' '), array_values($host->inquiries)));
        $this->assertSame(1, cloud_stats($app['client_id'])['grants']['client_credentials'] ?? null,
            'one token for both: ' . json_encode(cloud_stats($app['client_id'])));

        // The token dies early (Entra ID revokes it): one fresh token, one retry, nothing lost.
        cloud_admin('POST', '/_admin/expire_access_tokens', ['client_id' => $app['client_id']]);
        dovecot_deliver('shared', self::message("third $t"));
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($summary, 61)['inquiries'], json_encode($summary));
        $this->assertSame([], self::box($summary, 61)['errors']);
        $r = (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(['to' => 'someone@example.org',
            'subject' => "again $t", 'text' => 'x', 'kind' => 'service_desk', 'tenant' => 1]);
        $this->assertSame('sent', $r['status']);
        $this->assertSame(2, cloud_stats($app['client_id'])['grants']['client_credentials'] ?? null);
        $errors = array_filter($host->errors, fn($e) => !str_contains($e['message'], 'stored in clear'));
        $this->assertSame([], array_values($errors), 'a renewed token is no error');
    }

    public function testCheckAccountReportsTheSignInWithoutSendingOrChangingAnything(): void
    {
        mailbox_reset('shared');
        $app = self::app(['shared@test.local']);
        $t = token('check');
        dovecot_deliver('shared', self::message("untouched $t"));
        $host = new TestHost();
        $host->accounts = [$this->row(65, $app, 'shared@test.local')];
        $before = glob(test_env('PCR_SMTP_DROP_DIR') . '/' . test_env('PCR_SMTP_XOAUTH2_STARTTLS_PORT') . '/*.eml') ?: [];
        $report = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))->checkAccount(65);
        $this->assertTrue($report['ok'], json_encode($report));
        $this->assertSame(1, $report['incoming']['messages']);
        $this->assertSame('client_credentials', $report['oauth']['grant']);
        $this->assertTrue($report['oauth']['token_obtained']);
        $this->assertSame('XOAUTH2', $report['oauth']['mechanism']);
        $this->assertSame('shared@test.local', $report['oauth']['mailbox']);
        $this->assertStringNotContainsString($app['client_secret'], json_encode($report));
        $after = glob(test_env('PCR_SMTP_DROP_DIR') . '/' . test_env('PCR_SMTP_XOAUTH2_STARTTLS_PORT') . '/*.eml') ?: [];
        $this->assertSame($before, $after, 'nothing sent');
        $this->assertSame([[]], array_column(mailbox_messages('shared'), 'flags'), 'nothing changed in the mailbox');
    }

    public function testARevokedClientSecretIsAnAuthErrorForThatAccountOnly(): void
    {
        mailbox_reset('shared');
        $app = self::app(['shared@test.local']);
        $t = token('revoked');
        dovecot_deliver('shared', self::message("waits $t"));
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message("other tenant $t"));
        $host = new TestHost();
        $host->accounts = [
            $this->row(62, $app, 'shared@test.local'),
            ['RECID' => 63, 'TENANTS_RECID' => 2, 'ACCOUNT_TYPE' => 'service_desk', 'EMAIL' => 'desk2@test.local',
                'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/out2',
                'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $maildir],
        ];
        $ini = $this->ini();
        cloud_admin('POST', '/_admin/revoke_secret', ['client_id' => $app['client_id']]);

        try {
            (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(['to' => 'someone@example.org',
                'subject' => 's', 'text' => 't', 'kind' => 'service_desk', 'tenant' => 1]);
            $this->fail('sent with a revoked secret');
        } catch (PCR_Utility_EmailAuthException $e) {
            $this->assertSame('62', (string) $e->account);
            $this->assertStringContainsString('Secret', $e->getMessage(), 'says what to fix');
            $this->assertStringNotContainsString($app['client_secret'], $e->getMessage());
        }
        $alerts = fn() => glob($this->dir . '/out/*.eml') ?: [];
        foreach ([1, 2] as $run) {
            $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
            $this->assertSame('errors', $summary['status']);
            $this->assertStringContainsString('Secret', self::box($summary, 62)['errors'][0] ?? '', json_encode($summary));
            $this->assertSame(0, self::box($summary, 62)['fetched']);
            $this->assertSame($run === 1 ? 1 : 0, self::box($summary, 63)['inquiries'], 'the other tenant goes on');
        }
        $this->assertCount(1, $alerts(), 'SYSADMIN alerted once');
        $this->assertCount(1, mailbox_messages('shared'), 'the mail waits in its mailbox');
        $everything = json_encode([$summary, $host->errors, $host->inquiries]);
        $this->assertStringNotContainsString($app['client_secret'], $everything);
    }

    /** Delegated sign-in ("Click to Authenticate") for an IMAP+SMTP account of the mailbox's own user. */
    public function testAnImapAccountSignedInOnTheOAuth2Tab(): void
    {
        mailbox_reset('oauth1');
        $t = token('delegated');
        dovecot_deliver('oauth1', self::message("delegated $t"));
        $name = 'xd' . bin2hex(random_bytes(5));
        $app = cloud_admin('POST', '/_admin/clients', ['provider' => 'microsoft', 'client_id' => "app-$name",
            'client_secret' => "secret-$name-Zq9", 'redirect_uris' => [OAUTH_REDIRECT_URI]]);
        $row = $this->row(66, $app, 'oauth1@test.local');
        $row['OAUTH'] = ['APPLICATION_ID' => $app['client_id'], 'SECRET_KEY' => $app['client_secret'],
            'AUTHORITY_URL' => test_env('PCR_CLOUD_URL') . '/common'];
        $host = new TestHost();
        $host->accounts = [$row];
        $ini = $this->ini();
        $url = (new PCR_Utility_EmailManager($ini, 'prod', $host))->authorizationUrl(66, OAUTH_REDIRECT_URI);
        $this->assertStringContainsString(rawurlencode('https://outlook.office.com/IMAP.AccessAsUser.All'), $url);
        $this->assertStringContainsString('offline_access', $url);
        $back = browser_sign_in($url, 'oauth1@test.local');
        $done = (new PCR_Utility_EmailManager($ini, 'prod', $host))->completeAuthorization($back['state'], $back['code']);
        $this->assertSame('oauth1@test.local', $done['mailbox']);
        $summary = (new PCR_Utility_EmailManager($ini, 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($summary, 66)['inquiries'], json_encode($summary));
        $r = (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(['to' => 'x@example.org',
            'subject' => "reply $t", 'text' => 't', 'kind' => 'service_desk', 'tenant' => 1]);
        $this->assertSame('sent', $r['status']);
    }

    /** Google Workspace: a service account with domain-wide delegation, impersonating the mailbox. */
    public function testAGoogleServiceAccountReadsAndSendsOverImapAndSmtp(): void
    {
        mailbox_reset('oauth2');
        $t = token('google');
        dovecot_deliver('oauth2', self::message("google $t"));
        $key = openssl_pkey_new(['private_key_bits' => 2048, 'private_key_type' => OPENSSL_KEYTYPE_RSA]);
        openssl_pkey_export($key, $pem);
        $email = 'svc-' . bin2hex(random_bytes(4)) . '@project.iam.gserviceaccount.com';
        cloud_admin('POST', '/_admin/service_accounts', ['client_email' => $email,
            'public_key_pem' => openssl_pkey_get_details($key)['key'], 'delegated' => ['oauth2@test.local']]);
        $json = json_encode(['type' => 'service_account', 'client_email' => $email, 'private_key' => $pem,
            'private_key_id' => 'k1', 'token_uri' => test_env('PCR_CLOUD_URL') . '/token']);
        $row = $this->row(67, [], 'oauth2@test.local');
        $row['OAUTH'] = ['GRANT' => 'service_account', 'SERVICE_ACCOUNT_JSON' => $json, 'IMPERSONATE' => 'oauth2@test.local'];
        $host = new TestHost();
        $host->accounts = [$row];
        $summary = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(1, self::box($summary, 67)['inquiries'], json_encode($summary));
        $r = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))->send(['to' => 'x@example.org',
            'subject' => "google reply $t", 'text' => 't', 'kind' => 'service_desk', 'tenant' => 1]);
        $this->assertSame('sent', $r['status']);
        $got = smtp_received((int) test_env('PCR_SMTP_XOAUTH2_STARTTLS_PORT'), "google reply $t");
        $this->assertSame('oauth2@test.local', $got[0]['meta']['auth_user'] ?? null);
        $this->assertStringNotContainsString('PRIVATE KEY', json_encode([$summary, $host->errors]));
    }

    public function testAPop3AccountWithXoauth2(): void
    {
        mailbox_reset('shared');
        $app = self::app(['shared@test.local'], ['POP.AccessAsApp', 'SMTP.SendAsApp']);
        $t = token('pop');
        dovecot_deliver('shared', self::message("pop one $t"));
        dovecot_deliver('shared', self::message("pop two $t"));
        $host = new TestHost();
        $host->accounts = [$this->row(64, $app, 'shared@test.local', 'POP3S', ['PROCESSED_ACTION' => 'delete'])];
        $summary = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))->eventCheckMail(self::DATA);
        $this->assertSame(2, self::box($summary, 64)['inquiries'], json_encode($summary));
        $this->assertSame('POP3', self::box($summary, 64)['protocol']);
        $this->assertSame([], mailbox_messages('shared'), 'deleted after the Inquiries were created');
    }

    /** The INI master signs in app-only too: email.AUTH_TYPE and email.OAUTH.* */
    public function testTheIniMasterSendsWithXoauth2OverImplicitTls(): void
    {
        $app = self::app(['shared@test.local']);
        $t = token('master');
        $oauth = [];
        foreach (self::oauth($app) as $k => $v) {
            $oauth["OAUTH.$k"] = $v;
        }
        $ini = write_ini($this->dir, $oauth + [
            'EMAIL' => 'shared@test.local', 'LOGIN' => 'shared@test.local', 'AUTH_TYPE' => 'XOAUTH2',
            'OUTGOING_TRANSPORT_TYPE' => 'SMTP', 'OUTGOING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'OUTGOING_PORT' => (int) test_env('PCR_SMTP_XOAUTH2_TLS_PORT'), 'OUTGOING_SSL' => 'SSL',
            'CA_FILE' => test_env('PCR_TEST_CA'), 'STATE_DIR' => $this->dir . '/state',
        ]);
        $r = (new PCR_Utility_EmailManager($ini, 'prod'))->send(['to' => 'x@example.org', 'subject' => "m $t", 'text' => 't']);
        $this->assertSame('sent', $r['status']);
        $this->assertSame('master', $r['account']);
        $got = smtp_received((int) test_env('PCR_SMTP_XOAUTH2_TLS_PORT'), "m $t");
        $this->assertSame('XOAUTH2', $got[0]['meta']['auth_mechanism'] ?? null);

        // The delegated grant needs a person: not in the INI.
        $bad = write_ini($this->dir . '/bad', ['OAUTH.GRANT' => 'authorization_code', 'OAUTH.APPLICATION_ID' => 'x']
            + ['EMAIL' => 'a@test.local', 'AUTH_TYPE' => 'XOAUTH2', 'OUTGOING_TRANSPORT_TYPE' => 'SMTP',
                'OUTGOING_HOST' => 'localhost', 'STATE_DIR' => $this->dir . '/state2']);
        try {
            (new PCR_Utility_EmailManager($bad, 'prod'))->send(['to' => 'x@example.org', 'subject' => 's', 'text' => 't']);
            $this->fail('authorization_code accepted in the INI');
        } catch (PCR_Utility_EmailConfigException $e) {
            $this->assertStringContainsString('OAUTH.GRANT', $e->getMessage());
        }
    }
}
