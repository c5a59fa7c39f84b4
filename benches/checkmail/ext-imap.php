<?php
/**
 * Benchmark (b): the same job the way PHP code does it today with ext-imap (c-client): one
 * mailbox after the other, `imap_open`, the unseen messages, then per message
 * `imap_fetchheader` + `imap_body` (each its own round trip to the server). Nothing is parsed.
 *
 *   php ext-imap.php        (environment as for check.php; BENCH_SSL = SSL uses /ssl)
 *
 * Prints one JSON line: seconds, messages and bytes per mailbox. Exits 1 on a wrong count.
 */
declare(strict_types=1);

function env(string $name): string
{
    $v = getenv($name);
    if ($v === false) {
        fwrite(STDERR, "ext-imap.php: $name is not set\n");
        exit(2);
    }
    return $v;
}

if (!function_exists('imap_open')) {
    fwrite(STDERR, "ext-imap.php: ext-imap is not loaded (apt-get install php8.2-imap)\n");
    exit(2);
}
$ports = explode(',', env('BENCH_PORTS'));
$users = explode(',', env('BENCH_USERS'));
$flags = env('BENCH_SSL') === 'SSL' ? '/imap/ssl/novalidate-cert' : '/imap/notls';
$expect = (int) env('BENCH_EXPECT');
imap_timeout(IMAP_OPENTIMEOUT, 60);
imap_timeout(IMAP_READTIMEOUT, 120);

$started = hrtime(true);
$out = [];
$problems = [];
foreach ($users as $i => $user) {
    $local = strtoupper(strstr($user, '@', true) ?: $user);
    $spec = '{' . env('BENCH_HOST') . ':' . $ports[$i] . $flags . '}INBOX';
    $mbox = imap_open($spec, $user, env("PCR_PASS_$local"), 0, 1);
    if ($mbox === false) {
        fwrite(STDERR, "imap_open $spec failed: " . imap_last_error() . "\n");
        exit(1);
    }
    $ids = imap_search($mbox, 'UNSEEN') ?: [];
    $bytes = 0;
    foreach ($ids as $n) {
        $header = imap_fetchheader($mbox, $n);
        $body = imap_body($mbox, $n);
        $bytes += strlen($header) + strlen($body);
    }
    imap_close($mbox);
    $out[] = ['user' => $user, 'messages' => count($ids), 'bytes' => $bytes];
    if (count($ids) !== $expect) {
        $problems[] = "$user: " . count($ids) . " messages, expected $expect";
    }
}
$seconds = (hrtime(true) - $started) / 1e9;
imap_errors();   // c-client queues notices; not ours to print
echo json_encode(['seconds' => round($seconds, 4), 'mailboxes' => $out, 'problems' => $problems]), "\n";
exit($problems === [] ? 0 : 1);
