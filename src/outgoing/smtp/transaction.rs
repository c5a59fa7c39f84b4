//! One mail transaction on a connection: MAIL FROM, RCPT TO and DATA (in one pipelined batch
//! when the server offers PIPELINING, else one by one), then the dot-stuffed message.

use super::connection::Conn;
use super::replies::{Fail, Reply};
use super::BuiltMessage;

impl Conn {
    /// One mail transaction. On failure, says whether the connection can be reused (the
    /// transaction was reset cleanly) or must be dropped.
    pub(super) fn transaction(
        &mut self,
        msg: &BuiltMessage,
        data: &[u8],
    ) -> Result<(), (Fail, bool)> {
        let caps = self.caps.clone();
        let mut mail = format!("MAIL FROM:<{}>", msg.envelope_from);
        if let Some(limit) = caps.size {
            if limit > 0 && msg.raw.len() as u64 > limit {
                return Err((
                    Fail::Local {
                        message: format!(
                            "the message is {} bytes; the server accepts at most {limit} (SIZE)",
                            msg.raw.len()
                        ),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(&format!(" SIZE={}", msg.raw.len()));
        }
        if !msg.raw.is_ascii() {
            if !caps.eight_bit {
                return Err((
                    Fail::Local {
                        message: "the message has 8-bit content but the server does not offer \
                                  8BITMIME"
                            .into(),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(" BODY=8BITMIME");
        }
        let non_ascii = std::iter::once(&msg.envelope_from)
            .chain(&msg.recipients)
            .find(|a| !a.is_ascii());
        if let Some(addr) = non_ascii {
            if !caps.smtputf8 {
                return Err((
                    Fail::Local {
                        message: format!(
                            "<{addr}> is not ASCII and the server does not offer SMTPUTF8"
                        ),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(" SMTPUTF8");
        }

        let mut refused: Vec<(String, Reply)> = Vec::new();
        if caps.pipelining {
            let mut batch = format!("{mail}\r\n");
            for rcpt in &msg.recipients {
                batch.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), "MAIL FROM")
                .map_err(|f| (f, false))?;
            // 421 means the server is closing the connection: stop reading there.
            let closing = |what: String, reply: Reply| (Fail::Reply { what, reply }, false);
            let mail_reply = self.read_reply("MAIL FROM").map_err(|f| (f, false))?;
            if mail_reply.code == 421 {
                return Err(closing("MAIL FROM".into(), mail_reply));
            }
            for rcpt in &msg.recipients {
                let reply = self.read_reply("RCPT TO").map_err(|f| (f, false))?;
                if reply.code == 421 {
                    return Err(closing(format!("recipient <{rcpt}>"), reply));
                }
                if !reply.positive() {
                    refused.push((rcpt.clone(), reply));
                }
            }
            let data_reply = self.read_reply("DATA").map_err(|f| (f, false))?;
            if data_reply.code == 421 {
                return Err(closing("DATA".into(), data_reply));
            }
            let failure = if !mail_reply.positive() {
                Some(Fail::Reply {
                    what: format!("sender <{}> refused", msg.envelope_from),
                    reply: mail_reply,
                })
            } else if !refused.is_empty() {
                Some(Fail::Recipients(refused))
            } else if data_reply.code != 354 {
                Some(Fail::Reply {
                    what: "DATA refused".into(),
                    reply: data_reply.clone(),
                })
            } else {
                None
            };
            if let Some(fail) = failure {
                // Already in DATA: the only way out without sending a message is to hang up.
                if data_reply.code == 354 {
                    return Err((fail, false));
                }
                let usable = self.reset();
                return Err((fail, usable));
            }
        } else {
            let reply = self.command(&mail, "MAIL FROM").map_err(|f| (f, false))?;
            if !reply.positive() {
                let usable = reply.code != 421 && self.reset();
                return Err((
                    Fail::Reply {
                        what: format!("sender <{}> refused", msg.envelope_from),
                        reply,
                    },
                    usable,
                ));
            }
            for rcpt in &msg.recipients {
                let reply = self
                    .command(&format!("RCPT TO:<{rcpt}>"), "RCPT TO")
                    .map_err(|f| (f, false))?;
                if reply.code == 421 {
                    let what = format!("recipient <{rcpt}>");
                    return Err((Fail::Reply { what, reply }, false));
                }
                if !reply.positive() {
                    refused.push((rcpt.clone(), reply));
                }
            }
            if !refused.is_empty() {
                let usable = self.reset();
                return Err((Fail::Recipients(refused), usable));
            }
            let reply = self.command("DATA", "DATA").map_err(|f| (f, false))?;
            if reply.code != 354 {
                let usable = self.reset();
                return Err((
                    Fail::Reply {
                        what: "DATA refused".into(),
                        reply,
                    },
                    usable,
                ));
            }
        }

        // A failed write never delivered the final "." line: the message was not accepted.
        self.write(data, "message data").map_err(|f| (f, false))?;
        let reply = match self.read_reply("end of data") {
            Ok(reply) => reply,
            Err(Fail::Io { err, .. }) => {
                return Err((Fail::NoReplyAfterData { err: Some(err) }, false))
            }
            Err(Fail::Closed { .. }) => return Err((Fail::NoReplyAfterData { err: None }, false)),
            Err(other) => return Err((other, false)),
        };
        if reply.positive() {
            Ok(())
        } else {
            let usable = reply.code != 421;
            Err((
                Fail::Reply {
                    what: "message refused".into(),
                    reply,
                },
                usable,
            ))
        }
    }
}

/// The message for DATA: CRLF line ends, leading dots doubled, ending with `.` on its own line.
pub(super) fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 64 + 8);
    let mut line_start = true;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' if raw.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
                continue;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".\r\nx"), b"..\r\nx\r\n.\r\n");
        assert_eq!(dot_stuff(b"bare\nlf\rcr"), b"bare\r\nlf\r\ncr\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}
