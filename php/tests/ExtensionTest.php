<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** The extension as PHP sees it: loaded, its classes, settings, phpinfo and stubs. */
final class ExtensionTest extends TestCase
{
    public function testExtensionIsLoadedWithItsClasses(): void
    {
        $this->assertTrue(extension_loaded('pcr_email'));
        $ext = new ReflectionExtension('pcr_email');
        $names = array_keys($ext->getClasses());
        sort($names);
        $this->assertSame([
            'PCR_Utility_EmailAuthException',
            'PCR_Utility_EmailConfigException',
            'PCR_Utility_EmailException',
            'PCR_Utility_EmailHost',
            'PCR_Utility_EmailMailboxException',
            'PCR_Utility_EmailManager',
            'PCR_Utility_EmailTransportException',
        ], $names);
        $this->assertTrue(interface_exists('PCR_Utility_EmailHost'));
    }

    public function testExceptionHierarchy(): void
    {
        $this->assertTrue(is_subclass_of('PCR_Utility_EmailException', RuntimeException::class));
        foreach (['Config', 'Transport', 'Mailbox', 'Auth'] as $kind) {
            $this->assertTrue(
                is_subclass_of("PCR_Utility_Email{$kind}Exception", 'PCR_Utility_EmailException'),
                $kind
            );
        }
        // They behave as ordinary exceptions: PHP code can create and catch them.
        $e = new PCR_Utility_EmailTransportException('refused', 7);
        $this->assertSame('refused', $e->getMessage());
        $this->assertSame(7, $e->getCode());
        $this->assertNull($e->smtpCode);
        $this->assertFalse($e->transient);
    }

    public function testIniSettingsAndDefaults(): void
    {
        [$code, $out] = run_php('echo ini_get("pcr_email.config"), "|", ini_get("pcr_email.environment");');
        $this->assertSame(0, $code);
        $this->assertSame('/var/www/pcr360/configs/pcr360.ini|', $out);
        [$code, $out] = run_php(
            'echo ini_get("pcr_email.config");',
            ['pcr_email.config' => '/etc/x.ini']
        );
        $this->assertSame('/etc/x.ini', $out);
        // PHP_INI_SYSTEM|PHP_INI_PERDIR: a script cannot change it at run time.
        $all = ini_get_all('pcr_email');
        $this->assertSame(INI_SYSTEM | INI_PERDIR, $all['pcr_email.config']['access']);
        $this->assertSame(INI_SYSTEM | INI_PERDIR, $all['pcr_email.environment']['access']);
        $this->assertFalse(@ini_set('pcr_email.config', '/tmp/other.ini'));
    }

    public function testPhpinfoShowsVersionAndEffectiveSettings(): void
    {
        [$code, $out] = run_php(
            'phpinfo(INFO_MODULES);',
            ['pcr_email.config' => '/srv/pcr/pcr360.ini'],
            ['APPLICATION_ENV' => 'staging']
        );
        $this->assertSame(0, $code);
        $this->assertMatchesRegularExpression('/^pcr_email$/m', $out);
        $this->assertStringContainsString('Version => ' . (new ReflectionExtension('pcr_email'))->getVersion(), $out);
        $this->assertStringContainsString('Effective pcr_email.config => /srv/pcr/pcr360.ini', $out);
        $this->assertStringContainsString('Effective pcr_email.environment => staging', $out);
        // The memory setting the module applies at start (src/malloc.rs), and whether glibc took it.
        $this->assertStringContainsString('glibc malloc => M_MMAP_THRESHOLD = 64 KiB', $out);
    }

    public function testTypedSignatures(): void
    {
        $m = new ReflectionClass('PCR_Utility_EmailManager');
        $p = $m->getMethod('eventCheckMail')->getParameters()[0];
        $this->assertSame('object|array|string|null', (string) $p->getType());
        $this->assertSame('string|int', (string) $m->getMethod('checkAccount')->getParameters()[0]->getType());
        $this->assertSame('array', (string) $m->getMethod('send')->getReturnType());
        $ctor = $m->getConstructor()->getParameters();
        $this->assertSame('?PCR_Utility_EmailHost', (string) $ctor[2]->getType());
        $enc = $m->getMethod('encryptPassword');
        $this->assertTrue($enc->isStatic());
        $attrs = $enc->getParameters()[0]->getAttributes();
        $this->assertCount(1, $attrs);
        $this->assertSame('SensitiveParameter', $attrs[0]->getName());
    }

    public function testReflectionCliListsTheApi(): void
    {
        exec(escapeshellarg(PHP_BINARY) . ' -d extension=' . escapeshellarg(test_env('PCR_EMAIL_SO'))
            . ' --re pcr_email', $lines, $code);
        $text = implode("\n", $lines);
        $this->assertSame(0, $code);
        foreach (['eventCheckMail', 'sendBatch', 'resolveAccount', 'checkAccount', 'encryptPassword',
                  'setDefaultHost', 'createInquiry', 'addToThread', 'deliverMessage', 'logError'] as $name) {
            $this->assertStringContainsString("method $name ", $text);
        }
    }

    public function testStubsMatchTheBuiltExtension(): void
    {
        $root = dirname(__DIR__, 2);
        [$code, $out, $err] = run_php('require ' . var_export($root . '/php/gen-stubs.php', true) . ';');
        $this->assertSame(0, $code, $err);
        $this->assertSame(
            file_get_contents($root . '/stubs/pcr_email.stub.php'),
            $out,
            'stubs/pcr_email.stub.php drifted from the extension: run scripts/stubs.sh and commit'
        );
    }
}
