<?php
declare(strict_types=1);

/**
 * A PCR_Utility_EmailHost as PCR-360 implements it, recording every call so the tests can
 * assert what the extension asked of the application.
 */
class TestHost implements PCR_Utility_EmailHost
{
    /** @var array<int, array> tenant email account rows */
    public array $accounts = [];
    public array $blocked = [];
    public array $inquiries = [];
    public array $threads = [];
    public array $delivered = [];
    public array $errors = [];
    /** @var callable|null throws or returns for createInquiry */
    public $onCreate = null;
    /** @var string|null when set, what createInquiry returns (after storing the Inquiry) */
    public ?string $returnSd = null;
    public int $next = 1;

    public function emailAccounts(): array
    {
        return $this->accounts;
    }

    public function blockedEmails(): array
    {
        return $this->blocked;
    }

    public function createInquiry(array $mail): string
    {
        if ($this->onCreate !== null) {
            ($this->onCreate)($mail);
        }
        $sd = sprintf('IQ%05d', $this->next++);
        $this->inquiries[$sd] = $mail;
        return $this->returnSd ?? $sd;
    }

    public function addToThread(string $sdNumber, array $mail): bool
    {
        if (!isset($this->inquiries[$sdNumber])) {
            return false;
        }
        $this->threads[$sdNumber][] = $mail;
        return true;
    }

    public function deliverMessage(array $message): void
    {
        $this->delivered[] = $message;
    }

    public function logError(string $message, array $context): void
    {
        $this->errors[] = ['message' => $message, 'context' => $context];
    }
}
