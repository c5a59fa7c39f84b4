<?php
/**
 * The sending half of the README's main job: sends a few messages of each kind through the
 * embedded default configuration (FILE transport, no mail server) and shows where each went.
 * Run by scripts/demo.sh with pcr_email.config pointing at the demo INI.
 */
declare(strict_types=1);

require __DIR__ . '/SampleHost.php';

$host = new SampleHost(getenv('PCR_DEMO_DB') ?: ':memory:');
PCR_Utility_EmailManager::setDefaultHost($host);
$mail = new PCR_Utility_EmailManager();   // as the application does: pcr_email.config

$rows = [];
$show = function (string $what, array $r) use (&$rows) {
    $where = $r['path'] ?? ($r['reason'] ?? '');
    $rows[] = [$what, $r['status'], (string) ($r['account'] ?? '-'), $where];
};

$show('general, tenant 0', $mail->send([
    'to' => 'Ada Lovelace <ada@example.edu>',
    'subject' => 'Your password was changed',
    'text' => "Hello Ada,\n\nyour PCR-360 password was changed.",
]));
$show('general, tenant 1', $mail->send([
    'to' => ['email' => 'grace@tenant1.example.edu', 'name' => 'Grace Hopper'],
    'subject' => 'Work order WO0001 approved',
    'html' => '<p>Your work order was <b>approved</b>.</p>',
    'tenant' => 1,
]));
$show('service_desk, tenant 1', $mail->send([
    'to' => 'grace@tenant1.example.edu',
    'subject' => 'Inquiry received',
    'text' => 'We received your inquiry and will answer shortly.',
    'kind' => 'service_desk',
    'tenant' => 1,
]));
$show('sd_thread, tenant 1', $mail->send([
    'to' => 'grace@tenant1.example.edu',
    'subject' => 'RE: Phone line down',
    'text' => 'A technician is on the way.',
    'html' => '<p>A technician is on the way. <img src="cid:logo"></p>',
    'attachments' => [
        ['content' => "Ticket notes\n", 'filename' => 'notes.txt', 'content_type' => 'text/plain'],
        ['content' => base64_decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='),
         'filename' => 'logo.png', 'content_type' => 'image/png', 'inline' => true, 'content_id' => 'logo'],
    ],
    'kind' => 'sd_thread',
    'tenant' => 1,
    'sd_number' => 'SO201700043',
]));
$show('sd_thread, tenant 2 (no SD account)', $mail->send([
    'to' => 'someone@tenant2.example.edu',
    'subject' => 'RE: item',
    'text' => 'not sent: tenant 2 has no Service Desk account',
    'kind' => 'sd_thread',
    'tenant' => 2,
    'sd_number' => 'IQ00007',
]));
foreach ($mail->sendBatch([
    ['to' => 'a@example.edu', 'subject' => 'Batch 1', 'text' => 'one'],
    ['to' => 'b@example.edu', 'subject' => 'Batch 2', 'text' => 'two', 'tenant' => 1],
    ['to' => 'not an address', 'subject' => 'Batch 3', 'text' => 'three'],
]) as $i => $r) {
    $rows[] = ['sendBatch #' . ($i + 1), $r['status'], (string) ($r['account'] ?? '-'), $r['path'] ?? ($r['error'] ?? '')];
}

echo "== Sending (FILE transport: each message is an .eml file)\n";
printf("%-36s %-8s %-8s %s\n", 'message', 'status', 'account', 'where');
foreach ($rows as [$what, $status, $account, $where]) {
    printf("%-36s %-8s %-8s %s\n", $what, $status, $account, $where);
}
echo "\nresolveAccount('sd_thread', 1): ", json_encode($mail->resolveAccount('sd_thread', 1)), "\n";
echo "checkAccount('master'): ", json_encode($mail->checkAccount('master')), "\n";
