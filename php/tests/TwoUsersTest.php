<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * Two users, one installation (issue 11): cron and the command-line tools run as root, the web
 * server as its own user; both use the key file and the state directory, whoever came first.
 * The web server's user is a real unprivileged user of the installation's group, created here
 * (and removed afterwards); every run is a child PHP that drops to it as the web server would be.
 */
final class TwoUsersTest extends TestCase
{
    private string $user;
    private string $group;
    private string $base;

    protected function setUp(): void
    {
        if (posix_geteuid() !== 0) {
            $this->markTestSkipped('needs root to create a user and a group');
        }
        $tag = bin2hex(random_bytes(4));
        $this->group = "pcrg$tag";
        $this->user = "pcru$tag";
        run_checked(['groupadd', $this->group]);
        run_checked(['useradd', '-M', '-N', '-g', $this->group, '-d', '/nonexistent', '-s', '/usr/sbin/nologin',
            $this->user]);
        // The application's directory as the administrator prepares it: root's, the web server's
        // group, no access for others, and NOT setgid: the group of what the extension creates
        // comes from the extension, not from the kernel.
        $this->base = temp_dir('pcr-two-users-');
        chgrp($this->base, $this->group);
        chmod($this->base, 0770);
    }

    protected function tearDown(): void
    {
        if (isset($this->user)) {
            exec('userdel ' . escapeshellarg($this->user) . ' 2>&1');
            exec('groupdel ' . escapeshellarg($this->group) . ' 2>&1');
        }
    }

    /** Root runs the event and a send first; then the web server's user does both, in the files root created. */
    public function testRootAndTheWebServersUserShareOneInstallation(): void
    {
        $maildir = $this->sharedMaildir();
        maildir_put($maildir, self::message('first, read as root'));
        $ini = $this->ini($maildir);
        $this->share($maildir);

        $root = $this->run_as(null, $ini);
        $this->assertSame(0, $root['exit'], $root['stderr']);
        $this->assertSame(['first, read as root'], $root['inquiries'], json_encode($root));
        $this->assertSame(0, $root['summary']['totals']['errors'], json_encode($root['summary']));
        $this->assertSame('written', $root['sent']['status'], json_encode($root));
        $this->assertSame([], $root['errors']);

        // What root created (under umask 077) belongs to the directory's group, with the modes
        // that let the group in and keep others out.
        $key = dirname($ini) . '/pcr360-email.key';
        $this->assertOwnedByTheGroup($key, 0640);
        $this->assertOwnedByTheGroup("{$this->base}/state", 02770);
        $this->assertOwnedByTheGroup("{$this->base}/state/pcr_email.sqlite", 0660);
        $this->assertOwnedByTheGroup("{$this->base}/out", 02770);
        $this->assertOwnedByTheGroup($root['sent']['path'], 0660);

        maildir_put($maildir, self::message('second, read as the web server'));
        $this->share($maildir);
        $web = $this->run_as($this->user, $ini);
        $this->assertSame(0, $web['exit'], $web['stderr']);
        $this->assertSame(['second, read as the web server'], $web['inquiries'], json_encode($web));
        $this->assertSame(0, $web['summary']['totals']['errors'], json_encode($web['summary']));
        $this->assertSame('written', $web['sent']['status'], json_encode($web));
        $this->assertSame([], $web['errors']);
        $this->assertSame($this->user, posix_getpwuid(fileowner($web['sent']['path']))['name']);
        $this->assertOwnedByTheGroup($web['sent']['path'], 0660);

        // And root again after the web server: the first message is not handed over a third time.
        maildir_put($maildir, self::message('third, root again'));
        $this->share($maildir);
        $again = $this->run_as(null, $ini);
        $this->assertSame(['third, root again'], $again['inquiries'], json_encode($again));
        $this->assertSame([], $again['errors']);
    }

    /**
     * The state directory as an older version left it after root ran first (0700, root's): the
     * web server's user gets an exception naming the directory, the user it runs as and the fix,
     * and the Error Log has it too.
     */
    public function testAStateDirectoryTheWebServersUserCannotUseIsAClearError(): void
    {
        $maildir = $this->sharedMaildir();
        maildir_put($maildir, self::message('waits for the fix'));
        $ini = $this->ini($maildir);
        $this->share($maildir);
        $this->assertSame(0, $this->run_as(null, $ini)['exit']);
        $state = "{$this->base}/state";
        chgrp($state, 'root');
        chmod($state, 0700);

        maildir_put($maildir, self::message('after the fix'));
        $this->share($maildir);
        $web = $this->run_as($this->user, $ini);
        $this->assertSame('PCR_Utility_EmailConfigException', $web['exception'] ?? null, json_encode($web));
        $message = $web['message'];
        $this->assertStringContainsString($state, $message);
        $this->assertStringContainsString("this process runs as user {$this->user} (uid ", $message);
        $this->assertStringContainsString("chgrp -R {$this->group} $state", $message);
        $this->assertStringContainsString('Two users, one installation', $message);
        $logged = array_filter($web['errors'], fn($e) => str_contains($e['message'], $state));
        $this->assertNotEmpty($logged, 'the Error Log says why no mailbox was read: ' . json_encode($web['errors']));

        // The fix the message gives works.
        run_checked(['chgrp', '-R', $this->group, $state]);
        run_checked(['chmod', '-R', 'g+rwX,o-rwx', $state]);
        run_checked(['chmod', 'g+s', $state]);
        $fixed = $this->run_as($this->user, $ini);
        $this->assertSame(['after the fix'], $fixed['inquiries'], json_encode($fixed));
    }

    /** A key file readable by its group is used; one others can read is refused, clearly and in the Error Log. */
    public function testAKeyFileOthersCanReadIsRefusedWithAClearMessage(): void
    {
        $maildir = $this->sharedMaildir();
        $ini = $this->ini($maildir);
        $key = dirname($ini) . '/pcr360-email.key';
        PCR_Utility_EmailManager::encryptPassword('unused', $ini, 'prod');
        $this->assertOwnedByTheGroup($key, 0640);
        $message = ['to' => 'someone@example.org', 'subject' => 'thread', 'text' => 'x', 'kind' => 'service_desk',
            'sd_number' => 'IQ00001'];

        chmod($key, 0644);
        $host = new TestHost();
        try {
            (new PCR_Utility_EmailManager($ini, 'prod', $host))->send($message);
            $this->fail('a key file others can read was used');
        } catch (PCR_Utility_EmailConfigException $e) {
            $this->assertStringContainsString(
                "the key file is open to others (mode 0644); it is refused until you run: chmod 640 $key",
                $e->getMessage()
            );
        }
        $this->assertCount(1, $host->errors, json_encode($host->errors));
        $this->assertStringContainsString("chmod 640 $key", $host->errors[0]['message']);

        // As the administrator fixes it: the web server's group reads it.
        chmod($key, 0640);
        $this->share($maildir);
        $web = $this->run_as($this->user, $ini);
        $this->assertSame('written', $web['sent']['status'] ?? null, json_encode($web));
    }

    /**
     * An MBOX with `delete`: root quarantines a message the host refuses into the sibling mbox
     * PCR-Failed it creates (under umask 077), then the web server's user quarantines another
     * into the same file and deletes what it processed.
     */
    public function testAnMboxQuarantineRootStartedIsContinuedByTheWebServersUser(): void
    {
        $mail = "{$this->base}/mail";
        mkdir($mail, 0770);
        chgrp($mail, $this->group);
        chmod($mail, 0770);
        $mbox = "$mail/servicedesk";
        $entry = fn(string $subject) => "From zoe@example.org Tue Mar  5 14:22:01 2024\n"
            . str_replace("\r\n", "\n", self::message($subject)) . "\n";
        file_put_contents($mbox, $entry('poison, refused as root') . $entry('good, read as root'));
        chgrp($mbox, $this->group);
        chmod($mbox, 0660);
        $ini = $this->ini($mbox, ['INCOMING_MAILBOX_TYPE' => 'MBOX', 'PROCESSED_ACTION' => 'delete']);

        for ($run = 1; $run <= 3; $run++) {
            $root = $this->run_as(null, $ini, true);
            $this->assertSame(0, $root['exit'], $root['stderr']);
            $this->assertSame($run === 3 ? 1 : 0, $root['summary']['totals']['quarantined'] ?? null, json_encode($root));
        }
        $this->assertOwnedByTheGroup("$mail/PCR-Failed", 0660);
        $this->assertStringContainsString('poison, refused as root', (string) file_get_contents("$mail/PCR-Failed"));
        $this->assertStringNotContainsString('Subject:', (string) file_get_contents($mbox));

        file_put_contents($mbox, $entry('poison, refused as the web server') . $entry('good, read as the web server'), FILE_APPEND);
        for ($run = 1; $run <= 3; $run++) {
            $web = $this->run_as($this->user, $ini, true);
            $this->assertSame(0, $web['exit'], $web['stderr']);
            $this->assertSame(0, $web['summary']['totals']['errors'], json_encode($web['summary']));
            $this->assertSame($run === 3 ? 1 : 0, $web['summary']['totals']['quarantined'], json_encode($web));
        }
        $failed = (string) file_get_contents("$mail/PCR-Failed");
        $this->assertStringContainsString('poison, refused as root', $failed);
        $this->assertStringContainsString('poison, refused as the web server', $failed);
        $this->assertStringNotContainsString('Subject:', (string) file_get_contents($mbox));
        $this->assertFileDoesNotExist("$mbox.pcr-rewrite");
    }

    // ---- helpers ----------------------------------------------------------------------------

    private static function message(string $subject): string
    {
        return "From: Zoe <zoe@example.org>\r\nTo: desk@test.local\r\nSubject: $subject\r\n"
            . 'Message-ID: <' . bin2hex(random_bytes(6)) . "@example.org>\r\n"
            . "Date: Tue, 05 Mar 2024 14:22:01 -0500\r\n\r\nHello.\r\n";
    }

    private function sharedMaildir(): string
    {
        return maildir_create($this->base);
    }

    /** The Maildir and the INI's directory: the installation's group may read (and the Maildir write). */
    private function share(string $maildir): void
    {
        run_checked(['chgrp', '-R', $this->group, $maildir]);
        run_checked(['chmod', '-R', 'g+rwX', $maildir]);
    }

    /** The INI with a FILE master reading the Maildir; its directory as on a real server (root:group 0750). */
    private function ini(string $maildir, array $extra = []): string
    {
        $ini = write_ini($this->base, $extra + [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => "{$this->base}/out",
            'STATE_DIR' => "{$this->base}/state",
            'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
            'INCOMING_PATH' => $maildir,
        ]);
        chgrp(dirname($ini), $this->group);
        chmod(dirname($ini), 0750);
        chgrp($ini, $this->group);
        chmod($ini, 0640);
        return $ini;
    }

    /**
     * In a child PHP, as root ($user null) or as $user (its group only, as a web server's
     * worker), under umask 077: the event over the Maildir, then a send that needs the key file
     * (an SD item's Message-ID). With $poison the host refuses every message whose subject
     * starts with "poison". Returns what happened.
     */
    private function run_as(?string $user, string $ini, bool $poison = false): array
    {
        $code = 'umask(0077);';
        if ($user !== null) {
            $code .= '$u = posix_getpwnam(' . var_export($user, true) . ');'
                . 'posix_setgid($u["gid"]) || exit(5); posix_initgroups($u["name"], $u["gid"]);'
                . 'posix_setuid($u["uid"]) || exit(6); if (posix_geteuid() === 0) { exit(3); }';
        }
        $code .= '$h = new TestHost(); $out = ["errors" => []];'
            . ($poison ? '$h->onCreate = function (array $m) { if (str_starts_with($m["subject"], "poison")) {'
                . ' throw new RuntimeException("Inquiry rejected"); } };' : '')
            . 'try {'
            . '  $m = new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod", $h);'
            . '  $out["summary"] = $m->eventCheckMail(["host" => "x.example.edu"]);'
            . '  $out["inquiries"] = array_values(array_column($h->inquiries, "subject"));'
            . '  $out["sent"] = $m->send(["to" => "someone@example.org", "subject" => "Re: your request",'
            . '      "text" => "On it.", "kind" => "service_desk", "sd_number" => "IQ00001"]);'
            . '} catch (Throwable $e) { $out["exception"] = get_class($e); $out["message"] = $e->getMessage(); }'
            . '$out["errors"] = $h->errors; echo json_encode($out);';
        [$exit, $stdout, $stderr] = run_php($code);
        $result = json_decode($stdout, true);
        $this->assertIsArray($result, "exit $exit: $stdout $stderr");
        return $result + ['exit' => $exit, 'stderr' => $stderr];
    }

    private function assertOwnedByTheGroup(string $path, int $mode): void
    {
        clearstatcache();
        $this->assertFileExists($path);
        $this->assertSame($this->group, posix_getgrgid(filegroup($path))['name'], "group of $path");
        $this->assertSame(sprintf('%05o', $mode), sprintf('%05o', fileperms($path) & 07777), "mode of $path");
    }
}
