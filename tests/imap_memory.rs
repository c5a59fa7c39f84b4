//! Peak memory of an IMAP download (its own test binary: the counting allocator sees every
//! thread, so nothing else may run beside it). The target: below 3× the largest message plus
//! a fixed overhead, however many messages are fetched.

mod common;
#[path = "common/counting.rs"]
mod counting;

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, Secret, SslMode,
    TlsSettings,
};
use pcr_email::incoming::imap::ImapMailbox;
use pcr_email::incoming::{Flow, Mailbox};
use pcr_email::state::StateStore;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

const MESSAGE: usize = 2 * 1024 * 1024;
const COUNT: usize = 12;

#[test]
fn downloading_many_large_messages_holds_about_one_at_a_time() {
    let user = common::mail_user("imapuser");
    let token = common::unique_token("memory");
    let folder = format!("T-{token}");
    {
        let tcp =
            TcpStream::connect((common::host().as_str(), common::port("PCR_IMAP_PORT"))).unwrap();
        let mut client = imap::Client::new(tcp);
        client.read_greeting().unwrap();
        let mut admin = client
            .login(&user.email, &user.password)
            .map_err(|(e, _)| e)
            .unwrap();
        admin.create(&folder).unwrap();
        for n in 0..COUNT {
            let mut raw =
                format!("Subject: {token} {n}\r\nMessage-ID: <{token}.{n}@x>\r\n\r\n").into_bytes();
            while raw.len() < MESSAGE {
                raw.extend_from_slice(
                    b"The quick brown fox jumps over the lazy dog 0123456789.\r\n",
                );
            }
            admin.append(&folder, &raw).finish().unwrap();
        }
        admin.logout().unwrap();
    }

    let state = tempfile::tempdir().unwrap();
    let account = Account {
        id: AccountId::Master,
        tenants_recid: 0,
        account_type: AccountType::Master,
        email: user.email.clone(),
        display_name: None,
        login: None,
        password: Some(Secret::new(user.password.clone())),
        outgoing: None,
        incoming: Some(Incoming {
            mailbox: MailboxType::Imap,
            host: Some(common::tls_host()),
            port: common::port("PCR_IMAPS_PORT"),
            ssl: SslMode::Ssl,
            folder: folder.clone(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: true,
            ca_file: Some(common::ca_file()),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
        timeout: Duration::from_secs(20),
        auth_type: Default::default(),
        oauth: None,
    };
    let mut mailbox =
        ImapMailbox::connect(&account, StateStore::open(state.path(), None).unwrap()).unwrap();
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), COUNT);
    let largest = listed.iter().map(|l| l.size as usize).max().unwrap();
    let ids: Vec<String> = listed.into_iter().map(|l| l.id).collect();

    let baseline = counting::start();
    let mut fetched = 0usize;
    mailbox
        .fetch_each(&ids, &mut |m| {
            assert!(m.raw.len() <= largest && m.raw.len() >= MESSAGE);
            fetched += 1;
            Flow::Continue
        })
        .unwrap();
    let peak = counting::peak_since(baseline);
    assert_eq!(fetched, COUNT);
    assert!(
        mailbox.stats().body_fetches >= 3,
        "several batches: {:?}",
        mailbox.stats()
    );
    let allowed = 3 * largest + 1024 * 1024;
    eprintln!("peak {peak} bytes while fetching {COUNT} messages of up to {largest} bytes");
    assert!(
        peak < allowed,
        "peak {peak} bytes for {COUNT} messages of {largest} (allowed {allowed})"
    );
    Box::new(mailbox).finish().unwrap();
}
