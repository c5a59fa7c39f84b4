//! The five exception classes of SPEC §5 (named in `crate::error::exception_class`), and
//! [`to_php`]: a core error as an exception of the class [`Error::exception_class`] picks,
//! the one mapping from core errors to PHP classes.
//!
//! They are registered by hand (not `#[php_class]`) so that they keep `Exception`'s own
//! constructor and object handlers: PHP code can `new` and subclass them like any exception.

use std::sync::atomic::{AtomicPtr, Ordering};

use ext_php_rs::args::ArgInfoTables;
use std::os::raw::c_void;

use ext_php_rs::builders::ClassBuilder;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::exception::PhpException;
use ext_php_rs::ffi::zend_type;
use ext_php_rs::types::{ZendObject, ZendStr, Zval};
use ext_php_rs::zend::ClassEntry;

use crate::error::exception_class::{AUTH, BASE, CONFIG, MAILBOX, TRANSPORT};
use crate::error::Error;

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

use super::arginfo::{MAY_BE_LONG, MAY_BE_NULL, MAY_BE_STRING};
const MAY_BE_BOOL: u32 = (1 << 2) | (1 << 3);
const ZEND_ACC_PUBLIC: i32 = 1;

extern "C" {
    fn zend_declare_typed_property(
        ce: *mut ext_php_rs::ffi::zend_class_entry,
        name: *mut ext_php_rs::ffi::zend_string,
        property: *mut ext_php_rs::ffi::zval,
        access_type: i32,
        doc_comment: *mut ext_php_rs::ffi::zend_string,
        ty: zend_type,
    ) -> *mut c_void;
}

/// A typed public property: `?string $account = null`, `?int $smtpCode = null`,
/// `bool $transient = false`. ext-php-rs 0.16 declares properties untyped
/// (`zend_declare_property`; `ClassProperty::ty` only feeds its own stub generator), so they
/// are declared here with PHP's `zend_declare_typed_property`, as PHP's own classes do:
/// Reflection, the generated stubs and PHP's assignment checks then know the types.
#[derive(Clone, Copy)]
struct Property {
    name: &'static str,
    mask: u32,
}

const fn property(name: &'static str, mask: u32) -> Property {
    Property { name, mask }
}

fn declare(ce: &'static ClassEntry, props: &[Property]) {
    for p in props {
        let mut default = Zval::new();
        if p.mask & MAY_BE_NULL != 0 {
            default.set_null();
        } else {
            default.set_bool(false);
        }
        let name = ZendStr::new_interned(p.name, true).into_raw();
        let ty = zend_type {
            ptr: std::ptr::null_mut(),
            type_mask: p.mask,
        };
        // SAFETY: MINIT, a class entry we just registered; an interned persistent name and a
        // non-refcounted default, as PHP requires for an internal class.
        unsafe {
            zend_declare_typed_property(
                std::ptr::from_ref(ce).cast_mut(),
                name,
                &raw mut default,
                ZEND_ACC_PUBLIC,
                std::ptr::null_mut(),
                ty,
            );
        }
    }
}

fn register(
    name: &'static str,
    parent: ext_php_rs::class::ClassEntryInfo,
    slot: &AtomicPtr<ClassEntry>,
    props: &[Property],
    hook: fn(&'static mut ClassEntry, ArgInfoTables),
) -> ext_php_rs::error::Result<()> {
    ClassBuilder::new(name)
        .extends(parent)
        .registration(hook)
        .register()?;
    let ptr = slot.load(Ordering::Acquire);
    // SAFETY: set by `hook` to the class entry PHP just registered (kept for the process).
    if let Some(ce) = unsafe { ptr.as_ref() } {
        declare(ce, props);
    }
    Ok(())
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
    // The account: 'master' or the tenant account's RECID.
    let account = property("account", MAY_BE_STRING | MAY_BE_NULL);
    // The server (host:port, binary or directory) that failed.
    let server = property("server", MAY_BE_STRING | MAY_BE_NULL);
    register(
        BASE,
        (runtime_exception, "RuntimeException"),
        &BASE_CE,
        &[],
        hook!(BASE_CE),
    )?;
    register(CONFIG, (base_ce, BASE), &CONFIG_CE, &[], hook!(CONFIG_CE))?;
    register(
        TRANSPORT,
        (base_ce, BASE),
        &TRANSPORT_CE,
        &[
            account,
            server,
            // The SMTP reply code (HTTP status for the cloud APIs), when the server gave one.
            property("smtpCode", MAY_BE_LONG | MAY_BE_NULL),
            // True when trying again later may succeed.
            property("transient", MAY_BE_BOOL),
        ],
        hook!(TRANSPORT_CE),
    )?;
    register(
        MAILBOX,
        (base_ce, BASE),
        &MAILBOX_CE,
        &[account, server],
        hook!(MAILBOX_CE),
    )?;
    register(AUTH, (base_ce, BASE), &AUTH_CE, &[account], hook!(AUTH_CE))?;
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

/// The registered class entry of one of our exception class names.
fn class_entry(name: &str) -> &'static ClassEntry {
    match name {
        CONFIG => load(&CONFIG_CE),
        TRANSPORT => load(&TRANSPORT_CE),
        MAILBOX => load(&MAILBOX_CE),
        AUTH => load(&AUTH_CE),
        _ => base_ce(),
    }
}

fn string_zval(s: &str) -> Zval {
    let mut z = Zval::new();
    let _ = z.set_string(s, false);
    z
}

/// A core error as the PHP exception of its class ([`Error::exception_class`], the one
/// mapping), with the class's properties set.
pub fn to_php(err: Error) -> PhpException {
    let message = err.to_string();
    let ce = class_entry(err.exception_class());
    let props: Vec<(&str, Zval)> = match &err {
        Error::Transport(t) => {
            let mut code = Zval::new();
            match t.code {
                Some(c) => code.set_long(i64::from(c)),
                None => code.set_null(),
            }
            let mut transient = Zval::new();
            transient.set_bool(t.transient);
            vec![
                ("account", string_zval(&t.account)),
                ("server", string_zval(&t.server)),
                ("smtpCode", code),
                ("transient", transient),
            ]
        }
        Error::Mailbox(m) => vec![
            ("account", string_zval(&m.account)),
            ("server", string_zval(&m.server)),
        ],
        Error::Auth { account, .. } => vec![("account", string_zval(account))],
        Error::Config { .. } | Error::Message(_) | Error::Host(_) => vec![],
    };
    let exception = PhpException::new(message.clone(), 0, ce);
    match object(ce, &message, &props) {
        Some(obj) => exception.with_object(obj),
        None => exception,
    }
}
