//! Sending benchmark: 200 messages of ~10 KB to the STARTTLS+AUTH test server, directly and
//! through the test environment's delay proxy (`tests/servers/delay_proxy.py`, 10 ms each way
//! by default), comparing
//!   (a) `send_batch` over one SMTP transport,
//!   (b) a loop of `send()` calls on one kept transport,
//!   (c) the floor: a minimal hand-written client (std + native-tls: STARTTLS, AUTH PLAIN,
//!       pipelined MAIL/RCPT/DATA) on 4 parallel connections.
//! Round trips are measured by a relay in front of the server that counts how often the server
//! starts talking after the client did (the TLS handshake included).
//!
//! Run: `scripts/test-servers.sh start && cargo bench --bench send`
//! Options (after `--`): `--messages N` (200), `--delays 0,10` (ms each way), `--parallel 4`,
//! `--repeat R` (3: the three methods run interleaved R times; best and median are shown, as
//! the shared test server and machine make single runs noisy).
//! Every run checks that the server received every message.
//!
//! `--body-mb 4,100` instead times `build()` alone (no server needed) for one message whose
//! text is that many MB with LF, CRLF or CR line ends or one long line, and checks that the
//! built message decodes back to the text with CRLF line ends (`DIFFERS` when it does not).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use pcr_email::config::{
    Account, AccountId, AccountType, Outgoing, Secret, SslMode, TlsSettings, TransportType,
};
use pcr_email::outgoing::message::{build, BuiltMessage, MessageRequest};
use pcr_email::outgoing::smtp::SmtpTransport;
use pcr_email::outgoing::{send_batch, BatchJob, Transport};

const KEY: [u8; 32] = [5u8; 32];

struct Options {
    body_mb: Vec<usize>,
    messages: usize,
    delays: Vec<u64>,
    parallel: usize,
    repeat: usize,
}

fn options() -> Options {
    let mut o = Options {
        body_mb: Vec::new(),
        messages: 200,
        delays: vec![0, 10],
        parallel: 4,
        repeat: 3,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--messages" => o.messages = value.parse().expect("--messages N"),
            "--delays" => {
                o.delays = value
                    .split(',')
                    .map(|d| d.trim().parse().expect("--delays 0,10"))
                    .collect()
            }
            "--body-mb" => {
                o.body_mb = value
                    .split(',')
                    .map(|d| d.trim().parse().expect("--body-mb 4,100"))
                    .collect()
            }
            "--parallel" => o.parallel = value.parse().expect("--parallel N"),
            "--repeat" => o.repeat = value.parse::<usize>().expect("--repeat R").max(1),
            // `cargo bench` passes `--bench`; ignore what is not ours.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

// ---- a relay that counts round trips ---------------------------------------------------

#[derive(Default)]
struct TurnCounter {
    connections: AtomicU64,
    turns: AtomicU64,
}

/// Listens on an ephemeral port and forwards to `target`; counts, per connection, each time
/// the server sends after the client has sent (one round trip the client waited for).
fn counting_relay(target: u16) -> (u16, Arc<TurnCounter>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let port = listener.local_addr().unwrap().port();
    let counter = Arc::new(TurnCounter::default());
    let c = Arc::clone(&counter);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            c.connections.fetch_add(1, Ordering::Relaxed);
            let client_spoke = Arc::new(AtomicBool::new(false));
            let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let spoke = Arc::clone(&client_spoke);
            std::thread::spawn(move || pump(up.0, up.1, |_| spoke.store(true, Ordering::SeqCst)));
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                pump(server, client, |_| {
                    if client_spoke.swap(false, Ordering::SeqCst) {
                        c.turns.fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
        }
    });
    (port, counter)
}

fn pump(mut from: TcpStream, mut to: TcpStream, on_data: impl Fn(usize)) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                on_data(n);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// ---- the delay proxy of the test environment ---------------------------------------------

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_delay_proxy(listen: u16, target: u16, delay_ms: u64) -> Proxy {
    let script = PathBuf::from(common::env("PCR_TEST_SERVERS_DIR")).join("delay_proxy.py");
    let child = Command::new(common::env("PCR_TEST_PYTHON"))
        .arg(script)
        .args(["--host", "127.0.0.1", "--delay-ms", &delay_ms.to_string()])
        .arg(format!("{listen}:127.0.0.1:{target}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start delay_proxy.py");
    let proxy = Proxy(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(
            Instant::now() < deadline,
            "delay proxy did not start on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy
}

// ---- messages and accounts ----------------------------------------------------------------

fn account(port: u16) -> Account {
    Account {
        id: AccountId::Master,
        tenants_recid: 0,
        account_type: AccountType::Master,
        email: "bench@test.local".into(),
        display_name: Some("Bench".into()),
        login: Some(common::env("PCR_SMTP_USER")),
        password: Some(Secret::new(common::env("PCR_SMTP_PASS"))),
        outgoing: Some(Outgoing {
            transport: TransportType::Smtp,
            host: Some(common::tls_host()),
            port,
            ssl: SslMode::StartTls,
        }),
        incoming: None,
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: true,
            ca_file: Some(common::ca_file()),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/nonexistent"),
        timeout: Duration::from_secs(30),
        oauth: None,
    }
}

fn messages(n: usize, token: &str) -> Vec<BuiltMessage> {
    let line = "The quick brown fox jumps over the lazy dog; PCR-360 bench text line.\n";
    let body: String = line.repeat(10 * 1024 / line.len());
    let acc = account(25);
    (0..n)
        .map(|i| {
            let req = MessageRequest::from_json(&serde_json::json!({
                "to": "bench-dest@test.local",
                "subject": format!("bench {token} #{i}"),
                "text": format!("{token} #{i}\n{body}"),
            }))
            .unwrap();
            build(&req, &acc, &KEY).unwrap()
        })
        .collect()
}

// ---- the floor: a minimal pipelining client -------------------------------------------------

struct Raw {
    r: BufReader<native_tls::TlsStream<TcpStream>>,
}

fn reply(r: &mut impl BufRead) -> u16 {
    let mut code = 0;
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "server closed");
        code = line[..3].parse().unwrap_or(code);
        if line.as_bytes().get(3) != Some(&b'-') {
            return code;
        }
    }
}

fn expect(code: u16, want: u16, what: &str) {
    assert_eq!(code, want, "floor client: {what}");
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut plain = BufReader::new(tcp);
        expect(reply(&mut plain), 220, "greeting");
        plain.get_mut().write_all(b"EHLO floor.test\r\n").unwrap();
        expect(reply(&mut plain), 250, "EHLO");
        plain.get_mut().write_all(b"STARTTLS\r\n").unwrap();
        expect(reply(&mut plain), 220, "STARTTLS");
        let ca = std::fs::read(common::ca_file()).unwrap();
        let connector = native_tls::TlsConnector::builder()
            .add_root_certificate(native_tls::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let tls = connector
            .connect(&common::tls_host(), plain.into_inner())
            .unwrap();
        let mut r = BufReader::new(tls);
        r.get_mut().write_all(b"EHLO floor.test\r\n").unwrap();
        expect(reply(&mut r), 250, "EHLO");
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "\0{}\0{}",
            common::env("PCR_SMTP_USER"),
            common::env("PCR_SMTP_PASS")
        ));
        r.get_mut()
            .write_all(format!("AUTH PLAIN {token}\r\n").as_bytes())
            .unwrap();
        expect(reply(&mut r), 235, "AUTH");
        Raw { r }
    }

    fn send(&mut self, from: &str, to: &str, data: &[u8]) {
        let head = format!("MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n");
        self.r.get_mut().write_all(head.as_bytes()).unwrap();
        expect(reply(&mut self.r), 250, "MAIL");
        expect(reply(&mut self.r), 250, "RCPT");
        expect(reply(&mut self.r), 354, "DATA");
        self.r.get_mut().write_all(data).unwrap();
        expect(reply(&mut self.r), 250, "end of data");
    }
}

fn stuffed(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 8);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn floor(port: u16, msgs: &[BuiltMessage], connections: usize) {
    let data: Vec<Vec<u8>> = msgs.iter().map(|m| stuffed(&m.raw)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..connections {
            s.spawn(|| {
                let mut conn = Raw::connect(port);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(m) = msgs.get(i) else { break };
                    conn.send(&m.envelope_from, &m.recipients[0], &data[i]);
                }
                let _ = conn.r.get_mut().write_all(b"QUIT\r\n");
            });
        }
    });
}

// ---- runs -----------------------------------------------------------------------------------

struct Row {
    delay: u64,
    method: String,
    seconds: f64,
    connections: u64,
    turns: u64,
    n: usize,
}

fn wait_delivered(server_port: u16, token: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = common::smtp_containing(server_port, token).len();
        if got == n {
            return;
        }
        assert!(
            got < n && Instant::now() < deadline,
            "{got} of {n} messages with {token} arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(
    method: &str,
    delay: u64,
    target: u16,
    server_port: u16,
    n: usize,
    f: impl FnOnce(u16, &[BuiltMessage]),
) -> Row {
    let token = common::unique_token("bench");
    let msgs = messages(n, &token);
    let (relay, counter) = counting_relay(target);
    let started = Instant::now();
    f(relay, &msgs);
    let seconds = started.elapsed().as_secs_f64();
    wait_delivered(server_port, &token, n);
    Row {
        delay,
        method: method.to_string(),
        seconds,
        connections: counter.connections.load(Ordering::Relaxed),
        turns: counter.turns.load(Ordering::Relaxed),
        n,
    }
}

/// Best and median of a row's runs.
struct Summary {
    delay: u64,
    method: String,
    n: usize,
    best: f64,
    median: f64,
    connections: u64,
    turns: u64,
}

fn summarize(runs: &[Row]) -> Summary {
    let mut times: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let first = &runs[0];
    Summary {
        delay: first.delay,
        method: first.method.clone(),
        n: first.n,
        best: times[0],
        median: times[times.len() / 2],
        connections: first.connections,
        turns: first.turns,
    }
}

/// `--body-mb`: the time `build()` takes for one large text body of each line-end kind.
fn time_large_bodies(sizes: &[usize]) {
    // No server involved: an account that needs nothing from the test environment.
    let acc = Account {
        id: AccountId::Master,
        tenants_recid: 0,
        account_type: AccountType::Master,
        email: "bench@test.local".into(),
        display_name: Some("Bench".into()),
        login: None,
        password: None,
        outgoing: None,
        incoming: None,
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/nonexistent"),
        timeout: Duration::from_secs(30),
        oauth: None,
    };
    println!(
        "{:>6}  {:<12} {:>9} {:>10}  text",
        "MB", "line ends", "build s", "raw MB"
    );
    for &mb in sizes {
        for (kind, eol) in [
            ("LF", "\n"),
            ("CRLF", "\r\n"),
            ("CR", "\r"),
            ("one line", ""),
        ] {
            let line = format!(
                "{:<71}{eol}",
                "The quick brown fox jumps over the lazy dog; PCR-360."
            );
            let text = line.repeat(mb * 1024 * 1024 / line.len());
            let req = MessageRequest::from_json(&serde_json::json!({
                "to": "bench-dest@test.local",
                "subject": "large body",
                "text": text,
            }))
            .unwrap();
            let start = Instant::now();
            let built = build(&req, &acc, &KEY).unwrap();
            let secs = start.elapsed().as_secs_f64();
            let parsed = mail_parser::MessageParser::default()
                .parse(&built.raw)
                .expect("the built message parses");
            let want = if eol.is_empty() {
                text.clone()
            } else {
                text.replace(eol, "\r\n")
            };
            // A single-part body is followed by a CRLF the parser keeps: compare without it.
            let got = parsed.body_text(0).unwrap_or_default();
            let (got, want) = (got.trim_end_matches("\r\n"), want.trim_end_matches("\r\n"));
            let check = match got.bytes().zip(want.bytes()).position(|(a, b)| a != b) {
                None if got.len() == want.len() => "decodes back".to_string(),
                None => format!("DIFFERS: {} bytes for {}", got.len(), want.len()),
                Some(at) => format!("DIFFERS at byte {at}"),
            };
            println!(
                "{mb:>6}  {kind:<12} {secs:>9.3} {:>10.1}  {check}",
                built.raw.len() as f64 / 1_048_576.0
            );
        }
    }
}

fn main() {
    let o = options();
    if !o.body_mb.is_empty() {
        time_large_bodies(&o.body_mb);
        return;
    }
    let server_port = common::port("PCR_SMTP_STARTTLS_PORT");
    let p = o.parallel;
    let mut summaries = Vec::new();
    for (k, &delay) in o.delays.iter().enumerate() {
        let _proxy;
        let target = if delay == 0 {
            server_port
        } else {
            let listen = common::spare_port(40 + k as u16);
            _proxy = start_delay_proxy(listen, server_port, delay);
            listen
        };
        let mut runs: [Vec<Row>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..o.repeat {
            runs[0].push(run(
                &format!("send_batch, {p} threads"),
                delay,
                target,
                server_port,
                o.messages,
                |port, msgs| {
                    let t = SmtpTransport::new(&account(port)).unwrap();
                    let jobs: Vec<BatchJob> = msgs
                        .iter()
                        .map(|m| BatchJob {
                            message: m,
                            transport: 0,
                        })
                        .collect();
                    for r in send_batch(&jobs, &[&t as &dyn Transport], p) {
                        r.unwrap();
                    }
                },
            ));
            runs[1].push(run(
                "send() loop, one transport",
                delay,
                target,
                server_port,
                o.messages,
                |port, msgs| {
                    let t = SmtpTransport::new(&account(port)).unwrap();
                    for m in msgs {
                        t.send(m).unwrap();
                    }
                },
            ));
            runs[2].push(run(
                &format!("floor: raw client, {p} conns"),
                delay,
                target,
                server_port,
                o.messages,
                |port, msgs| floor(port, msgs, p),
            ));
        }
        summaries.extend(runs.iter().map(|r| summarize(r)));
    }

    println!();
    println!(
        "{:>6}  {:<30} {:>5} {:>8} {:>8} {:>8} {:>7} {:>6} {:>9}",
        "delay", "method", "msgs", "best s", "median s", "ms/msg", "msg/s", "conns", "RT/msg"
    );
    for r in &summaries {
        println!(
            "{:>4}ms  {:<30} {:>5} {:>8.3} {:>8.3} {:>8.2} {:>7.0} {:>6} {:>9.2}",
            r.delay,
            r.method,
            r.n,
            r.best,
            r.median,
            r.best * 1000.0 / r.n as f64,
            r.n as f64 / r.best,
            r.connections,
            r.turns as f64 / r.n as f64
        );
    }
    println!(
        "\n(best of {} interleaved runs; ms/msg and msg/s from the best; RT/msg = round trips \
         per message counted at a relay, connection setup and TLS included)",
        o.repeat
    );
    for chunk in summaries.chunks(3) {
        let (batch, looped, floor) = (&chunk[0], &chunk[1], &chunk[2]);
        let ratio = batch.best / floor.best;
        println!(
            "delay {:>2} ms: send_batch / floor = {ratio:.2} (median {:.2}; target <= 1.5: {})",
            batch.delay,
            batch.median / floor.median,
            if ratio <= 1.5 { "ok" } else { "MISSED" }
        );
        if batch.delay == 0 {
            let per = looped.best * 1000.0 / looped.n as f64;
            println!(
                "delay  0 ms: send() loop = {per:.2} ms/message (target < 5: {})",
                if per < 5.0 { "ok" } else { "MISSED" }
            );
        }
    }
}
