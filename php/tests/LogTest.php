<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** Where failures and notices are written: the host's Error Log, PHP's error log, LOG_FILE. */
final class LogTest extends TestCase
{
    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir();
    }

    /** A master account whose SMTP server is not there (a closed port on loopback). */
    private function deadSmtp(array $extra = []): string
    {
        $probe = stream_socket_server('tcp://127.0.0.1:0');
        $port = (int) substr(strrchr(stream_socket_get_name($probe, false), ':'), 1);
        fclose($probe);
        return write_ini($this->dir, $extra + [
            'EMAIL' => 'desk@example.edu',
            'OUTGOING_TRANSPORT_TYPE' => 'SMTP',
            'OUTGOING_HOST' => '127.0.0.1',
            'OUTGOING_PORT' => $port,
            'TIMEOUT' => 3,
            'STATE_DIR' => $this->dir . '/state',
        ]);
    }

    private function send(string $ini, string $errorLog): array
    {
        return run_php(
            'try { (new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod"))'
            . '->send(["to" => "a@example.edu", "subject" => "s", "text" => "t"]); echo "sent"; }'
            . ' catch (PCR_Utility_EmailTransportException $e) { echo "failed"; }',
            ['error_log' => $errorLog, 'log_errors' => '1']
        );
    }

    public function testWithoutHostOrLogFileAFailureGoesToPhpsErrorLog(): void
    {
        $ini = $this->deadSmtp();
        $errorLog = $this->dir . '/php-errors.log';
        [$code, $out, $err] = $this->send($ini, $errorLog);
        $this->assertSame(0, $code, $err);
        $this->assertSame('failed', $out);
        $this->assertFileExists($errorLog, 'the failure left no trace in PHP\'s error log');
        $lines = file($errorLog, FILE_IGNORE_NEW_LINES);
        $this->assertCount(1, $lines, implode("\n", $lines));
        $this->assertStringContainsString('pcr_email: ', $lines[0]);
        $this->assertSame(1, substr_count($lines[0], 'pcr_email:'), $lines[0]);
        $this->assertStringContainsString('master', $lines[0]);
        $this->assertStringContainsString('127.0.0.1', $lines[0]);
    }

    public function testLogFileLinesCarryOnePrefix(): void
    {
        $ini = $this->deadSmtp(['LOG_FILE' => $this->dir . '/email.log']);
        [$code, $out, $err] = $this->send($ini, $this->dir . '/php-errors.log');
        $this->assertSame('failed', $out, $err);
        $lines = file($this->dir . '/email.log', FILE_IGNORE_NEW_LINES);
        $this->assertCount(1, $lines);
        $this->assertMatchesRegularExpression('/^\S+ \[error\] pcr_email: (?!pcr_email:)/', $lines[0]);
    }

    public function testTheClearTextNoticeIsLoggedOncePerAccountAndDayAcrossProcesses(): void
    {
        // No tenant rows at all (no host): the master's clear PASSWORD is still reported, once,
        // although every run (cron, every 15 minutes) is a new process.
        $ini = $this->deadSmtp([
            'LOGIN' => 'desk',
            'PASSWORD' => 'Plain-Text-pw-42',
            'LOG_FILE' => $this->dir . '/email.log',
        ]);
        for ($i = 0; $i < 3; $i++) {
            [$code, $out, $err] = $this->send($ini, $this->dir . '/php-errors.log');
            $this->assertSame('failed', $out, $err);
        }
        $text = file_get_contents($this->dir . '/email.log');
        $this->assertSame(1, substr_count($text, 'PASSWORD is stored in clear'), $text);
        $this->assertStringContainsString('account master: PASSWORD is stored in clear', $text);
        $this->assertStringNotContainsString('Plain-Text-pw-42', $text);
        // The three delivery failures are each logged.
        $this->assertSame(3, substr_count($text, '[error] pcr_email: ') - 1, $text);
    }
}
