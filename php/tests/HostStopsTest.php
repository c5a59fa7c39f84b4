<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * PHP stopping inside a host callback (a fatal error, exit()) while the event runs: the
 * process ends as PHP intends, nothing is lost, and the next run finishes the job once.
 */
final class HostStopsTest extends TestCase
{
    private function setUpMaildir(): array
    {
        $dir = temp_dir();
        foreach (['new', 'cur', 'tmp'] as $sub) {
            mkdir("$dir/Maildir/$sub", 0700, true);
        }
        for ($i = 1; $i <= 3; $i++) {
            file_put_contents("$dir/Maildir/new/100$i.M1P1.t",
                "From: user$i@example.org\r\nSubject: Request $i\r\nMessage-ID: <stop$i@example.org>\r\n\r\nBody $i\r\n");
            touch("$dir/Maildir/new/100$i.M1P1.t", 1700000000 + $i);
        }
        $ini = write_ini($dir, ['EMAIL' => 'desk@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$dir/out", 'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => "$dir/Maildir",
            'PROCESSED_ACTION' => 'delete']);
        return [$dir, $ini];
    }

    /** Child code: a host recording Inquiries in $log, doing $stop on the message with subject "Request 2". */
    private function child(string $ini, string $log, string $stop): string
    {
        return '
            $h = new class extends TestHost {
                public string $log = "";
                public string $stop = "";
                public function createInquiry(array $mail): string {
                    if ($mail["subject"] === "Request 2" && $this->stop !== "") { eval($this->stop); }
                    file_put_contents($this->log, $mail["message_id"] . "\n", FILE_APPEND);
                    return parent::createInquiry($mail);
                }
            };
            $h->log = ' . var_export($log, true) . ';
            $h->stop = ' . var_export($stop, true) . ';
            $m = new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod", $h);
            echo json_encode($m->eventCheckMail(["host" => "pcr360.example.edu"])["totals"]);';
    }

    /** @dataProvider stops */
    public function testNothingIsLostAndTheRerunFinishesOnce(string $stop, string $expectInOutput, int $exitCode): void
    {
        [$dir, $ini] = $this->setUpMaildir();
        $log = "$dir/inquiries.log";
        [$code, $out, $err] = run_php($this->child($ini, $log, $stop));
        $this->assertSame($exitCode, $code, "$out $err");
        $this->assertStringContainsString($expectInOutput, $out . $err);
        $this->assertStringNotContainsString('Rust panic', $out . $err);
        // Message 1 was handed over before PHP stopped; 2 and 3 were not.
        $this->assertSame(["stop1@example.org"], file($log, FILE_IGNORE_NEW_LINES));
        $this->assertCount(2, glob("$dir/Maildir/*/*.t*"), 'the two messages not handed over stay');

        [$code, $out, $err] = run_php($this->child($ini, $log, ''));
        $this->assertSame(0, $code, $err);
        $totals = json_decode($out, true);
        $this->assertSame(2, $totals['inquiries'], $out);
        $lines = file($log, FILE_IGNORE_NEW_LINES);
        sort($lines);
        $this->assertSame(['stop1@example.org', 'stop2@example.org', 'stop3@example.org'], $lines);
        $this->assertSame([], glob("$dir/Maildir/*/*.t*"), 'all processed: deleted');
    }

    public static function stops(): array
    {
        return [
            'fatal error' => ['trigger_error("host gave up", E_USER_ERROR);', 'host gave up', 255],
            'exit()' => ['echo "exiting"; exit(3);', 'exiting', 3],
        ];
    }
}
