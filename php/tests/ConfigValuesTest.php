<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * The values PCR-360 itself writes (issue 11, items 2 and 3): SSL as a boolean, a port of 0
 * where the transport uses none, tenant rows as Zend_Db returns them (every value a string),
 * constants.SEND_EMAIL / DISABLE_EMAIL read as PHP reads them; and a broken INI master account
 * that fails on its own instead of stopping the tenant accounts. No servers needed: FILE
 * transports and Maildir mailboxes.
 */
final class ConfigValuesTest extends TestCase
{
    private const DATA = ['host' => 'pcr360.example.edu'];

    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-values-');
    }

    /** Writes configs/pcr360.ini with exactly these lines; returns its path. */
    private function iniFile(array $lines): string
    {
        @mkdir($this->dir . '/configs', 0700, true);
        $path = $this->dir . '/configs/pcr360.ini';
        file_put_contents($path, implode("\n", $lines) . "\n");
        return $path;
    }

    private function fileMaster(array $extra = []): array
    {
        return array_merge([
            '[prod]',
            'email.TENANTS_RECID = 0',
            'email.ACCOUNT_TYPE = "master"',
            'email.EMAIL = "master@example.edu"',
            'email.OUTGOING_TRANSPORT_TYPE = "FILE"',
            'email.FILE_PATH = "' . $this->dir . '/master-out"',
        ], $extra);
    }

    private static function files(string $dir): array
    {
        return glob($dir . '/*') ?: [];
    }

    private static function message(int $tenant = 0, string $kind = 'general'): array
    {
        return ['to' => 'someone@example.org', 'subject' => 'Hello', 'text' => 'Body',
            'tenant' => $tenant, 'kind' => $kind];
    }

    private static function configError(callable $call): PCR_Utility_EmailConfigException
    {
        try {
            $call();
        } catch (PCR_Utility_EmailConfigException $e) {
            return $e;
        }
        self::fail('no PCR_Utility_EmailConfigException');
    }

    private static function raw(string $subject): string
    {
        return "From: Customer <customer@example.org>\r\nTo: desk@example.edu\r\nSubject: $subject\r\n"
            . "Date: Tue, 05 Mar 2024 14:22:01 -0500\r\nMessage-ID: <" . bin2hex(random_bytes(8))
            . "@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n";
    }

    /** `email.OUTGOING_SSL = true` (the seed: "set if the server supports SSL") means SSL. */
    public function testSslWrittenAsABooleanInTheIni(): void
    {
        foreach (['true' => 'SSL', 'yes' => 'SSL', '1' => 'SSL', 'on' => 'SSL', '"true"' => 'SSL',
                     'false' => '', '0' => '', 'off' => '', '"no"' => '', '""' => ''] as $written => $ssl) {
            $written = (string) $written;
            $ini = $this->iniFile([
                '[prod]',
                'email.EMAIL = "master@example.edu"',
                'email.OUTGOING_TRANSPORT_TYPE = "SMTP"',
                'email.OUTGOING_HOST = "mail.example.edu"',
                "email.OUTGOING_SSL = $written",
                'email.INCOMING_MAILBOX_TYPE = "IMAP"',
                'email.INCOMING_HOST = "mail.example.edu"',
                "email.INCOMING_SSL = $written",
            ]);
            $account = (new PCR_Utility_EmailManager($ini, 'prod'))->resolveAccount('general', 0);
            $this->assertSame('master', $account['RECID'], $written);
            $this->assertSame($ssl, $account['OUTGOING_SSL'], $written);
            $this->assertSame($ssl === 'SSL' ? 465 : 25, $account['OUTGOING_PORT'], $written);
            $this->assertSame($ssl, $account['INCOMING_SSL'], $written);
            $this->assertSame($ssl === 'SSL' ? 993 : 143, $account['INCOMING_PORT'], $written);
        }
    }

    /** FILE uses no port: `OUTGOING_PORT = 0` (or '') is no port, and the mail is written. */
    public function testAFileAccountWithPortZeroSends(): void
    {
        foreach (['0', '""', '"0"'] as $port) {
            $ini = $this->iniFile($this->fileMaster(["email.OUTGOING_PORT = $port", 'email.OUTGOING_SSL = false']));
            $r = (new PCR_Utility_EmailManager($ini, 'prod'))->send(self::message());
            $this->assertSame('written', $r['status'], $port);
            $this->assertSame('master', $r['account']);
            $this->assertFileExists($r['path']);
        }
        $this->assertCount(3, self::files($this->dir . '/master-out'));
    }

    /**
     * A tenant row as the database returns it: every value a string ('7', '0', OUTGOING_SSL '0').
     * It is used, its mail goes out through it (never through the master) and its mailbox is read.
     */
    public function testTenantRowsWithStringNumbersSendAndReceiveAsThemselves(): void
    {
        $ini = $this->iniFile($this->fileMaster());
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::raw('printer broken'));
        $host = new TestHost();
        $host->accounts = [
            ['RECID' => '7', 'TENANTS_RECID' => '2', 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'default@t2.example.edu',
                'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'OUTGOING_PORT' => '0', 'OUTGOING_SSL' => '0',
                'FILE_PATH' => $this->dir . '/t2-default', 'INCOMING_PORT' => '0', 'INCOMING_SSL' => ''],
            ['RECID' => '8', 'TENANTS_RECID' => '2', 'ACCOUNT_TYPE' => 'service_desk', 'EMAIL' => 'desk@t2.example.edu',
                'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'OUTGOING_PORT' => '', 'OUTGOING_SSL' => '0',
                'FILE_PATH' => $this->dir . '/t2-desk', 'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
                'INCOMING_PATH' => $maildir, 'INCOMING_PORT' => '0', 'INCOMING_SSL' => '0',
                'TIMEOUT' => '30', 'VERIFY_CERT' => '1'],
        ];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);

        $r = $m->send(self::message(2));
        $this->assertSame('written', $r['status']);
        $this->assertSame(7, $r['account'], 'the tenant Default account, not the master');
        $this->assertSame(8, $m->send(self::message(2, 'sd_thread') + ['sd_number' => 'IQ00001'])['account']);
        $this->assertCount(1, self::files($this->dir . '/t2-default'));
        $this->assertCount(1, self::files($this->dir . '/t2-desk'));
        $this->assertSame([], self::files($this->dir . '/master-out'), 'nothing went out as the master');

        $summary = $m->eventCheckMail(self::DATA);
        $this->assertSame('ok', $summary['status'], json_encode($summary));
        $this->assertCount(1, $host->inquiries);
        $this->assertSame(8, array_values($host->inquiries)[0]['account']['RECID']);
        $this->assertSame([], $host->errors, json_encode($host->errors));
    }

    /**
     * PHP reads a quoted "false" as the text "false", which is TRUE: PCR-360 then sends mail, so
     * the extension does too, and says so in the Error Log with the file and line (once).
     */
    public function testAQuotedFalseSendEmailReadsAsTrueWithAWarning(): void
    {
        $ini = $this->iniFile($this->fileMaster(['constants.SEND_EMAIL = "false"', 'constants.DISABLE_EMAIL = false']));
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $this->assertSame('written', $m->send(self::message())['status'], 'SEND_EMAIL reads as true');
        $this->assertSame('written', $m->send(self::message())['status']);
        (new PCR_Utility_EmailManager($ini, 'prod', $host))->resolveAccount();
        $this->assertCount(1, $host->errors, 'logged once: ' . json_encode($host->errors));
        $message = $host->errors[0]['message'];
        $this->assertStringContainsString('constants.SEND_EMAIL = "false"', $message);
        $this->assertStringContainsString("$ini:7", $message, 'the file and line');
        $this->assertStringContainsString('reads as TRUE', $message);

        // The event's summary shows it too.
        $summary = $m->eventCheckMail(self::DATA);
        $this->assertStringContainsString("$ini:7", implode("\n", $summary['warnings']));

        // DISABLE_EMAIL = "off" (quoted) disables email, as it does in PCR-360.
        $ini = $this->iniFile($this->fileMaster(['constants.DISABLE_EMAIL = "off"']));
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $this->assertSame('disabled', $m->send(self::message())['status']);
        $this->assertCount(1, $host->errors);
        $this->assertStringContainsString('constants.DISABLE_EMAIL = "off"', $host->errors[0]['message']);
        $this->assertStringContainsString("$ini:7", $host->errors[0]['message']);

        // Bare false and "0" are false, with nothing to warn of.
        $ini = $this->iniFile($this->fileMaster(['constants.SEND_EMAIL = false', 'constants.DISABLE_EMAIL = "0"']));
        $host = new TestHost();
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $this->assertSame('redirected', $m->send(self::message())['status']);
        $this->assertSame([], $host->errors);
    }

    /**
     * A broken INI master (`email.OUTGOING_SSL = maybe`) is an account that fails: the manager
     * is built, the tenants send and their mailboxes are read, every use of the master throws a
     * ConfigException naming it and the key (logged once per process), and the master's mail
     * and mailbox are never handled through a tenant's account.
     */
    public function testABrokenMasterFailsAloneAndTheTenantsWork(): void
    {
        $masterBox = maildir_create($this->dir, 'MasterMaildir');
        maildir_put($masterBox, self::raw('for the master'));
        $deskBox = maildir_create($this->dir, 'DeskMaildir');
        maildir_put($deskBox, self::raw('for tenant 1'));
        $ini = $this->iniFile([
            '[prod]',
            'email.EMAIL = "master@example.edu"',
            'email.OUTGOING_TRANSPORT_TYPE = "SMTP"',
            'email.OUTGOING_HOST = "mail.example.edu"',
            'email.OUTGOING_SSL = maybe',
            'email.INCOMING_MAILBOX_TYPE = "MAILDIR"',
            'email.INCOMING_PATH = "' . $masterBox . '"',
        ]);
        $host = new TestHost();
        $host->accounts = [
            ['RECID' => 31, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'default@t1.example.edu',
                'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t1-default'],
            ['RECID' => 32, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk', 'EMAIL' => 'desk@t1.example.edu',
                'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . '/t1-desk',
                'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => $deskBox],
        ];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);

        // The tenant's accounts send.
        $this->assertSame(31, $m->send(self::message(1))['account']);
        $this->assertSame(32, $m->send(self::message(1, 'service_desk'))['account']);
        $this->assertSame(31, $m->resolveAccount('general', 1)['RECID']);

        // Every use of the master fails with its error.
        $assertMasterError = function (PCR_Utility_EmailConfigException $e): void {
            $this->assertStringContainsString('account master', $e->getMessage());
            $this->assertStringContainsString('email.OUTGOING_SSL', $e->getMessage());
            $this->assertStringContainsString("$this->dir/configs/pcr360.ini:5", $e->getMessage());
        };
        $assertMasterError(self::configError(fn () => $m->send(self::message(9))));
        $assertMasterError(self::configError(fn () => $m->send(self::message(9, 'service_desk'))));
        $assertMasterError(self::configError(fn () => $m->resolveAccount('general', 9)));
        $assertMasterError(self::configError(fn () => $m->checkAccount('master')));
        $batch = $m->sendBatch([self::message(9), self::message(1)]);
        $this->assertSame('failed', $batch[0]['status']);
        $this->assertSame('PCR_Utility_EmailConfigException', $batch[0]['exception']);
        $this->assertStringContainsString('email.OUTGOING_SSL', $batch[0]['error']);
        $this->assertSame(31, $batch[1]['account']);
        $this->assertCount(2, self::files($this->dir . '/t1-default'), 'never sent through a tenant account');
        $this->assertCount(1, self::files($this->dir . '/t1-desk'));

        // The event reads the tenant's mailbox; the master's is read by nobody, and says why.
        $summary = $m->eventCheckMail(self::DATA);
        $this->assertSame('errors', $summary['status'], json_encode($summary));
        $this->assertCount(1, $host->inquiries, json_encode($summary));
        $this->assertSame('for tenant 1', array_values($host->inquiries)[0]['subject']);
        $boxes = array_column($summary['mailboxes'], null, 'account');
        $this->assertSame(1, $boxes[32]['fetched'], json_encode($summary));
        $this->assertStringContainsString('email.OUTGOING_SSL', $boxes['master']['errors'][0]);
        $this->assertCount(1, maildir_files($masterBox));
        $this->assertStringStartsWith('new/', maildir_files($masterBox)[0], 'the master\'s mail is left unread');

        // The master's error is in the Error Log once, however many uses and managers.
        self::configError(fn () => (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(self::message()));
        $logged = array_filter($host->errors, fn ($e) => str_contains($e['message'], 'email.OUTGOING_SSL')
            && str_contains($e['message'], 'cannot be used until this is fixed'));
        $this->assertCount(1, $logged, json_encode($host->errors));
    }

    /**
     * A broken tenant row fails its own mail each time, and its error is logged once per
     * process however many managers (requests of a PHP worker) find it.
     */
    public function testABrokenTenantRowIsLoggedOncePerProcess(): void
    {
        $ini = $this->iniFile($this->fileMaster());
        $host = new TestHost();
        $host->accounts = [['RECID' => '61', 'TENANTS_RECID' => '6', 'ACCOUNT_TYPE' => 'default',
            'EMAIL' => 'd@t6.example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'OUTGOING_SSL' => 'maybe',
            'FILE_PATH' => $this->dir . '/t6']];
        for ($i = 0; $i < 3; $i++) {
            $e = self::configError(fn () => (new PCR_Utility_EmailManager($ini, 'prod', $host))->send(self::message(6)));
            $this->assertStringContainsString('account 61, key OUTGOING_SSL', $e->getMessage());
        }
        $rowErrors = array_filter($host->errors, fn ($e) => str_starts_with($e['message'], 'pcr_email: email configuration error (account 61'));
        $this->assertCount(1, $rowErrors, json_encode($host->errors));
        $this->assertSame([], self::files($this->dir . '/master-out'), 'never sent as the master');
    }

    /** The whole file's errors still stop the manager (nothing can be trusted). */
    public function testAnUnreadableFileIsStillAnErrorOfTheConstructor(): void
    {
        $e = self::configError(fn () => new PCR_Utility_EmailManager($this->dir . '/missing.ini', 'prod'));
        $this->assertStringContainsString('cannot read', $e->getMessage());
        $ini = $this->iniFile($this->fileMaster(['email.TIMEOUT = soon']));
        $e = self::configError(fn () => new PCR_Utility_EmailManager($ini, 'prod'));
        $this->assertStringContainsString('email.TIMEOUT', $e->getMessage());
    }
}
