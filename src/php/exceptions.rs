//! The five exception classes of SPEC §5 and the one mapping from core errors to them.
//!
//! They are registered by hand (not `#[php_class]`) so that they keep `Exception`'s own
//! constructor and object handlers: PHP code can `new` and subclass them like any exception.

use std::sync::atomic::{AtomicPtr, Ordering};

use ext_php_rs::args::ArgInfoTables;
use ext_php_rs::builders::{ClassBuilder, ClassProperty};
use ext_php_rs::convert::IntoZval;
use ext_php_rs::exception::PhpException;
use ext_php_rs::flags::{DataType, PropertyFlags};
use ext_php_rs::types::{ZendObject, Zval};
use ext_php_rs::zend::ClassEntry;

use crate::error::Error;

pub const BASE: &str = "PCR_Utility_EmailException";
pub const CONFIG: &str = "PCR_Utility_EmailConfigException";
pub const TRANSPORT: &str = "PCR_Utility_EmailTransportException";
pub const MAILBOX: &str = "PCR_Utility_EmailMailboxException";
pub const AUTH: &str = "PCR_Utility_EmailAuthException";

static BASE_CE: AtomicPtr<ClassEntry> = AtomicPtr::new(std::ptr::null_mut());
static CONFIG_CE: AtomicPtr<ClassEntry> = AtomicPtr::new(std::ptr::null_mut());
static TRANSPORT_CE: AtomicPtr<ClassEntry> = AtomicPtr::new(std::ptr::null_mut());
static MAILBOX_CE: AtomicPtr<ClassEntry> = AtomicPtr::new(std::ptr::null_mut());
static AUTH_CE: AtomicPtr<ClassEntry> = AtomicPtr::new(std::ptr::null_mut());

extern "C" {
    static mut spl_ce_RuntimeException: *mut ext_php_rs::ffi::zend_class_entry;
}

fn runtime_exception() -> &'static ClassEntry {
    // SAFETY: SPL is part of PHP's core and registers RuntimeException before any extension's
    // MINIT runs; the pointer is never changed afterwards.
    unsafe {
        (*std::ptr::addr_of!(spl_ce_RuntimeException))
            .cast::<ClassEntry>()
            .as_ref()
            .expect("SPL RuntimeException is registered")
    }
}

fn load(slot: &AtomicPtr<ClassEntry>) -> &'static ClassEntry {
    let ptr = slot.load(Ordering::Acquire);
    // SAFETY: set once at MINIT to a class entry PHP keeps for the life of the process.
    unsafe { ptr.as_ref() }.unwrap_or_else(runtime_exception)
}

fn base_ce() -> &'static ClassEntry {
    load(&BASE_CE)
}

fn property(name: &str, ty: DataType, nullable: bool, doc: &'static str) -> ClassProperty {
    ClassProperty {
        name: name.to_string(),
        flags: PropertyFlags::Public,
        default: if nullable {
            None
        } else {
            Some(Box::new(|| {
                let mut z = Zval::new();
                z.set_bool(false);
                Ok(z)
            }))
        },
        docs: Box::leak(Box::new([doc])),
        ty: Some(ty),
        nullable,
        readonly: false,
        default_stub: Some(if nullable { "null" } else { "false" }.to_string()),
    }
}

fn register(
    name: &'static str,
    parent: ext_php_rs::class::ClassEntryInfo,
    props: Vec<ClassProperty>,
    hook: fn(&'static mut ClassEntry, ArgInfoTables),
) -> ext_php_rs::error::Result<()> {
    let mut builder = ClassBuilder::new(name).extends(parent).registration(hook);
    for p in props {
        builder = builder.property(p);
    }
    builder.register()
}

macro_rules! hook {
    ($slot:ident) => {{
        // The signature is ext-php-rs's registration callback.
        #[allow(clippy::boxed_local)]
        fn hook(ce: &'static mut ClassEntry, _tables: ArgInfoTables) {
            $slot.store(ce, Ordering::Release);
        }
        hook
    }};
}

/// Registers the classes; called from the module startup (MINIT).
pub fn register_all() -> ext_php_rs::error::Result<()> {
    register(
        BASE,
        (runtime_exception, "RuntimeException"),
        vec![],
        hook!(BASE_CE),
    )?;
    let account = || {
        property(
            "account",
            DataType::String,
            true,
            "The account: 'master' or the tenant account's RECID.",
        )
    };
    let server = || {
        property(
            "server",
            DataType::String,
            true,
            "The server (host:port, binary or directory) that failed.",
        )
    };
    register(CONFIG, (base_ce, BASE), vec![], hook!(CONFIG_CE))?;
    register(
        TRANSPORT,
        (base_ce, BASE),
        vec![
            account(),
            server(),
            property(
                "smtpCode",
                DataType::Long,
                true,
                "The SMTP reply code (HTTP status for the cloud APIs), when the server gave one.",
            ),
            property(
                "transient",
                DataType::Bool,
                false,
                "True when trying again later may succeed.",
            ),
        ],
        hook!(TRANSPORT_CE),
    )?;
    register(
        MAILBOX,
        (base_ce, BASE),
        vec![account(), server()],
        hook!(MAILBOX_CE),
    )?;
    register(AUTH, (base_ce, BASE), vec![account()], hook!(AUTH_CE))?;
    Ok(())
}

/// Builds the exception object: `Exception::__construct($message)` sets message, file, line and
/// trace the usual way; then our public properties.
fn object(ce: &'static ClassEntry, message: &str, props: &[(&str, Zval)]) -> Option<Zval> {
    let mut obj = ZendObject::new(ce);
    obj.try_call_method("__construct", vec![&message]).ok()?;
    for (name, value) in props {
        obj.set_property(name, value.shallow_clone()).ok()?;
    }
    obj.into_zval(false).ok()
}

fn string_zval(s: &str) -> Zval {
    let mut z = Zval::new();
    let _ = z.set_string(s, false);
    z
}

/// The one mapping from core errors to PHP exceptions.
pub fn to_php(err: Error) -> PhpException {
    let message = err.to_string();
    let (ce, props): (&'static ClassEntry, Vec<(&str, Zval)>) = match &err {
        Error::Config { .. } => (load(&CONFIG_CE), vec![]),
        Error::Transport(t) => {
            let mut code = Zval::new();
            match t.code {
                Some(c) => code.set_long(i64::from(c)),
                None => code.set_null(),
            }
            let mut transient = Zval::new();
            transient.set_bool(t.transient);
            (
                load(&TRANSPORT_CE),
                vec![
                    ("account", string_zval(&t.account)),
                    ("server", string_zval(&t.server)),
                    ("smtpCode", code),
                    ("transient", transient),
                ],
            )
        }
        Error::Mailbox(m) => (
            load(&MAILBOX_CE),
            vec![
                ("account", string_zval(&m.account)),
                ("server", string_zval(&m.server)),
            ],
        ),
        Error::Auth { account, .. } => (load(&AUTH_CE), vec![("account", string_zval(account))]),
        Error::Message(_) | Error::Host(_) => (base_ce(), vec![]),
    };
    let exception = PhpException::new(message.clone(), 0, ce);
    match object(ce, &message, &props) {
        Some(obj) => exception.with_object(obj),
        None => exception,
    }
}
