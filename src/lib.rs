//! `pcr_email`: PCR-360's email, in Rust. The core in this crate knows nothing of PHP;
//! `php` (feature `php`) is the thin ext-php-rs boundary.

pub mod account_check;
pub mod checkmail;
pub mod config;
pub mod context;
pub mod error;
pub mod host;
pub mod http;
pub mod incoming;
pub mod log;
/// glibc's malloc settings the PHP module applies at start (the core does not use it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub mod malloc;
pub mod manager;
pub mod mime;
pub mod net;
pub mod oauth;
pub mod oauth_signin;
pub mod outbound;
pub mod outgoing;
pub mod perms;
pub mod routing;
pub mod rules;
pub mod sasl;
pub mod state;
pub mod threading;

#[cfg(feature = "php")]
pub mod php;

pub use error::{Error, Result};
