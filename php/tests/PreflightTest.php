<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** php/cli/preflight.php as an administrator runs it before switching to the extension. */
final class PreflightTest extends TestCase
{
    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir();
    }

    private function preflight(array $args): array
    {
        $cmd = [PHP_BINARY, '-d', 'extension=' . test_env('PCR_EMAIL_SO'),
            dirname(__DIR__) . '/cli/preflight.php', ...$args];
        $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
        $out = stream_get_contents($pipes[1]);
        $err = stream_get_contents($pipes[2]);
        fclose($pipes[1]);
        fclose($pipes[2]);
        return [proc_close($proc), $out, $err];
    }

    private function imapRow(int $recid, string $local, string $password): array
    {
        $user = mail_user($local);
        return [
            'RECID' => $recid, 'TENANTS_RECID' => 1, 'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => $user['email'], 'LOGIN' => $user['email'], 'PASSWORD' => $password,
            'OUTGOING_TRANSPORT_TYPE' => 'FILE', 'FILE_PATH' => $this->dir . "/out-$recid",
            'INCOMING_MAILBOX_TYPE' => 'IMAP', 'INCOMING_HOST' => test_env('PCR_TEST_TLS_HOST'),
            'INCOMING_PORT' => (int) test_env('PCR_IMAPS_PORT'), 'INCOMING_SSL' => 'SSL',
            'CA_FILE' => test_env('PCR_TEST_CA'), 'TIMEOUT' => 5,
        ];
    }

    public function testOneLinePerProblemAndNothingForGoodAccounts(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'desk@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out', 'STATE_DIR' => $this->dir . '/state']);
        $user = mail_user('mbox5');
        $rows = [
            $this->imapRow(11, 'mbox5', $user['password']),
            $this->imapRow(12, 'mbox5', 'Wr0ng-pw-for-preflight'),
            ['RECID' => 13, 'TENANTS_RECID' => 2, 'ACCOUNT_TYPE' => 'default', 'EMAIL' => 'x@example.edu',
                'OUTGOING_TRANSPORT_TYPE' => 'CARRIER_PIGEON'],
        ];
        file_put_contents($this->dir . '/rows.json', json_encode($rows));
        [$code, $out, $err] = $this->preflight(["--config=$ini", '--env=prod', "--rows={$this->dir}/rows.json"]);
        $this->assertSame(1, $code, $out . $err);
        $lines = explode("\n", trim($out));
        $this->assertStringContainsString('preflight: 4 account(s) checked, 2 with problems', end($lines));
        $this->assertStringNotContainsString('PROBLEM account master', $out);
        $this->assertStringNotContainsString('PROBLEM account 11', $out);
        $this->assertStringNotContainsString('PROBLEM log', $out);
        // Passwords in clear are notices: encrypt them before the switch.
        $this->assertMatchesRegularExpression('/^NOTICE .*account 11: PASSWORD is stored in clear/m', $out);
        $this->assertMatchesRegularExpression('/^PROBLEM account 12: incoming .*/m', $out);
        $this->assertMatchesRegularExpression('/^PROBLEM account 13: .*OUTGOING_TRANSPORT_TYPE.*/m', $out);
        $this->assertStringNotContainsString('Wr0ng-pw-for-preflight', $out . $err);
        // Run again the same day (after fixing something, or after cron logged the notice):
        // the notices are still printed.
        [$code, $again] = $this->preflight(["--config=$ini", '--env=prod', "--rows={$this->dir}/rows.json"]);
        $this->assertSame(1, $code);
        $this->assertMatchesRegularExpression('/^NOTICE .*account 11: PASSWORD is stored in clear/m', $again);
        $this->assertStringNotContainsString($user['password'], $out . $err);
    }

    public function testAllGoodExitsZero(): void
    {
        $ini = write_ini($this->dir, ['EMAIL' => 'desk@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out', 'STATE_DIR' => $this->dir . '/state']);
        [$code, $out, $err] = $this->preflight(["--config=$ini", '--env=prod']);
        $this->assertSame(0, $code, $out . $err);
        $this->assertSame("preflight: 1 account(s) checked, 0 with problems\n", $out);
    }

    public function testAnUnusableIniFileIsOneProblem(): void
    {
        [$code, $out] = $this->preflight(['--config=' . $this->dir . '/missing.ini', '--env=prod']);
        $this->assertSame(1, $code);
        $this->assertStringStartsWith('PROBLEM configuration: ', $out);
        $this->assertStringContainsString('missing.ini', $out);
    }
}
