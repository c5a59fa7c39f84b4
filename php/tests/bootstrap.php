<?php
declare(strict_types=1);

// PHP-level tests run with the built extension loaded (php/run-tests.sh passes -d extension=).
if (!extension_loaded('pcr_email')) {
    fwrite(STDERR, "pcr_email is not loaded: run php/run-tests.sh\n");
    exit(2);
}

require_once __DIR__ . '/TestHost.php';

/** A value from the test servers' environment (.testenv/env); a missing one fails the test. */
function test_env(string $name): string
{
    $v = getenv($name);
    if ($v === false || $v === '') {
        throw new RuntimeException("$name is not set: start the servers with scripts/test-servers.sh start");
    }
    return $v;
}

/** A fresh directory under the system temp dir, removed at exit. */
function temp_dir(string $prefix = 'pcr-email-'): string
{
    $dir = sys_get_temp_dir() . '/' . $prefix . bin2hex(random_bytes(6));
    mkdir($dir, 0700, true);
    register_shutdown_function(function () use ($dir) {
        exec('rm -rf ' . escapeshellarg($dir));
    });
    return $dir;
}

/**
 * Writes a pcr360.ini with a [prod] section holding $email (email.* keys) and $constants, and
 * a [test : prod] section overriding with $test. Returns its path.
 */
function write_ini(string $dir, array $email, array $constants = [], array $test = []): string
{
    $lines = ["; written by the PHP tests", "[prod]"];
    foreach ($constants as $k => $v) {
        $lines[] = "constants.$k = " . ini_value($v);
    }
    foreach ($email as $k => $v) {
        $lines[] = "email.$k = " . ini_value($v);
    }
    $lines[] = '';
    $lines[] = '[test : prod]';
    foreach ($test as $k => $v) {
        $lines[] = "$k = " . ini_value($v);
    }
    @mkdir($dir . '/configs', 0700, true);
    $path = $dir . '/configs/pcr360.ini';
    file_put_contents($path, implode("\n", $lines) . "\n");
    return $path;
}

function ini_value($v): string
{
    if (is_bool($v)) {
        return $v ? 'true' : 'false';
    }
    if (is_int($v)) {
        return (string) $v;
    }
    return '"' . $v . '"';
}

/** Runs PHP code in a child process with the extension and extra -d settings; returns [exit, stdout, stderr]. */
function run_php(string $code, array $ini = [], array $env = []): array
{
    $so = test_env('PCR_EMAIL_SO');
    $cmd = [PHP_BINARY, '-d', "extension=$so"];
    foreach ($ini as $k => $v) {
        $cmd[] = '-d';
        $cmd[] = "$k=$v";
    }
    $cmd[] = '-r';
    $cmd[] = 'require ' . var_export(__DIR__ . '/TestHost.php', true) . ';' . $code;
    $proc = proc_open($cmd, [1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env + getenv());
    $out = stream_get_contents($pipes[1]);
    $err = stream_get_contents($pipes[2]);
    fclose($pipes[1]);
    fclose($pipes[2]);
    return [proc_close($proc), $out, $err];
}

/** A token unique to one test, to find its mail among everything the servers received. */
function token(string $tag = 't'): string
{
    return $tag . '-' . bin2hex(random_bytes(5));
}

/**
 * Waits (up to $seconds) for mail received by the local SMTP server on $port whose raw text
 * contains $needle; returns a list of ['meta' => envelope array, 'raw' => string].
 */
function smtp_received(int $port, string $needle, int $expect = 1, float $seconds = 10.0): array
{
    $dir = test_env('PCR_SMTP_DROP_DIR') . '/' . $port;
    $deadline = microtime(true) + $seconds;
    do {
        $found = [];
        foreach (glob($dir . '/*.eml') ?: [] as $eml) {
            $raw = (string) @file_get_contents($eml);
            if (strpos($raw, $needle) !== false) {
                $meta = json_decode((string) @file_get_contents(substr($eml, 0, -4) . '.json'), true);
                $found[] = ['meta' => $meta, 'raw' => $raw];
            }
        }
        if (count($found) >= $expect) {
            return $found;
        }
        usleep(50000);
    } while (microtime(true) < $deadline);
    return $found;
}

/** email.* keys of a master account on the local STARTTLS+AUTH SMTP server. */
function smtp_master(array $overrides = []): array
{
    return $overrides + [
        'EMAIL' => 'desk@test.local',
        'DISPLAY_NAME' => 'PCR-360 Service Desk',
        'LOGIN' => test_env('PCR_SMTP_USER'),
        'PASSWORD' => test_env('PCR_SMTP_PASS'),
        'OUTGOING_TRANSPORT_TYPE' => 'SMTP',
        'OUTGOING_HOST' => test_env('PCR_TEST_TLS_HOST'),
        'OUTGOING_PORT' => (int) test_env('PCR_SMTP_STARTTLS_PORT'),
        'OUTGOING_SSL' => 'TLS',
        'CA_FILE' => test_env('PCR_TEST_CA'),
        'TIMEOUT' => 5,
    ];
}
