<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** A host callback that calls back into the manager that is calling it. */
final class ReentryTest extends TestCase
{
    public function testACallbackCannotReenterTheBusyManagerButASecondOneWorks(): void
    {
        $dir = temp_dir();
        mkdir("$dir/Maildir/new", 0700, true);
        mkdir("$dir/Maildir/cur", 0700, true);
        mkdir("$dir/Maildir/tmp", 0700, true);
        file_put_contents("$dir/Maildir/new/1.M1P1.a",
            "From: user@example.org\r\nSubject: Help\r\nMessage-ID: <reentry@example.org>\r\n\r\nHi\r\n");
        $ini = write_ini($dir, ['EMAIL' => 'desk@example.edu', 'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "$dir/out", 'INCOMING_MAILBOX_TYPE' => 'MAILDIR', 'INCOMING_PATH' => "$dir/Maildir"]);
        $host = new class extends TestHost {
            public ?PCR_Utility_EmailManager $manager = null;
            public ?PCR_Utility_EmailManager $second = null;
            public array $seen = [];
            public function createInquiry(array $mail): string
            {
                try {
                    $this->manager->send(['to' => 'user@example.org', 'subject' => 'ack', 'text' => 'x']);
                } catch (PCR_Utility_EmailException $e) {
                    $this->seen[] = $e->getMessage();
                }
                // The documented way: another manager object.
                $this->seen[] = $this->second->send(['to' => 'user@example.org', 'subject' => 'ack', 'text' => 'x'])['status'];
                return parent::createInquiry($mail);
            }
        };
        $host->manager = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $host->second = new PCR_Utility_EmailManager($ini, 'prod', $host);
        $summary = $host->manager->eventCheckMail(['host' => 'pcr360.example.edu']);
        $this->assertSame(1, $summary['totals']['inquiries'], json_encode($summary));
        $this->assertCount(2, $host->seen);
        $this->assertStringContainsString('busy', $host->seen[0]);
        $this->assertSame('written', $host->seen[1]);
    }
}
