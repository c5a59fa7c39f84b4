//! Incoming mail into Inquiries and threads (in progress).

use serde_json::Value;

use crate::error::{Error, Result};
use crate::host::Host;
use crate::manager::Manager;

pub fn event_check_mail(
    _manager: &mut Manager,
    _host: &mut dyn Host,
    _data: &Value,
) -> Result<Value> {
    Err(Error::message("eventCheckMail is not available yet"))
}
