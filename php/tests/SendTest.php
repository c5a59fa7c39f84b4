<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** send() and sendBatch() as PCR-360 code calls them, against real transports. */
final class SendTest extends TestCase
{
    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir();
    }

    public function testNoArgumentConstructorReadsTheIniSettingAndWritesFiles(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'pcr@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE'],
            [], ['email.DISPLAY_NAME' => 'PCR Test']);
        $t = token();
        [$code, $out, $err] = run_php(
            '$r = (new PCR_Utility_EmailManager())->send(["to" => "a@example.edu", "subject" => "' . $t . '", "text" => "hi"]);'
            . 'echo json_encode($r);',
            ['pcr_email.config' => $ini, 'pcr_email.environment' => 'test']
        );
        $this->assertSame(0, $code, $err);
        $r = json_decode($out, true);
        $this->assertSame('written', $r['status']);
        $this->assertSame('master', $r['account']);
        $this->assertSame('FILE', $r['transport']);
        $this->assertSame('PCR Test <pcr@example.edu>', $r['from']);
        // FILE_PATH defaults to email/ beside the INI file's directory.
        $this->assertStringStartsWith($this->dir . '/email/', $r['path']);
        $raw = file_get_contents($r['path']);
        $this->assertStringContainsString("Subject: $t", $raw);
        $this->assertStringContainsString('Message-ID: ' . $r['message_id'], $raw);
    }

    public function testFileTransportWritesEveryPartAndNeverOverwrites(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'pcr@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out']);
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        $png = base64_decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==');
        $paths = [];
        for ($i = 0; $i < 5; $i++) {
            $r = $m->send([
                'to' => ['Zoë Müller <zoe@example.edu>', ['email' => 'b@example.edu', 'name' => 'Bob']],
                'cc' => 'c@example.edu',
                'subject' => 'Grüße – ünïcödé',
                'text' => 'plain',
                'html' => '<p>html <img src="cid:logo"></p>',
                'attachments' => [
                    ['content' => "\x00\x01binary\xff", 'filename' => 'data.bin', 'content_type' => 'application/octet-stream'],
                    ['content' => $png, 'filename' => 'logo.png', 'content_type' => 'image/png', 'inline' => true, 'content_id' => 'logo'],
                ],
                'headers' => ['X-PCR-Test' => 'yes'],
            ]);
            $this->assertSame('written', $r['status']);
            $paths[] = $r['path'];
        }
        $this->assertCount(5, array_unique($paths));
        $this->assertCount(5, glob($this->dir . '/out/*.eml'));
        $raw = file_get_contents($paths[0]);
        $this->assertMatchesRegularExpression('/^Subject: =\?utf-8\?/mi', $raw);
        $this->assertStringContainsString('multipart/related', $raw);
        $this->assertStringContainsString('multipart/alternative', $raw);
        $this->assertStringContainsString('Content-ID: <logo>', $raw);
        $this->assertStringContainsString('X-PCR-Test: yes', $raw);
        $this->assertStringContainsString(base64_encode("\x00\x01binary\xff"), str_replace("\r\n", '', $raw));
    }

    /** A manager writing .eml files into $this->dir/out. */
    private function fileManager(): PCR_Utility_EmailManager
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'pcr@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out']);
        return new PCR_Utility_EmailManager($ini, 'prod');
    }

    /** The header block and the body of a single-part .eml. */
    private static function splitEml(string $raw): array
    {
        $at = strpos($raw, "\r\n\r\n");
        return [substr($raw, 0, $at), substr($raw, $at + 4)];
    }

    public function testNulBytesInTheBodyAreEncodedAndDecodeBack(): void
    {
        $m = $this->fileManager();
        foreach (['text' => "line one\0with NUL\nline two\r\0", 'html' => "<p>a\0b</p>\r\n<p>c</p>"] as $key => $body) {
            $r = $m->send(['to' => 'a@example.edu', 'subject' => 'nul', $key => $body]);
            $raw = file_get_contents($r['path']);
            $this->assertStringNotContainsString("\0", $raw, "$key: no raw NUL in the file");
            [$headers, $encoded] = self::splitEml($raw);
            $this->assertMatchesRegularExpression('/^Content-Transfer-Encoding: quoted-printable\r?$/mi', $headers, $key);
            $this->assertStringContainsString('=00', $encoded);
            $crlf = preg_replace('/\r\n|\r|\n/', "\r\n", $body);
            // The message's closing CRLF follows the part.
            $this->assertSame($crlf . "\r\n", quoted_printable_decode($encoded), $key);
        }
    }

    public function testNonUtf8StringsAreRefusedNamingTheKey(): void
    {
        $m = $this->fileManager();
        $latin1 = "Gr\xfc\xdfe";    // "Grüße" in ISO-8859-1
        $base = ['to' => 'a@example.edu', 'subject' => 's', 'text' => 't'];
        $bad = [
            'subject' => ['subject' => $latin1],
            'text' => ['text' => $latin1],
            'html' => ['html' => "<p>$latin1</p>"],
            'to' => ['to' => "$latin1 <a@example.edu>"],
            'cc[0].name' => ['cc' => [['email' => 'c@example.edu', 'name' => $latin1]]],
            'headers[X-Note]' => ['headers' => ['X-Note' => $latin1]],
            'attachments[0].filename' => ['attachments' => [['content' => 'x', 'filename' => "$latin1.txt"]]],
        ];
        foreach ($bad as $key => $override) {
            try {
                $m->send(array_merge($base, $override));
                $this->fail("$key: no exception");
            } catch (PCR_Utility_EmailException $e) {
                $this->assertSame('PCR_Utility_EmailException', get_class($e), $key);
                $this->assertStringStartsWith("$key: not valid UTF-8", $e->getMessage());
            }
        }
        $this->assertSame([], glob($this->dir . '/out/*.eml') ?: [], 'nothing was written');
        // sendBatch() reports it for the one message.
        $results = $m->sendBatch([$base + ['html' => 'ok'], array_merge($base, ['subject' => $latin1])]);
        $this->assertSame('written', $results[0]['status']);
        $this->assertSame('failed', $results[1]['status']);
        $this->assertStringStartsWith('subject: not valid UTF-8', $results[1]['error']);
    }

    public function testAttachmentContentKeepsAnyBytes(): void
    {
        $m = $this->fileManager();
        $bytes = "caf\xe9\0\xff\xfe\r\n\x00end";   // Latin-1, NUL, invalid UTF-8, CRLF
        $r = $m->send(['to' => 'a@example.edu', 'text' => 'see attached', 'attachments' => [
            ['content' => $bytes, 'filename' => 'latin1.txt', 'content_type' => 'text/plain; charset=iso-8859-1'],
            ['content' => "utf-8 with NUL \0 ✓", 'filename' => 'nul.txt'],
        ]]);
        $raw = str_replace("\r\n", '', file_get_contents($r['path']));
        $this->assertStringContainsString(base64_encode($bytes), $raw);
        $this->assertStringContainsString(base64_encode("utf-8 with NUL \0 ✓"), $raw);
    }

    public function testAttachmentPathsThatAreNotRegularFilesAreRefused(): void
    {
        $m = $this->fileManager();
        $fifo = $this->dir . '/pipe';
        $this->assertTrue(posix_mkfifo($fifo, 0600));
        $link = $this->dir . '/link-to-pipe';
        symlink($fifo, $link);
        $cases = [
            '/dev/zero' => 'not a regular file (a character device)',
            $fifo => 'not a regular file (a FIFO)',            // would block an open() without a writer
            $link => 'not a regular file (a FIFO)',
            $this->dir => 'not a regular file (a directory)',
            '/proc/self/pagemap' => 'over the 100 MiB attachment limit',   // reports 0 bytes, holds gigabytes
        ];
        foreach ($cases as $path => $why) {
            try {
                $m->send(['to' => 'a@example.edu', 'text' => 'x', 'attachments' => [['path' => $path]]]);
                $this->fail("$path: no exception");
            } catch (PCR_Utility_EmailException $e) {
                $this->assertSame('PCR_Utility_EmailException', get_class($e), $path);
                $this->assertStringStartsWith("attachments[0].path: cannot read $path: ", $e->getMessage());
                $this->assertStringContainsString($why, $e->getMessage());
            }
        }
        $this->assertSame([], glob($this->dir . '/out/*.eml') ?: [], 'nothing was written');
    }

    public function testSmtpWithStarttlsAndAuth(): void
    {
        $ini = write_ini($this->dir, smtp_master());
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $t = token('smtp');
        $r = $m->send(['to' => 'Dest <dest@test.local>', 'bcc' => 'hidden@test.local', 'subject' => $t, 'text' => 'body']);
        $this->assertSame('sent', $r['status']);
        $this->assertSame('SMTP', $r['transport']);
        $got = smtp_received((int) test_env('PCR_SMTP_STARTTLS_PORT'), $t);
        $this->assertCount(1, $got);
        $this->assertTrue($got[0]['meta']['tls']);
        $this->assertSame(test_env('PCR_SMTP_USER'), $got[0]['meta']['auth_user']);
        $this->assertSame('desk@test.local', $got[0]['meta']['mail_from']);
        $this->assertSame(['dest@test.local', 'hidden@test.local'], $got[0]['meta']['rcpt_tos']);
        $this->assertStringNotContainsString('hidden@test.local', $got[0]['raw'], 'Bcc stays out of the headers');
        // The "PASSWORD is stored in clear" notice (once per process, so only when this test
        // runs first) is about the configuration, not the send: anything else is an error.
        $errors = array_filter($host->errors, fn($e) => !str_contains($e['message'], 'stored in clear'));
        $this->assertSame([], array_values($errors));
    }

    public function testWrongPasswordIsATransportExceptionWithoutTheSecret(): void
    {
        $log = $this->dir . '/logs/email.log';
        $ini = write_ini($this->dir, smtp_master(['PASSWORD' => 'Wr0ng-S3cret-pw', 'LOG_FILE' => $log]));
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        try {
            $m->send(['to' => 'dest@test.local', 'subject' => 'x', 'text' => 'y']);
            $this->fail('no exception');
        } catch (PCR_Utility_EmailTransportException $e) {
            $this->assertSame('master', $e->account);
            $this->assertSame(535, $e->smtpCode);
            $this->assertFalse($e->transient);
            $this->assertStringContainsString((string) test_env('PCR_SMTP_STARTTLS_PORT'), $e->server);
            $this->assertStringNotContainsString('Wr0ng-S3cret-pw', $e->getMessage());
            $this->assertStringNotContainsString('Wr0ng-S3cret-pw', (string) $e);
        }
        $this->assertCount(1, $host->errors, 'logged once to the host');
        $this->assertStringNotContainsString('Wr0ng-S3cret-pw', json_encode($host->errors));
        $lines = file($log);
        $this->assertCount(1, $lines);
        $this->assertStringContainsString('535', $lines[0]);
        $this->assertStringNotContainsString('Wr0ng-S3cret-pw', $lines[0]);
    }

    public function testMalformedMessagesAreRefusedBeforeSending(): void
    {
        $ini = write_ini($this->dir, smtp_master());
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        $t = token('bad');
        $bad = [
            'no recipient' => ['subject' => $t, 'text' => 'x'],
            'header injection' => ['to' => 'a@test.local', 'subject' => "$t\r\nBcc: victim@test.local", 'text' => 'x'],
            'bad address' => ['to' => 'not an address', 'subject' => $t, 'text' => 'x'],
            'unreadable attachment' => ['to' => 'a@test.local', 'subject' => $t, 'text' => 'x',
                'attachments' => [['path' => $this->dir . '/missing.pdf']]],
            'extra header injection' => ['to' => 'a@test.local', 'subject' => $t, 'text' => 'x',
                'headers' => ['X-Evil' => "a\nBcc: victim@test.local"]],
        ];
        foreach ($bad as $what => $message) {
            try {
                $m->send($message);
                $this->fail("$what: no exception");
            } catch (PCR_Utility_EmailException $e) {
                $this->assertSame('PCR_Utility_EmailException', get_class($e), $what);
            }
        }
        $this->assertSame([], smtp_received((int) test_env('PCR_SMTP_STARTTLS_PORT'), $t, 1, 0.5));
    }

    public function testSendBatchReturnsOneResultPerMessageAndNeverThrows(): void
    {
        $ini = write_ini($this->dir, smtp_master());
        $m = new PCR_Utility_EmailManager($ini, 'prod', new TestHost());
        $t = token('batch');
        $messages = [];
        for ($i = 0; $i < 12; $i++) {
            $messages[] = ['to' => "r$i@test.local", 'subject' => "$t #$i", 'text' => "message $i"];
        }
        $messages[3] = ['to' => 'reject-me@test.local', 'subject' => "$t #3", 'text' => 'x'];
        $messages[7] = ['to' => 'tempfail-me@test.local', 'subject' => "$t #7", 'text' => 'x'];
        $messages[9] = ['to' => 'broken address', 'subject' => "$t #9", 'text' => 'x'];
        $results = $m->sendBatch($messages);
        $this->assertCount(12, $results);
        foreach ($results as $i => $r) {
            if ($i === 3) {
                $this->assertSame('failed', $r['status']);
                $this->assertSame('master', $r['account']);
                $this->assertSame(550, $r['smtp_code']);
                $this->assertFalse($r['transient']);
            } elseif ($i === 7) {
                $this->assertSame('failed', $r['status']);
                $this->assertSame(451, $r['smtp_code']);
                $this->assertTrue($r['transient']);
            } elseif ($i === 9) {
                $this->assertSame('failed', $r['status']);
                $this->assertSame('PCR_Utility_EmailException', $r['exception']);
            } else {
                $this->assertSame('sent', $r['status'], json_encode($r));
            }
        }
        $this->assertCount(9, smtp_received((int) test_env('PCR_SMTP_STARTTLS_PORT'), $t, 9));
    }

    /** A failed entry names a tenant account as a sent one does: its RECID as an int. */
    public function testSendBatchNamesTenantAccountsAlike(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'pcr@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/master-out']);
        $host = new TestHost();
        $host->accounts = [smtp_master(['RECID' => 41, 'TENANTS_RECID' => 4, 'ACCOUNT_TYPE' => 'default',
            'EMAIL' => 'desk4@test.local'])];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $t = token('batch4');
        $results = $m->sendBatch([
            ['to' => 'r1@test.local', 'subject' => "$t sent", 'text' => 'x', 'tenant' => 4],
            ['to' => 'reject-me@test.local', 'subject' => "$t refused", 'text' => 'x', 'tenant' => 4],
        ]);
        $this->assertSame('sent', $results[0]['status'], json_encode($results));
        $this->assertSame(41, $results[0]['account']);
        $this->assertSame('failed', $results[1]['status'], json_encode($results));
        $this->assertSame(41, $results[1]['account']);
    }

    public function testSendmailBinary(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'desk@test.local', 'OUTGOING_TRANSPORT_TYPE' => 'SENDMAIL',
            'SENDMAIL_PATH' => test_env('PCR_SENDMAIL')]);
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        $t = token('sendmail');
        $r = $m->send(['to' => 'dest@test.local', 'subject' => $t, 'text' => 'via msmtp']);
        $this->assertSame('sent', $r['status']);
        $this->assertSame('SENDMAIL', $r['transport']);
        $got = smtp_received((int) test_env('PCR_SMTP_STARTTLS_PORT'), $t);
        $this->assertCount(1, $got);
        $this->assertSame(['dest@test.local'], $got[0]['meta']['rcpt_tos']);
    }

    public function testSendEmailFalseRedirectsToInAppMessages(): void
    {
        $ini = write_ini($this->dir, smtp_master(), ['SEND_EMAIL' => false]);
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $t = token('redir');
        $r = $m->send(['to' => 'dest@test.local', 'subject' => $t, 'text' => 'in app',
            'attachments' => [['content' => 'abc', 'filename' => 'a.txt']]]);
        $this->assertSame('redirected', $r['status']);
        $this->assertCount(1, $host->delivered);
        $msg = $host->delivered[0];
        $this->assertSame($t, $msg['subject']);
        $this->assertSame('dest@test.local', $msg['to'][0]['email']);
        $this->assertSame('a.txt', $msg['attachments'][0]['filename']);
        $this->assertSame('abc', base64_decode($msg['attachments'][0]['content_base64']));
        $this->assertSame([], smtp_received((int) test_env('PCR_SMTP_STARTTLS_PORT'), $t, 1, 0.5));
    }

    public function testDisableEmailSendsNothing(): void
    {
        $ini = write_ini($this->dir, smtp_master(), ['DISABLE_EMAIL' => true, 'SEND_EMAIL' => false]);
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $r = $m->send(['to' => 'dest@test.local', 'subject' => 'x', 'text' => 'y']);
        $this->assertSame('disabled', $r['status']);
        $this->assertSame([], $host->delivered);
    }

    public function testRoutingThroughTenantAccounts(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'master@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/master']);
        $host = new TestHost();
        $host->accounts = [
            ['RECID' => 11, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'default@t1.edu',
             'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t1-default', 'PASSWORD' => 'pw-not-shown'],
            ['RECID' => 12, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk', 'EMAIL' => 'sd@t1.edu',
             'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t1-sd'],
            ['RECID' => 21, 'TENANTS_RECID' => 2, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'default@t2.edu',
             'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t2-default'],
        ];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $send = fn (string $kind, int $tenant, array $extra = []) =>
            $m->send(['to' => 'x@example.edu', 'subject' => 's', 'text' => 't', 'kind' => $kind, 'tenant' => $tenant] + $extra);

        $this->assertSame(11, $send('general', 1)['account']);
        $this->assertSame(12, $send('service_desk', 1)['account']);
        $r = $send('sd_thread', 1, ['sd_number' => 'SO201700043']);
        $this->assertSame(12, $r['account']);
        $raw = file_get_contents($r['path']);
        $this->assertMatchesRegularExpression('/^Subject: \[SO201700043\] s/m', $raw);
        $this->assertStringContainsString('SO201700043', $r['message_id']);
        $this->assertSame(21, $send('service_desk', 2)['account']);
        $skipped = $send('sd_thread', 2, ['sd_number' => 'SO201700044']);
        $this->assertSame('skipped', $skipped['status']);
        $this->assertNotEmpty($host->errors, 'a skipped message is logged');
        $this->assertSame('master', $send('general', 3)['account']);

        $view = $m->resolveAccount('service_desk', 1);
        $this->assertSame(12, $view['RECID']);
        $this->assertSame('sd@t1.edu', $view['EMAIL']);
        $this->assertNull($m->resolveAccount('sd_thread', 2));
        $this->assertSame('master', $m->resolveAccount()['RECID']);
        $this->assertStringNotContainsString('pw-not-shown', json_encode($m->resolveAccount('general', 1)));
        $this->assertArrayNotHasKey('PASSWORD', $m->resolveAccount('general', 1));
    }

    public function testCheckAccountConnectsWithoutSending(): void
    {
        $ini = write_ini($this->dir, smtp_master());
        $host = new TestHost();
        $host->accounts = [
            ['RECID' => 5, 'TENANTS_RECID' => 0, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'x@test.local',
             'OUTGOING_TRANSPORT_TYPE' => 'SMTP', 'OUTGOING_HOST' => test_env('PCR_TEST_TLS_HOST'),
             'OUTGOING_PORT' => (int) test_env('PCR_SMTP_STARTTLS_PORT'), 'OUTGOING_SSL' => 'TLS',
             'LOGIN' => test_env('PCR_SMTP_USER'), 'PASSWORD' => 'Wr0ng-S3cret-pw', 'CA_FILE' => test_env('PCR_TEST_CA')],
        ];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $ok = $m->checkAccount('master');
        $this->assertTrue($ok['ok'], json_encode($ok));
        $this->assertTrue($ok['outgoing']['ok']);
        $bad = $m->checkAccount(5);
        $this->assertFalse($bad['ok']);
        $this->assertSame(535, $bad['outgoing']['code']);
        $this->assertStringNotContainsString('Wr0ng-S3cret-pw', json_encode($bad));
        $this->expectException(PCR_Utility_EmailException::class);
        $m->checkAccount(999);
    }

    public function testEncryptedPasswordsWork(): void
    {
        $ini = write_ini($this->dir, smtp_master(['PASSWORD' => 'placeholder']));
        $enc = PCR_Utility_EmailManager::encryptPassword(test_env('PCR_SMTP_PASS'), $ini, 'prod');
        $this->assertMatchesRegularExpression('/^ENC:v1:[0-9a-f]{8}:[A-Za-z0-9+\/=]+$/', $enc);
        $key = dirname($ini) . '/pcr360-email.key';
        $this->assertFileExists($key);
        $this->assertSame(0640, fileperms($key) & 0777);
        file_put_contents($ini, str_replace('"placeholder"', '"' . $enc . '"', file_get_contents($ini)));
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        $t = token('enc');
        $this->assertSame('sent', $m->send(['to' => 'dest@test.local', 'subject' => $t, 'text' => 'x'])['status']);
        // A tampered value is a configuration error naming where it is: the master account's
        // own (the manager is built; each use of the master account throws it).
        file_put_contents($ini, str_replace($enc, substr($enc, 0, -6) . 'AAAAA=', file_get_contents($ini)));
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        try {
            $m->send(['to' => 'dest@test.local', 'subject' => $t, 'text' => 'x']);
            $this->fail('no exception');
        } catch (PCR_Utility_EmailConfigException $e) {
            $this->assertStringContainsString('PASSWORD', $e->getMessage());
        }
    }

    public function testThePasswordParameterIsRedactedInStackTraces(): void
    {
        try {
            PCR_Utility_EmailManager::encryptPassword('Sup3r-S3cret-value', $this->dir . '/missing/pcr360.ini', 'prod');
            $this->fail('no exception');
        } catch (PCR_Utility_EmailException $e) {
            $this->assertStringNotContainsString('Sup3r-S3cret-value', $e->getTraceAsString());
            $this->assertStringNotContainsString('Sup3r-S3cret-value', $e->getMessage());
        }
    }
}
