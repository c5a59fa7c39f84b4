<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * Broken tenant accounts (SPEC §3): a bad account fails on its own; its mail is never sent
 * through another account (least of all the INI master's).
 */
final class AccountsTest extends TestCase
{
    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir();
    }

    private function ini(): string
    {
        return write_ini($this->dir, ['EMAIL' => 'master@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/master']);
    }

    private function row(int $recid, int $tenant, string $password, string $type = 'default'): array
    {
        return ['RECID' => $recid, 'TENANTS_RECID' => $tenant, 'ACCOUNT_TYPE' => $type,
            'EMAIL' => "desk$recid@t$tenant.example.edu", 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . "/out-$recid", 'PASSWORD' => $password];
    }

    private static function files(string $dir): array
    {
        return glob($dir . '/*') ?: [];
    }

    /** @return PCR_Utility_EmailConfigException the exception $call throws */
    private static function configError(callable $call): PCR_Utility_EmailConfigException
    {
        try {
            $call();
        } catch (PCR_Utility_EmailConfigException $e) {
            return $e;
        }
        self::fail('no PCR_Utility_EmailConfigException');
    }

    public function testATamperedDefaultRowFailsItsTenantsMailInsteadOfTheMasterSendingIt(): void
    {
        $ini = $this->ini();
        $enc = PCR_Utility_EmailManager::encryptPassword('T3nant-S3cret', $ini, 'prod');
        $tampered = substr($enc, 0, -6) . 'AAAAA=';
        $host = new TestHost();
        $host->accounts = [$this->row(31, 1, $tampered), $this->row(41, 2, $enc)];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $send = fn (string $kind, int $tenant) =>
            $m->send(['to' => 'x@example.edu', 'subject' => 's', 'text' => 't', 'kind' => $kind, 'tenant' => $tenant]);

        foreach (['general', 'service_desk'] as $kind) {
            $e = self::configError(fn () => $send($kind, 1));
            $this->assertStringContainsString('account 31', $e->getMessage(), $kind);
            $this->assertStringContainsString('PASSWORD', $e->getMessage(), $kind);
            $this->assertStringNotContainsString($tampered, $e->getMessage());
        }
        $this->assertSame([], self::files($this->dir . '/master'), 'nothing went out as the master');
        $this->assertSame([], self::files($this->dir . '/out-31'));
        $logged = array_filter($host->errors, fn ($e) => str_contains($e['message'], 'was not sent')
            && str_contains($e['message'], 'account 31') && str_contains($e['message'], 'PASSWORD'));
        $this->assertCount(2, $logged, json_encode($host->errors));

        // Another tenant's good Default row still sends.
        $r = $send('general', 2);
        $this->assertSame('written', $r['status']);
        $this->assertSame(41, $r['account']);
        $this->assertCount(1, self::files($this->dir . '/out-41'));
        // A tenant without any account still goes through the master.
        $this->assertSame('master', $send('general', 3)['account']);

        // resolveAccount() and checkAccount() say the same as send().
        $e = self::configError(fn () => $m->resolveAccount('general', 1));
        $this->assertStringContainsString('account 31', $e->getMessage());
        $e = self::configError(fn () => $m->checkAccount(31));
        $this->assertStringContainsString('PASSWORD', $e->getMessage());
        $this->assertSame(41, $m->resolveAccount('general', 2)['RECID']);
    }

    public function testAKeyFileThatCannotBeUsedFailsOnlyTheAccountsWithEncryptedValues(): void
    {
        $ini = $this->ini();
        $enc = PCR_Utility_EmailManager::encryptPassword('T3nant-S3cret', $ini, 'prod');
        // Readable by others: refused (the tenant rows' encrypted values cannot be decrypted).
        chmod(dirname($ini) . '/pcr360-email.key', 0644);
        $host = new TestHost();
        $host->accounts = [$this->row(32, 1, $enc), $this->row(42, 2, 'plain-pw')];
        $m = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $send = fn (int $tenant) =>
            $m->send(['to' => 'x@example.edu', 'subject' => 's', 'text' => 't', 'tenant' => $tenant]);

        $e = self::configError(fn () => $send(1));
        $this->assertStringContainsString('account 32', $e->getMessage());
        $this->assertStringContainsString('PASSWORD', $e->getMessage());
        $this->assertStringContainsString('chmod 640', $e->getMessage());
        $this->assertSame([], self::files($this->dir . '/master'));
        $this->assertSame(42, $send(2)['account']);
    }
}
