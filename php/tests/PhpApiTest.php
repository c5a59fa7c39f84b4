<?php
declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/**
 * The extension as a PHP developer meets it: PHP's own TypeErrors and coercions, typed
 * exception properties, stubs whose signatures are the extension's and whose PHPDoc carries
 * the array shapes and @throws, and the $mail / Event Data details of SPEC §5.
 */
final class PhpApiTest extends TestCase
{
    private const EXCEPTIONS = [
        'PCR_Utility_EmailException',
        'PCR_Utility_EmailConfigException',
        'PCR_Utility_EmailTransportException',
        'PCR_Utility_EmailMailboxException',
        'PCR_Utility_EmailAuthException',
    ];

    private string $dir;

    protected function setUp(): void
    {
        $this->dir = temp_dir('pcr-phpapi-');
    }

    private function ini(): string
    {
        return write_ini($this->dir, [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/out',
            'STATE_DIR' => $this->dir . '/state',
            'LOG_FILE' => $this->dir . '/email.log',
        ]);
    }

    /** The message of the Throwable $f throws, prefixed with its class. */
    private static function thrown(callable $f): string
    {
        try {
            $f();
        } catch (Throwable $e) {
            return get_class($e) . ': ' . $e->getMessage();
        }
        return 'nothing thrown';
    }

    // ---- TypeErrors and coercion as PHP's own functions do them ----------------------------

    public function testTypeErrorsNameTheMethodAndTheParameterAsPhpDoes(): void
    {
        // This file declares strict_types=1: PHP would refuse every one of these.
        $m = new PCR_Utility_EmailManager($this->ini(), 'prod');
        $cases = [
            'PCR_Utility_EmailManager::send(): Argument #1 ($message) must be of type array, string given'
                => fn () => $m->send('x'),
            'PCR_Utility_EmailManager::send(): Argument #1 ($message) must be of type array, null given'
                => fn () => $m->send(null),
            'PCR_Utility_EmailManager::sendBatch(): Argument #1 ($messages) must be of type array, int given'
                => fn () => $m->sendBatch(5),
            'PCR_Utility_EmailManager::resolveAccount(): Argument #2 ($tenant) must be of type int, string given'
                => fn () => $m->resolveAccount('general', '1'),
            'PCR_Utility_EmailManager::resolveAccount(): Argument #1 ($kind) must be of type string, array given'
                => fn () => $m->resolveAccount([]),
            'PCR_Utility_EmailManager::checkAccount(): Argument #1 ($recid) must be of type string|int, float given'
                => fn () => $m->checkAccount(1.0),
            'PCR_Utility_EmailManager::eventCheckMail(): Argument #1 ($data) must be of type object|array|string|null, int given'
                => fn () => $m->eventCheckMail(5),
            'PCR_Utility_EmailManager::authorizationUrl(): Argument #1 ($recid) must be of type int, string given'
                => fn () => $m->authorizationUrl('7', 'https://x/core/oauth2/validated'),
            'PCR_Utility_EmailManager::__construct(): Argument #3 ($host) must be of type ?PCR_Utility_EmailHost, stdClass given'
                => fn () => new PCR_Utility_EmailManager($this->ini(), 'prod', new stdClass()),
            'PCR_Utility_EmailManager::setDefaultHost(): Argument #1 ($host) must be of type PCR_Utility_EmailHost, string given'
                => fn () => PCR_Utility_EmailManager::setDefaultHost('host'),
            'PCR_Utility_EmailManager::encryptPassword(): Argument #2 ($configFile) must be of type ?string, int given'
                => fn () => PCR_Utility_EmailManager::encryptPassword('secret', 5),
        ];
        foreach ($cases as $expected => $call) {
            $this->assertSame('TypeError: ' . $expected, self::thrown($call));
        }
        // The same wording as PHP's own functions in the same situation.
        $this->assertSame('TypeError: array_keys(): Argument #1 ($array) must be of type array, string given',
            self::thrown(fn () => array_keys('x')));
    }

    public function testNumericStringsAreCoercedWhereNonStrictPhpWouldCoerceThem(): void
    {
        // A caller without strict_types (PCR-360's code): '1' from Zend_Db is the tenant 1.
        $ini = $this->ini();
        [$code, $out, $err] = run_php(
            '$m = new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod");'
            . '$r = [$m->resolveAccount("general", "1"), $m->resolveAccount("general", 1),'
            . ' $m->resolveAccount("general", 1.0), $m->resolveAccount("general", " 1")];'
            . 'echo json_encode($r), "\n";'
            . 'try { $m->resolveAccount("general", "1 tenant"); } catch (TypeError $e) { echo $e->getMessage(), "\n"; }'
            . 'try { $m->send("x"); } catch (TypeError $e) { echo $e->getMessage(), "\n"; }'
            . 'try { $m->checkAccount(41.0); } catch (PCR_Utility_EmailException $e) { echo get_class($e), ": ", $e->getMessage(), "\n"; }'
            . 'echo json_encode($m->checkAccount("master")["RECID"]), "\n";'
        );
        $this->assertSame(0, $code, $err);
        $this->assertSame('', $err);
        $lines = explode("\n", rtrim($out));
        $r = json_decode($lines[0], true);
        $this->assertCount(4, $r);
        $this->assertSame('master', $r[0]['RECID']);
        $this->assertSame([$r[0], $r[0], $r[0]], [$r[1], $r[2], $r[3]]);
        // Not numeric: PHP refuses it in either mode.
        $this->assertSame(
            'PCR_Utility_EmailManager::resolveAccount(): Argument #2 ($tenant) must be of type int, string given',
            $lines[1]
        );
        // Arrays are never coerced.
        $this->assertSame(
            'PCR_Utility_EmailManager::send(): Argument #1 ($message) must be of type array, string given',
            $lines[2]
        );
        // int|string: an integral float is the RECID 41, as PHP's own int|string parameters take it.
        $this->assertStringContainsString('RECID 41', $lines[3]);
        $this->assertSame('"master"', $lines[4]);
    }

    public function testNullForAScalarParameterIsDeprecatedNotRefusedInNonStrictMode(): void
    {
        $ini = $this->ini();
        [$code, $out, $err] = run_php(
            '$m = new PCR_Utility_EmailManager(' . var_export($ini, true) . ', "prod");'
            . 'echo json_encode($m->resolveAccount("general", null)["RECID"]);',
            ['error_reporting' => (string) E_ALL, 'display_errors' => 'stderr']
        );
        $this->assertSame(0, $code, $err);
        $this->assertSame('"master"', $out);
        $this->assertStringContainsString(
            'PCR_Utility_EmailManager::resolveAccount(): Passing null to parameter #2 ($tenant) of type int is deprecated',
            $err
        );
        // With strict_types, null is a TypeError (this file).
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        $this->assertSame(
            'TypeError: PCR_Utility_EmailManager::resolveAccount(): Argument #2 ($tenant) must be of type int, null given',
            self::thrown(fn () => $m->resolveAccount('general', null))
        );
    }

    // ---- typed exception properties --------------------------------------------------------

    public function testExceptionPropertiesAreTyped(): void
    {
        $expected = [
            'PCR_Utility_EmailTransportException' => ['account' => '?string', 'server' => '?string',
                'smtpCode' => '?int', 'transient' => 'bool'],
            'PCR_Utility_EmailMailboxException' => ['account' => '?string', 'server' => '?string'],
            'PCR_Utility_EmailAuthException' => ['account' => '?string'],
        ];
        foreach ($expected as $class => $props) {
            foreach ($props as $name => $type) {
                $p = new ReflectionProperty($class, $name);
                $this->assertSame($type, (string) $p->getType(), "$class::\$$name");
                $this->assertTrue($p->isPublic());
            }
        }
        $e = new PCR_Utility_EmailTransportException('refused');
        $this->assertNull($e->smtpCode);
        $this->assertFalse($e->transient);
        // PHP enforces the types: a wrong value is refused (strict mode here).
        $this->assertStringStartsWith('TypeError: Cannot assign string to property PCR_Utility_EmailTransportException::$smtpCode of type ?int',
            self::thrown(function () use ($e) { $e->smtpCode = 'x'; }));
        $e->smtpCode = 550;
        $e->transient = true;
        $this->assertSame(550, $e->smtpCode);
    }

    public function testAThrownTransportExceptionCarriesTypedValues(): void
    {
        // An SMTP server that does not exist: port 1 on localhost refuses the connection.
        $ini = write_ini($this->dir, [
            'EMAIL' => 'desk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'SMTP',
            'OUTGOING_HOST' => '127.0.0.1',
            'OUTGOING_PORT' => 1,
            'STATE_DIR' => $this->dir . '/state',
            'LOG_FILE' => $this->dir . '/email.log',
        ]);
        $m = new PCR_Utility_EmailManager($ini, 'prod');
        try {
            $m->send(['to' => 'a@example.edu', 'subject' => 's', 'text' => 't']);
            $this->fail('sent to a closed port');
        } catch (PCR_Utility_EmailTransportException $e) {
            $this->assertSame('master', $e->account);
            $this->assertIsString($e->server);
            $this->assertIsBool($e->transient);
            $this->assertTrue($e->smtpCode === null || is_int($e->smtpCode));
        }
    }

    // ---- the stubs ---------------------------------------------------------------------------

    /** PHP code that prints the signatures of the extension's classes as JSON. */
    private const SIGNATURES = <<<'PHP'
        $classes = ['PCR_Utility_EmailHost', 'PCR_Utility_EmailManager', 'PCR_Utility_EmailException',
            'PCR_Utility_EmailConfigException', 'PCR_Utility_EmailTransportException',
            'PCR_Utility_EmailMailboxException', 'PCR_Utility_EmailAuthException'];
        $out = [];
        foreach ($classes as $name) {
            $c = new ReflectionClass($name);
            $entry = ['interface' => $c->isInterface(), 'final' => $c->isFinal(),
                'parent' => $c->getParentClass() ? $c->getParentClass()->getName() : null,
                'interfaces' => $c->getInterfaceNames(), 'methods' => [], 'properties' => []];
            sort($entry['interfaces']);
            foreach ($c->getMethods() as $m) {
                if ($m->getDeclaringClass()->getName() !== $name) continue;
                $params = [];
                foreach ($m->getParameters() as $p) {
                    $params[] = [$p->getName(), (string) $p->getType(), $p->isOptional(),
                        $p->isDefaultValueAvailable() ? var_export($p->getDefaultValue(), true) : null,
                        $p->isVariadic(), $p->isPassedByReference(),
                        array_map(fn ($a) => $a->getName(), $p->getAttributes())];
                }
                $entry['methods'][$m->getName()] = [$m->isStatic(), $m->isPublic(), (string) $m->getReturnType(), $params];
            }
            ksort($entry['methods']);
            foreach ($c->getProperties() as $p) {
                if ($p->getDeclaringClass()->getName() !== $name) continue;
                $entry['properties'][$p->getName()] = [(string) $p->getType(), $p->isPublic(),
                    $p->hasDefaultValue() ? var_export($p->getDefaultValue(), true) : null];
            }
            ksort($entry['properties']);
            $out[$name] = $entry;
        }
        echo json_encode($out, JSON_PRETTY_PRINT);
        PHP;

    private static function stubPath(): string
    {
        return dirname(__DIR__, 2) . '/stubs/pcr_email.stub.php';
    }

    /** Runs $code in a PHP without the extension (and without php.ini) that has loaded the stubs. */
    private static function withStubsOnly(string $code): array
    {
        $cmd = [PHP_BINARY, '-n', '-r', 'require ' . var_export(self::stubPath(), true) . ';' . $code];
        $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes);
        $out = stream_get_contents($pipes[1]);
        $err = stream_get_contents($pipes[2]);
        fclose($pipes[1]);
        fclose($pipes[2]);
        return [proc_close($proc), $out, $err];
    }

    public function testStubsParseAndDeclareWhatTheExtensionHas(): void
    {
        exec(escapeshellarg(PHP_BINARY) . ' -n -l ' . escapeshellarg(self::stubPath()) . ' 2>&1', $lint, $code);
        $this->assertSame(0, $code, implode("\n", $lint));

        [$code, $fromStubs, $err] = self::withStubsOnly(self::SIGNATURES);
        $this->assertSame(0, $code, $err);
        [$code, $fromExtension, $err] = run_php(self::SIGNATURES);
        $this->assertSame(0, $code, $err);
        $this->assertNotEmpty(json_decode($fromExtension, true));
        $this->assertSame($fromExtension, $fromStubs, 'the stubs declare what the extension has');
    }

    public function testStubsDocumentShapesAndThrows(): void
    {
        $code = <<<'PHP'
            $out = [];
            foreach (['PCR_Utility_EmailHost', 'PCR_Utility_EmailManager'] as $name) {
                foreach ((new ReflectionClass($name))->getMethods() as $m) {
                    $out["$name::" . $m->getName()] = [
                        'doc' => (string) $m->getDocComment(),
                        'params' => array_map(fn ($p) => [$p->getName(), (string) $p->getType()], $m->getParameters()),
                        'return' => (string) $m->getReturnType(),
                    ];
                }
            }
            foreach (['PCR_Utility_EmailTransportException', 'PCR_Utility_EmailMailboxException', 'PCR_Utility_EmailAuthException'] as $name) {
                foreach ((new ReflectionClass($name))->getProperties(ReflectionProperty::IS_PUBLIC) as $p) {
                    $out["$name::\$" . $p->getName()] = ['doc' => (string) $p->getDocComment(), 'type' => (string) $p->getType()];
                }
            }
            echo json_encode($out);
            PHP;
        [$exit, $out, $err] = self::withStubsOnly($code);
        $this->assertSame(0, $exit, $err);
        $docs = json_decode($out, true);
        $this->assertArrayHasKey('PCR_Utility_EmailManager::send', $docs);
        foreach ($docs as $key => $info) {
            $doc = $info['doc'];
            $this->assertNotSame('', $doc, "$key has PHPDoc");
            if (!isset($info['params'])) {
                continue;
            }
            $this->assertMatchesRegularExpression('/@throws \\\\\w+/', $doc, "$key says what it throws");
            foreach ($info['params'] as [$param, $type]) {
                if (preg_match('/\barray\b/', $type)) {
                    // A shape (array{...}), a list<...> or array<...> of shapes: never a bare "array".
                    $this->assertMatchesRegularExpression(
                        '/@param\s+(array\{|list<|array<)[\s\S]*?\$' . $param . '\b/', $doc, "$key: \$$param has a shape");
                }
            }
            if (preg_match('/\barray\b/', $info['return'])) {
                $this->assertMatchesRegularExpression('/@return\s+(array\{|list<|array<)/', $doc, "$key: the result has a shape");
            }
        }
        // The shapes name the keys of SPEC §5.
        foreach (['status:', 'message_id:', 'transport:'] as $k) {
            $this->assertStringContainsString($k, $docs['PCR_Utility_EmailManager::send']['doc']);
        }
        foreach (['sd_number: string|null', 'message_key: string', 'attempt: int', 'attachments: list<'] as $k) {
            $this->assertStringContainsString($k, $docs['PCR_Utility_EmailHost::createInquiry']['doc']);
        }
        foreach (['mailboxes: list<', 'totals: array{', 'inquiries: int'] as $k) {
            $this->assertStringContainsString($k, $docs['PCR_Utility_EmailManager::eventCheckMail']['doc']);
        }
        $this->assertStringContainsString("'failed'", $docs['PCR_Utility_EmailManager::sendBatch']['doc']);
        $this->assertStringContainsString('ok: bool', $docs['PCR_Utility_EmailManager::checkAccount']['doc']);
        $this->assertStringContainsString('@throws \PCR_Utility_EmailTransportException', $docs['PCR_Utility_EmailManager::send']['doc']);
        $this->assertSame('?int', $docs['PCR_Utility_EmailTransportException::$smtpCode']['type']);
        $this->assertSame('bool', $docs['PCR_Utility_EmailTransportException::$transient']['type']);
    }

    public function testStubsPhpDocParsesWithPhpStansParser(): void
    {
        // Debian's php-phpstan-phpdoc-parser (scripts/install-deps.sh installs it).
        $autoload = '/usr/share/php/PHPStan/PhpDocParser/autoload.php';
        if (!is_file($autoload)) {
            $this->markTestSkipped('php-phpstan-phpdoc-parser is not installed');
        }
        require_once $autoload;
        $lexer = new PHPStan\PhpDocParser\Lexer\Lexer();
        $const = new PHPStan\PhpDocParser\Parser\ConstExprParser();
        $parser = new PHPStan\PhpDocParser\Parser\PhpDocParser(new PHPStan\PhpDocParser\Parser\TypeParser($const), $const);
        preg_match_all('#/\*\*.*?\*/#s', (string) file_get_contents(self::stubPath()), $m);
        $tags = 0;
        foreach ($m[0] as $doc) {
            $node = $parser->parse(new PHPStan\PhpDocParser\Parser\TokenIterator($lexer->tokenize($doc)));
            foreach ($node->getTags() as $tag) {
                $tags++;
                $this->assertNotInstanceOf(PHPStan\PhpDocParser\Ast\PhpDoc\InvalidTagValueNode::class, $tag->value,
                    "$tag->name in $doc: " . ($tag->value->exception ?? null)?->getMessage());
            }
        }
        $this->assertGreaterThan(40, $tags);
    }

    // ---- Event Data and $mail ----------------------------------------------------------------

    private function maildirHost(string $maildir): TestHost
    {
        $host = new TestHost();
        $host->accounts = [[
            'RECID' => 51,
            'TENANTS_RECID' => 1,
            'ACCOUNT_TYPE' => 'service_desk',
            'EMAIL' => 'helpdesk@test.local',
            'OUTGOING_TRANSPORT_TYPE' => 'FILE',
            'FILE_PATH' => $this->dir . '/sd-out',
            'INCOMING_MAILBOX_TYPE' => 'MAILDIR',
            'INCOMING_PATH' => $maildir,
        ]];
        return $host;
    }

    private static function message(string $subject): string
    {
        return "From: Customer <customer@example.org>\r\nTo: helpdesk@test.local\r\n"
            . "Subject: $subject\r\nDate: Tue, 05 Mar 2024 14:22:01 -0500\r\n"
            . 'Message-ID: <' . token('msg') . "@example.org>\r\n\r\nHello.\r\n";
    }

    public function testEventDataHostGivenAsAUrlIsItsHostName(): void
    {
        $maildir = maildir_create($this->dir);
        $forms = [
            ['host' => 'https://pcr360.example.edu/'],
            ['host' => 'https://pcr360.example.edu:8443/pcr360/'],
            '{"host":"http://PCR360.example.edu"}',
            'https://pcr360.example.edu/',
        ];
        foreach ($forms as $i => $data) {
            maildir_put($maildir, self::message("url form $i"));
            $host = $this->maildirHost($maildir);
            $summary = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))->eventCheckMail($data);
            $this->assertSame('pcr360.example.edu', $summary['host'], json_encode($data));
            $this->assertSame(1, $summary['totals']['inquiries'], json_encode($summary));
            $this->assertSame('pcr360.example.edu', array_values($host->inquiries)[0]['host']);
        }
        // Not a host name, URL or not.
        $m = new PCR_Utility_EmailManager($this->ini(), 'prod', $this->maildirHost($maildir));
        foreach (['https://', 'a b', 'file:///etc/passwd'] as $bad) {
            $this->assertStringContainsString("'host' is not a host name",
                self::thrown(fn () => $m->eventCheckMail(['host' => $bad])), $bad);
        }
    }

    public function testCreateInquiryKeepsTheNumberTheSubjectNamed(): void
    {
        $maildir = maildir_create($this->dir);
        maildir_put($maildir, self::message('Re: [SO201799999] old item'));
        maildir_put($maildir, self::message('no item named'));
        $host = $this->maildirHost($maildir);
        $summary = (new PCR_Utility_EmailManager($this->ini(), 'prod', $host))
            ->eventCheckMail(['host' => 'pcr360.example.edu']);
        $this->assertSame(2, $summary['totals']['inquiries'], json_encode($summary));
        // addToThread said there is no such item: a new Inquiry, which knows the number named.
        $bySubject = array_column(array_values($host->inquiries), 'sd_number', 'subject');
        $this->assertSame(
            ['Re: [SO201799999] old item' => 'SO201799999', 'no item named' => null],
            $bySubject
        );
        $this->assertSame([], $host->threads);
    }
}
